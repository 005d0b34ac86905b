//! The adapter store: registry + hot cache + the base model's shapes and weights, turning a
//! request's composition spec into pinned, immutable deltas.
//!
//! Invariants: a resolved [`Composition`] holds `Arc`s to every module version it uses, so those
//! stay pinned (never evicted, never changed) until the request drops it; cache keys include the
//! module's file fingerprint, so a file changed on disk is loaded as a new version while in-flight
//! requests keep the old one; Poly mixtures are derived data cached per (inventory version, routing).
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use super::cache::{ModuleCache, Weighted};
use super::delta::{BaseShapes, ModuleDeltas, Target};
use super::error::AdapterError;
use super::poly::{PolyInventory, Routing};
use super::registry::{fingerprint, module_files, ModuleKind, Registration, Registry};
use crate::model::llama::Llama;

/// Gives the dense float32 base weight `theta0` of a parameter (merges need it).
pub type BaseWeightFn = Arc<dyn Fn(Target) -> Result<Tensor, AdapterError> + Send + Sync>;

/// Limits on modules and compositions (exceeding one is `AdapterError::Limit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterLimits {
    pub max_components: usize,
    pub max_file_bytes: u64,
    pub max_rank: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self { max_components: 16, max_file_bytes: 2 << 30, max_rank: 256 }
    }
}

/// What a loaded module holds.
pub enum ModuleData {
    Deltas(Arc<ModuleDeltas>),
    Poly(Arc<PolyInventory>),
}

/// An immutable, content-hashed version of a module.
pub struct LoadedModule {
    pub id: String,
    pub kind: ModuleKind,
    /// SHA-256 (hex, 16 chars) of the module's files, or of the derivation for Poly mixtures.
    pub version: String,
    pub data: ModuleData,
    /// Largest LoRA rank, if low-rank.
    pub rank: Option<usize>,
}

impl Weighted for LoadedModule {
    fn bytes(&self) -> usize {
        match &self.data {
            ModuleData::Deltas(d) => d.bytes(),
            ModuleData::Poly(p) => p.bytes(),
        }
    }
}

impl LoadedModule {
    pub fn deltas(&self) -> Option<&Arc<ModuleDeltas>> {
        match &self.data {
            ModuleData::Deltas(d) => Some(d),
            ModuleData::Poly(_) => None,
        }
    }
}

/// One `(module id, scale)` of a composition.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaRef {
    pub id: String,
    pub scale: f32,
}

/// A request's composition: deltas with scales, plus an optional Poly routing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompositionSpec {
    pub deltas: Vec<DeltaRef>,
    pub route: Option<(String, Routing)>,
}

impl CompositionSpec {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.route.is_none()
    }
}

/// Resolved deltas of one request: `W' = W + sum scale * delta`.
pub struct Composition {
    pub parts: Vec<(Arc<ModuleDeltas>, f32)>,
    /// The module versions this request pins.
    pub pinned: Vec<Arc<LoadedModule>>,
    /// Identifies the composition (ids, versions, scales) for grouping and logs.
    pub key: String,
}

/// Registry, cache and base model access.
pub struct AdapterStore {
    registry: Registry,
    cache: ModuleCache<LoadedModule>,
    base: BaseShapes,
    base_weight: BaseWeightFn,
    limits: AdapterLimits,
    /// Hold rank-8 low-rank factors as 8-bit blocks in the CPU kernels (set for an int8 base).
    compact_factors: bool,
    /// The model's device. Modules are parsed, merged and mixed on the host; their finished
    /// low-rank and dense tensors are then moved here once, at load (sparse deltas stay on the
    /// host, see [`ModuleDeltas::to_device`]).
    device: candle_core::Device,
}

impl AdapterStore {
    pub fn new(registry: Registry, cache_bytes: usize, base: BaseShapes, base_weight: BaseWeightFn) -> Self {
        Self {
            registry,
            cache: ModuleCache::new(cache_bytes),
            base,
            base_weight,
            limits: AdapterLimits::default(),
            compact_factors: false,
            device: candle_core::Device::Cpu,
        }
    }

    /// Finished modules' tensors live on `device` (the model's).
    pub fn on_device(mut self, device: candle_core::Device) -> Self {
        self.device = device;
        self
    }

    /// Rank-8 low-rank factors of modules loaded from now on are held as 8-bit blocks in the CPU
    /// kernels.
    pub fn with_compact_factors(mut self, compact: bool) -> Self {
        self.compact_factors = compact;
        self
    }

    pub fn with_limits(mut self, limits: AdapterLimits) -> Self {
        self.limits = limits;
        self
    }

    /// A store over `model` (base weights read from it for merges).
    pub fn for_model(registry: Registry, cache_bytes: usize, model: Arc<Llama>) -> Self {
        let base = BaseShapes::new(model.cfg.clone());
        let m = model.clone();
        let f: BaseWeightFn = Arc::new(move |t: Target| base_weight_of(&m, t));
        // An 8-bit base run by the VNNI kernel: 8-bit adapter factors in the same kind of kernel
        // (their error is far below the base's own quantization error).
        let compact = matches!(model.lm_head, crate::model::linear::BaseWeight::Quantized(_)) && crate::model::qgemm::available();
        Self::new(registry, cache_bytes, base, f).with_compact_factors(compact).on_device(model.device().clone())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn cache(&self) -> &ModuleCache<LoadedModule> {
        &self.cache
    }

    pub fn base(&self) -> &BaseShapes {
        &self.base
    }

    /// The current version of module `id`, loading it if needed.
    pub fn module(&self, id: &str) -> Result<Arc<LoadedModule>, AdapterError> {
        let reg = self.registry.get(id)?;
        let fp = fingerprint(&reg.path)?;
        let key = format!("{id}#{}", short_hash(fp.as_bytes()));
        self.cache.get_or_load(&key, || self.load(&reg))
    }

    fn load(&self, reg: &Registration) -> Result<LoadedModule, AdapterError> {
        super::error::guard_parser(&reg.path, "module", || self.load_unguarded(reg))
    }

    fn load_unguarded(&self, reg: &Registration) -> Result<LoadedModule, AdapterError> {
        self.check_confined(reg)?;
        let size = module_bytes(&reg.path)?;
        if size > self.limits.max_file_bytes {
            return Err(AdapterError::Limit(format!(
                "module `{}` has {size} bytes of files; max_adapter_file_bytes is {}",
                reg.id, self.limits.max_file_bytes
            )));
        }
        let t_hash = std::time::Instant::now();
        // LoRA and Poly tensors are parsed from the very bytes hashed.
        let bytes = ModuleBytes::read(&reg.path, |f| {
            matches!(reg.kind, ModuleKind::Lora | ModuleKind::Poly) && f.file_name().is_some_and(|n| n == "adapter_model.safetensors")
        })?;
        let version = bytes.version.clone();
        let hash_ms = t_hash.elapsed().as_secs_f64() * 1e3;
        let t_parse = std::time::Instant::now();
        let file = |name: &str| if reg.path.is_dir() { reg.path.join(name) } else { reg.path.clone() };
        let (data, rank) = match reg.kind {
            ModuleKind::Lora => {
                let (d, info) = super::lora::load_peft_lora_from(&reg.path, &self.base, Some(&bytes))?;
                (ModuleData::Deltas(Arc::new(d)), Some(info.rank))
            }
            ModuleKind::Poly => {
                let p = super::poly::load_peft_poly_from(&reg.path, &self.base, Some(&bytes))?;
                let r = p.rank();
                (ModuleData::Poly(Arc::new(p)), Some(r))
            }
            ModuleKind::SparseDiff => {
                (ModuleData::Deltas(Arc::new(super::sft::load_pytorch_diff(&file("pytorch_diff.bin"), &self.base)?)), None)
            }
            ModuleKind::SparseNative => (
                ModuleData::Deltas(Arc::new(super::sft::load_sparse_safetensors(&file("sparse_delta.safetensors"), &self.base)?)),
                None,
            ),
            ModuleKind::TaskVector => {
                (ModuleData::Deltas(Arc::new(super::dense::load_task_vector(&file("task_vector.safetensors"), &self.base)?)), None)
            }
            ModuleKind::Merge => {
                let recipe = super::merge::load_recipe(&file("recipe.json"))?;
                let out = super::merge::merge(&recipe, &*self.base_weight, &self.base)?;
                tracing::info!(module = %reg.id, report = ?out.report, "merged module built");
                (ModuleData::Deltas(Arc::new(out.deltas)), None)
            }
        };
        if let Some(r) = rank.filter(|&r| r > self.limits.max_rank) {
            return Err(AdapterError::Limit(format!("module `{}` has rank {r}; max_adapter_rank is {}", reg.id, self.limits.max_rank)));
        }
        let parse_ms = t_parse.elapsed().as_secs_f64() * 1e3;
        let t_prep = std::time::Instant::now();
        let data = match data {
            ModuleData::Deltas(d) => ModuleData::Deltas(self.finish(d)?),
            poly => poly,
        };
        let prepare_ms = t_prep.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(module = %reg.id, hash_ms, parse_ms, prepare_ms, "module loaded");
        Ok(LoadedModule { id: reg.id.clone(), kind: reg.kind, version, data, rank })
    }

    /// Readies parsed deltas for the model: on the CPU, the kernels' host layout; on a GPU, the
    /// tensors moved to its memory.
    fn finish(&self, d: Arc<ModuleDeltas>) -> Result<Arc<ModuleDeltas>, AdapterError> {
        if self.device.is_cpu() {
            d.prepare_host(self.compact_factors)?;
            Ok(d)
        } else {
            Ok(Arc::new(d.to_device(&self.device)?))
        }
    }

    /// Every file of the module (following symlinks) must lie inside the adapter root.
    fn check_confined(&self, reg: &Registration) -> Result<(), AdapterError> {
        let root = self.registry.root().path();
        let entries: Vec<std::path::PathBuf> = if reg.path.is_dir() {
            std::fs::read_dir(&reg.path)
                .map_err(|e| AdapterError::Io { path: reg.path.clone(), reason: e.to_string() })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect()
        } else {
            vec![reg.path.clone()]
        };
        for p in entries {
            let real = p.canonicalize().map_err(|e| AdapterError::Io { path: p.clone(), reason: e.to_string() })?;
            if !real.starts_with(root) {
                return Err(AdapterError::BadPath {
                    id: reg.id.clone(),
                    reason: format!("{} links outside the adapter root", p.display()),
                });
            }
        }
        Ok(())
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
        let mix = self.cache.get_or_load(&key, || {
            let d = p.mix(routing).map_err(|e| match e {
                AdapterError::UnknownTask { task, n_tasks, .. } => AdapterError::UnknownTask { module: id.into(), task, n_tasks },
                other => other,
            })?;
            Ok(LoadedModule {
                id: format!("{id}[{rkey}]"),
                kind: ModuleKind::Poly,
                version: short_hash(key.as_bytes()),
                data: ModuleData::Deltas(self.finish(Arc::new(d))?),
                rank: Some(p.rank()),
            })
        })?;
        Ok((inv, mix))
    }

    /// Resolves and pins a request's composition.
    pub fn resolve(&self, spec: &CompositionSpec) -> Result<Composition, AdapterError> {
        let n = spec.deltas.len() + spec.route.is_some() as usize;
        if n > self.limits.max_components {
            return Err(AdapterError::Limit(format!("{n} components; max_components is {}", self.limits.max_components)));
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
                return Err(AdapterError::WrongKind { module: d.id.clone(), kind: m.kind.as_str(), usage: "as a delta (route it with a task id)" });
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

/// Dense base weight of a parameter from the loaded model, on the host (merges run there).
pub fn base_weight_of(model: &Llama, t: Target) -> Result<Tensor, AdapterError> {
    let w = match t {
        Target::Linear(id) => model
            .linear(id)
            .ok_or_else(|| AdapterError::Composition(format!("the base model has no {id}")))?
            .weight()
            .to_dense()
            .map_err(AdapterError::tensor),
        Target::Embedding => Ok(model.embed.clone()),
        Target::LmHead => model.lm_head.to_dense().map_err(AdapterError::tensor),
    }?;
    w.to_device(&candle_core::Device::Cpu).map_err(AdapterError::tensor)
}

fn short_hash(b: &[u8]) -> String {
    hex::encode(&Sha256::digest(b)[..8])
}

/// Total size of a module's files.
fn module_bytes(path: &Path) -> Result<u64, AdapterError> {
    let mut total = 0;
    // Symlinks followed: a linked file counts with its real size.
    for f in module_files(path)? {
        total += std::fs::metadata(&f).map_err(|e| AdapterError::Io { path: f.clone(), reason: e.to_string() })?.len();
    }
    Ok(total)
}

/// BLAKE3 over the module's files (names and contents, sorted by name): the module's version.
/// BLAKE3 rather than SHA-256 because it hashes several times faster on the cold-load path while
/// staying a cryptographic hash.
pub fn content_hash(path: &Path) -> Result<String, AdapterError> {
    Ok(ModuleBytes::read(path, |_| false)?.version.clone())
}

/// A module's files read once for loading: the version hash over all of them and, for the files
/// the loader will parse, their bytes, so the hash names exactly the bytes parsed (no second
/// read, and no window in which a swapped file is parsed under the old version).
pub struct ModuleBytes {
    pub version: String,
    kept: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
}

impl ModuleBytes {
    /// Reads and hashes every file of the module; keeps the bytes of the files `keep` selects.
    pub fn read(path: &Path, keep: impl Fn(&Path) -> bool) -> Result<Self, AdapterError> {
        use std::io::Read;
        let mut h = blake3::Hasher::new();
        let mut kept = std::collections::BTreeMap::new();
        let mut buf = Vec::new();
        for f in module_files(path)? {
            let name = f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name);
            let io = |e: std::io::Error| AdapterError::Io { path: f.clone(), reason: e.to_string() };
            let mut file = std::fs::File::open(&f).map_err(io)?;
            if keep(&f) {
                let mut bytes = take_buffer(file.metadata().map(|m| m.len() as usize).unwrap_or(0));
                file.read_to_end(&mut bytes).map_err(io)?;
                h.update_rayon(&bytes);
                kept.insert(f.clone(), bytes);
            } else {
                // Large blocks let BLAKE3 hash many chunks at once (SIMD, and both cores).
                buf.resize(4 << 20, 0);
                loop {
                    let n = file.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    h.update_rayon(&buf[..n]);
                }
            }
        }
        Ok(Self { version: hex::encode(&h.finalize().as_bytes()[..8]), kept })
    }

    /// The bytes of `file`, if they were kept.
    pub fn get(&self, file: &Path) -> Option<&[u8]> {
        self.kept.get(file).map(|v| v.as_slice())
    }
}

impl Drop for ModuleBytes {
    fn drop(&mut self) {
        for (_, b) in std::mem::take(&mut self.kept) {
            give_buffer(b);
        }
    }
}

/// Read buffers kept between module loads: a fresh 10 MB buffer costs more in page faults than
/// reading the file into it (measured 4.5 ms vs about 1.5 ms for a 9.8 MB LoRA).
static READ_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// At most this many buffers of at most this many bytes are kept.
const KEPT_BUFFERS: usize = 2;
const KEPT_BUFFER_BYTES: usize = 64 << 20;

fn take_buffer(len: usize) -> Vec<u8> {
    let mut pool = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = match pool.iter().position(|b| b.capacity() >= len) {
        Some(i) => pool.swap_remove(i),
        None => pool.pop().unwrap_or_default(),
    };
    drop(pool);
    b.clear();
    b.reserve(len);
    b
}

fn give_buffer(b: Vec<u8>) {
    if b.capacity() <= KEPT_BUFFER_BYTES {
        let mut pool = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEPT_BUFFERS {
            pool.push(b);
        }
    }
}

/// Parses `ID[@SCALE]` (scale defaults to 1; the last `@` separates).
pub fn parse_delta_ref(s: &str) -> Result<DeltaRef, AdapterError> {
    let (id, scale) = match s.rsplit_once('@') {
        Some((id, sc)) => {
            let scale: f32 = sc.parse().map_err(|_| AdapterError::Composition(format!("`{s}`: scale `{sc}` is not a number")))?;
            (id, scale)
        }
        None => (s, 1.0),
    };
    if id.is_empty() {
        return Err(AdapterError::Composition(format!("`{s}`: empty module id")));
    }
    if !scale.is_finite() {
        return Err(AdapterError::Composition(format!("`{s}`: scale must be finite")));
    }
    Ok(DeltaRef { id: id.into(), scale })
}

/// Parses `ID:TASK` (an integer task id) or `ID:W1,W2,...` (explicit routing weights).
pub fn parse_route(s: &str) -> Result<(String, Routing), AdapterError> {
    let (id, r) = s
        .rsplit_once(':')
        .ok_or_else(|| AdapterError::Composition(format!("`{s}`: expected INVENTORY:TASK or INVENTORY:W1,W2,...")))?;
    if id.is_empty() {
        return Err(AdapterError::Composition(format!("`{s}`: empty inventory id")));
    }
    if let Ok(t) = r.parse::<i64>() {
        return Ok((id.into(), Routing::Task(t)));
    }
    let w: Result<Vec<f32>, _> = r.split(',').map(|x| x.trim().parse::<f32>()).collect();
    match w {
        Ok(w) if !w.is_empty() => Ok((id.into(), Routing::Weights(w))),
        _ => Err(AdapterError::Composition(format!("`{s}`: `{r}` is neither a task id nor a list of weights"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs() {
        assert_eq!(parse_delta_ref("a/b@-0.5").unwrap(), DeltaRef { id: "a/b".into(), scale: -0.5 });
        assert_eq!(parse_delta_ref("lora").unwrap().scale, 1.0);
        assert!(parse_delta_ref("x@nan").is_err());
        assert!(parse_delta_ref("x@abc").is_err());
        assert_eq!(parse_route("poly:2").unwrap(), ("poly".into(), Routing::Task(2)));
        assert_eq!(parse_route("p:0.5,0.5").unwrap().1, Routing::Weights(vec![0.5, 0.5]));
        assert!(parse_route("poly").is_err());
        assert!(parse_route("poly:x").is_err());
    }
}
