//! The adapter store: the registry of module ids, the hot cache of loaded versions and the
//! loader, turning a request's composition spec into pinned, immutable deltas.
//!
//! Invariants: a resolved [`Composition`] holds `Arc`s to every module version it uses, so those
//! stay pinned (never evicted, never changed) until the request drops it; cache keys include the
//! module's file fingerprint, so a file changed on disk is loaded as a new version while in-flight
//! requests keep the old one; Poly mixtures are derived data cached per (inventory version, routing).
use std::sync::Arc;
use std::time::Instant;

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
    /// Bounds concurrent cold loads and mixtures (a cache hit never takes a slot).
    gate: super::gate::LoadGate,
    /// A merge's component paths, by its path, with the fingerprint of its own files when they
    /// were read: the recipe is parsed again only when it changed, not on every request.
    merge_sources: dashmap::DashMap<std::path::PathBuf, (String, Vec<std::path::PathBuf>)>,
}

impl AdapterStore {
    pub fn new(registry: Registry, cache_bytes: usize, base: BaseShapes, base_weight: BaseWeightFn) -> Self {
        Self {
            registry,
            cache: ModuleCache::new(cache_bytes),
            loader: ModuleLoader::new(base, base_weight),
            gate: super::gate::LoadGate::new(super::gate::DEFAULT_LOAD_SLOTS, super::gate::DEFAULT_LOAD_WAITERS),
            merge_sources: dashmap::DashMap::new(),
        }
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

    /// At most `slots` cold loads or mixtures at once, and `max_waiting` callers waiting for one.
    pub fn with_load_slots(mut self, slots: usize, max_waiting: usize) -> Self {
        self.gate = super::gate::LoadGate::new(slots, max_waiting);
        self
    }

    /// A store over `model` (base weights read from it for merges).
    pub fn for_model(registry: Registry, cache_bytes: usize, model: Arc<Llama>) -> Self {
        let base = BaseShapes::new(model.cfg.clone());
        let m = model.clone();
        let f: BaseWeightFn = Arc::new(move |t: Target| super::loader::base_weight_of(&m, t));
        // An 8-bit base run by an int8 kernel: 8-bit adapter factors in the same kind of kernel
        // (their error is far below the base's own quantization error).
        let compact = model.int8_base();
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
        self.module_by(id, None)
    }

    /// [`Self::module`], waiting for a load slot at most until `deadline`.
    pub fn module_by(&self, id: &str, deadline: Option<Instant>) -> Result<Arc<LoadedModule>, AdapterError> {
        let reg = self.registry.get(id)?;
        let mut fp = fingerprint(&reg.path)?;
        // A merge's sources are part of its fingerprint. A recipe that cannot be read here is
        // left to the load, which checks confinement first and reports the error.
        if reg.kind == super::registry::ModuleKind::Merge {
            // (The map's read guard must end before an insert into the same shard.)
            let cached = self.merge_sources.get(&reg.path).filter(|e| e.0 == fp).map(|e| e.1.clone());
            let sources = match cached {
                Some(s) => s,
                None => {
                    let s = ModuleLoader::merge_sources(&reg).unwrap_or_default();
                    self.merge_sources.insert(reg.path.clone(), (fp.clone(), s.clone()));
                    s
                }
            };
            for s in sources {
                fp.push('|');
                fp.push_str(&fingerprint(&s).unwrap_or_default());
            }
        }
        let key = format!("{id}#{}", short_hash(fp.as_bytes()));
        self.cache.get_or_load(&key, || {
            let _slot = self.gate.acquire(deadline)?;
            self.loader.load(&reg, self.registry.root().path())
        })
    }

    /// The mixed LoRA of a Poly inventory for `routing` (cached per inventory version and routing).
    pub fn poly_mix(&self, id: &str, routing: &Routing) -> Result<(Arc<LoadedModule>, Arc<LoadedModule>), AdapterError> {
        self.poly_mix_by(id, routing, None)
    }

    fn poly_mix_by(
        &self,
        id: &str,
        routing: &Routing,
        deadline: Option<Instant>,
    ) -> Result<(Arc<LoadedModule>, Arc<LoadedModule>), AdapterError> {
        let inv = self.module_by(id, deadline)?;
        let ModuleData::Poly(p) = &inv.data else {
            return Err(AdapterError::WrongKind { module: id.into(), kind: inv.kind.as_str(), usage: "as a Poly routing inventory" });
        };
        let rkey = match routing {
            Routing::Task(t) => format!("task={t}"),
            Routing::Weights(w) => format!("w={}", short_hash(format!("{w:?}").as_bytes())),
        };
        let key = format!("{id}#{}#{rkey}", inv.version);
        let mix = self.cache.get_or_load(&key, || {
            let _slot = self.gate.acquire(deadline)?;
            self.loader.mix(id, p, routing, &key, &rkey)
        })?;
        Ok((inv, mix))
    }

    /// Resolves and pins a request's composition.
    pub fn resolve(&self, spec: &CompositionSpec) -> Result<Composition, AdapterError> {
        self.resolve_by(spec, None)
    }

    /// [`Self::resolve`], waiting for load slots at most until `deadline`.
    pub fn resolve_by(&self, spec: &CompositionSpec, deadline: Option<Instant>) -> Result<Composition, AdapterError> {
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
            let m = self.module_by(&d.id, deadline)?;
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
            let (inv, mix) = self.poly_mix_by(id, routing, deadline)?;
            let deltas = mix.deltas().expect("a mixture holds deltas").clone();
            parts.push((deltas, 1.0));
            key.push_str(&format!("{}#{};", mix.id, inv.version));
            pinned.push(inv);
            pinned.push(mix);
        }
        Ok(Composition { parts, pinned, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::registry::AdapterRoot;
    use crate::adapters::testing::{tiny_base, write_f32};

    /// A cold load takes a gate slot: with every slot held and no room to wait, the load is
    /// refused at once (`adapter_load_busy`); a cached module never needs a slot.
    #[test]
    fn cold_loads_take_a_slot_and_hits_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        for name in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            write_f32(&dir.path().join(name).join("task_vector.safetensors"), &[(q, vec![8, 8], vec![0.5; 64])]);
        }
        let registry = Registry::new(AdapterRoot::new(dir.path()).unwrap(), true);
        let base_weight: BaseWeightFn = Arc::new(|_| Err(AdapterError::Tensor("no base".into())));
        let store = AdapterStore::new(registry, 1 << 20, tiny_base(), base_weight).with_load_slots(1, 0);
        store.module("a").expect("a cold load with a free slot");
        let held = store.gate.acquire(None).unwrap();
        let e = store.module("b").err().expect("no slot and no room to wait");
        assert_eq!(e.code(), "adapter_load_busy", "{e}");
        store.module("a").expect("a cache hit needs no slot");
        drop(held);
        store.module("b").expect("the slot is free again");
    }

    /// A merge whose component sits in a subfolder of the recipe's folder: editing that file
    /// makes a new version (not the old merge served on), and its bytes count against the size
    /// limit.
    #[test]
    fn merges_cover_nested_component_files() {
        let dir = tempfile::tempdir().unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        let m = dir.path().join("m");
        std::fs::create_dir_all(m.join("parts")).unwrap();
        std::fs::write(
            m.join("recipe.json"),
            r#"{"method": "task_arithmetic", "components": [{"task_vector": "parts/tv.safetensors", "lambda": 1.0}]}"#,
        )
        .unwrap();
        write_f32(&m.join("parts/tv.safetensors"), &[(q, vec![8, 8], vec![0.5; 64])]);
        let registry = Registry::new(AdapterRoot::new(dir.path()).unwrap(), true);
        let base_weight: BaseWeightFn = Arc::new(|_| Err(AdapterError::Tensor("no base".into())));
        let store = AdapterStore::new(registry, 1 << 20, tiny_base(), base_weight);
        let v1 = store.module("m").unwrap().version.clone();
        // Edit the nested component (a new file: new inode, new contents).
        let tmp = m.join("parts/tv.tmp");
        write_f32(&tmp, &[(q, vec![8, 8], vec![0.25; 64])]);
        std::fs::rename(&tmp, m.join("parts/tv.safetensors")).unwrap();
        let v2 = store.module("m").unwrap().version.clone();
        assert_ne!(v1, v2, "an edit inside the component folder must make a new version");
        // The recipe was parsed once for both requests; a new recipe is parsed again.
        assert_eq!(store.merge_sources.get(&m).map(|e| e.1.len()), Some(1));
        write_f32(&m.join("parts/tv2.safetensors"), &[(q, vec![8, 8], vec![0.125; 64])]);
        std::fs::write(
            m.join("recipe.json"),
            r#"{"method": "task_arithmetic", "components": [{"task_vector": "parts/tv.safetensors", "lambda": 1.0}, {"task_vector": "parts/tv2.safetensors", "lambda": 1.0}]}"#,
        )
        .unwrap();
        let v3 = store.module("m").unwrap().version.clone();
        assert_ne!(v2, v3, "a new recipe is a new version");
        assert_eq!(store.merge_sources.get(&m).map(|e| e.1.len()), Some(2), "the new recipe's sources are used");
        // The component's bytes count: a limit above the recipe alone but below recipe + component.
        let registry = Registry::new(AdapterRoot::new(dir.path()).unwrap(), true);
        let base_weight: BaseWeightFn = Arc::new(|_| Err(AdapterError::Tensor("no base".into())));
        let limits = AdapterLimits { max_file_bytes: 200, ..AdapterLimits::default() };
        let store = AdapterStore::new(registry, 1 << 20, tiny_base(), base_weight).with_limits(limits);
        let e = store.module("m").err().expect("the component's bytes exceed the limit");
        assert_eq!(e.code(), "limit_exceeded", "{e}");
    }
}
