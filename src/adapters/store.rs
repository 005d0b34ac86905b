//! The adapter store: the registry of module ids, the hot cache of loaded versions and the
//! loader, turning a request's composition spec into pinned, immutable deltas.
//!
//! Invariants: a resolved [`Composition`] holds `Arc`s to every module version it uses, so those
//! stay pinned (never evicted, never changed) until the request drops it; cache keys include the
//! module's file fingerprint, so a file changed on disk is loaded as a new version while in-flight
//! requests keep the old one; Poly mixtures are derived data cached per (inventory version, routing).
use std::sync::Arc;

use super::cache::ModuleCache;
use super::composition::{Composition, CompositionSpec};
use super::error::AdapterError;
use super::formats::poly::Routing;
use super::loader::{AdapterLimits, BaseWeightFn, LoadedModule, ModuleData, ModuleLoader};
use super::registry::Registry;
use super::source::{fingerprint, short_hash};
use super::target::{BaseShapes, Target};
use crate::model::llama::Llama;

/// Registry, cache and loader.
pub struct AdapterStore {
    registry: Registry,
    cache: ModuleCache<LoadedModule>,
    loader: ModuleLoader,
}

impl AdapterStore {
    pub fn new(registry: Registry, cache_bytes: usize, base: BaseShapes, base_weight: BaseWeightFn) -> Self {
        Self { registry, cache: ModuleCache::new(cache_bytes), loader: ModuleLoader::new(base, base_weight) }
    }

    /// Finished modules' tensors live on `device` (the model's).
    pub fn on_device(mut self, device: candle_core::Device) -> Self {
        self.loader.device = device;
        self
    }

    /// Rank-8 low-rank factors of modules loaded from now on are held as 8-bit blocks in the CPU
    /// kernels.
    pub fn with_compact_factors(mut self, compact: bool) -> Self {
        self.loader.compact_factors = compact;
        self
    }

    pub fn with_limits(mut self, limits: AdapterLimits) -> Self {
        self.loader.limits = limits;
        self
    }

    /// A store over `model` (base weights read from it for merges).
    pub fn for_model(registry: Registry, cache_bytes: usize, model: Arc<Llama>) -> Self {
        let base = BaseShapes::new(model.cfg.clone());
        let m = model.clone();
        let f: BaseWeightFn = Arc::new(move |t: Target| super::loader::base_weight_of(&m, t));
        // An 8-bit base run by the VNNI kernel: 8-bit adapter factors in the same kind of kernel
        // (their error is far below the base's own quantization error).
        let compact = matches!(model.lm_head, crate::model::linear::BaseWeight::Quantized(_)) && crate::kernels::int8_available();
        Self::new(registry, cache_bytes, base, f).with_compact_factors(compact).on_device(model.device().clone())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn cache(&self) -> &ModuleCache<LoadedModule> {
        &self.cache
    }

    pub fn base(&self) -> &BaseShapes {
        &self.loader.base
    }

    /// The current version of module `id`, loading it if needed.
    pub fn module(&self, id: &str) -> Result<Arc<LoadedModule>, AdapterError> {
        let reg = self.registry.get(id)?;
        let fp = fingerprint(&reg.path)?;
        let key = format!("{id}#{}", short_hash(fp.as_bytes()));
        self.cache.get_or_load(&key, || self.loader.load(&reg, self.registry.root().path()))
    }

    /// The mixed LoRA of a Poly inventory for `routing` (cached per inventory version and routing).
    pub fn poly_mix(&self, id: &str, routing: &Routing) -> Result<(Arc<LoadedModule>, Arc<LoadedModule>), AdapterError> {
        let inv = self.module(id)?;
        let ModuleData::Poly(p) = &inv.data else {
            return Err(AdapterError::WrongKind { module: id.into(), kind: inv.kind.as_str(), usage: "as a Poly routing inventory" });
        };
        let rkey = match routing {
            Routing::Task(t) => format!("task={t}"),
            Routing::Weights(w) => format!("w={}", short_hash(format!("{w:?}").as_bytes())),
        };
        let key = format!("{id}#{}#{rkey}", inv.version);
        let mix = self.cache.get_or_load(&key, || self.loader.mix(id, p, routing, &key, &rkey))?;
        Ok((inv, mix))
    }

    /// Resolves and pins a request's composition.
    pub fn resolve(&self, spec: &CompositionSpec) -> Result<Composition, AdapterError> {
        let n = spec.deltas.len() + spec.route.is_some() as usize;
        if n > self.loader.limits.max_components {
            return Err(AdapterError::Limit(format!("{n} components; max_components is {}", self.loader.limits.max_components)));
        }
        let mut parts = Vec::with_capacity(n);
        let mut pinned = Vec::with_capacity(n + 1);
        let mut key = String::new();
        for d in &spec.deltas {
            if !d.scale.is_finite() {
                return Err(AdapterError::Composition(format!("scale of `{}` is {} (must be finite)", d.id, d.scale)));
            }
            let m = self.module(&d.id)?;
            let Some(deltas) = m.deltas() else {
                return Err(AdapterError::WrongKind {
                    module: d.id.clone(),
                    kind: m.kind.as_str(),
                    usage: "as a delta (route it with a task id)",
                });
            };
            parts.push((deltas.clone(), d.scale));
            key.push_str(&format!("{}@{}#{};", d.id, d.scale, m.version));
            pinned.push(m);
        }
        if let Some((id, routing)) = &spec.route {
            let (inv, mix) = self.poly_mix(id, routing)?;
            let deltas = mix.deltas().expect("a mixture holds deltas").clone();
            parts.push((deltas, 1.0));
            key.push_str(&format!("{}#{};", mix.id, inv.version));
            pinned.push(inv);
            pinned.push(mix);
        }
        Ok(Composition { parts, pinned, key })
    }
}
