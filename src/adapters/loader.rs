//! Loading one module version: the kind dispatch from a registration to its format's loader,
//! the limits a module must respect, the Poly mixtures derived from an inventory, and the last
//! step that readies deltas for the model's device.
//!
//! Invariants: a module is loaded only if every file it has lies inside the adapter root (after
//! symlink resolution) and within `max_file_bytes`; its version is the content hash of exactly
//! the bytes parsed; parser panics become errors ([`super::error::guard_parser`]); a loaded
//! module is immutable.
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;

use super::cache::Weighted;
use super::error::AdapterError;
use super::formats::poly::{PolyInventory, Routing};
use super::module_deltas::ModuleDeltas;
use super::registry::{ModuleKind, Registration};
use super::source::{module_bytes, short_hash, ModuleBytes};
use super::target::{BaseShapes, Target};
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
    /// Bytes of the files it was loaded from (a merge's components included; 0 for a Poly
    /// mixture, derived from its inventory in memory).
    pub file_bytes: u64,
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

/// Turns registrations into loaded modules for one base model.
pub struct ModuleLoader {
    pub(crate) base: BaseShapes,
    base_weight: BaseWeightFn,
    pub(crate) limits: AdapterLimits,
    /// Hold low-rank factors (ranks up to 128) as 8-bit blocks in the CPU kernels (set for an int8 base).
    pub(crate) compact_factors: bool,
    /// The model's device. Modules are parsed, merged and mixed on the host; their finished
    /// low-rank and dense tensors are then moved here once, at load (sparse deltas stay on the
    /// host, see [`ModuleDeltas::to_device`]).
    pub(crate) device: candle_core::Device,
}

impl ModuleLoader {
    pub fn new(base: BaseShapes, base_weight: BaseWeightFn) -> Self {
        Self { base, base_weight, limits: AdapterLimits::default(), compact_factors: false, device: candle_core::Device::Cpu }
    }

    /// Loads the module `reg` names; `root` is the adapter root its files must stay inside.
    pub fn load(&self, reg: &Registration, root: &Path) -> Result<LoadedModule, AdapterError> {
        super::error::guard_parser(&reg.path, "module", || self.load_unguarded(reg, root))
    }

    /// The files and folders a merge reads besides the top-level files of its own folder (which
    /// the module's own fingerprint and size already cover): nested component files and
    /// component folders. Empty for every other kind.
    pub fn merge_sources(reg: &Registration) -> Result<Vec<std::path::PathBuf>, AdapterError> {
        if reg.kind != ModuleKind::Merge {
            return Ok(Vec::new());
        }
        let recipe_path = if reg.path.is_dir() { reg.path.join("recipe.json") } else { reg.path.clone() };
        let recipe = super::merge::load_recipe(&recipe_path)?;
        let own = if reg.path.is_dir() { reg.path.as_path() } else { reg.path.parent().unwrap_or(Path::new("")) };
        Ok(recipe.sources().into_iter().filter(|p| p.is_dir() || p.parent() != Some(own)).collect())
    }

    fn load_unguarded(&self, reg: &Registration, root: &Path) -> Result<LoadedModule, AdapterError> {
        check_confined(reg, root)?;
        let sources = Self::merge_sources(reg)?;
        let mut size = module_bytes(&reg.path)?;
        for s in &sources {
            size += module_bytes(s)?;
        }
        if size > self.limits.max_file_bytes {
            return Err(AdapterError::Limit(format!(
                "module `{}` has {size} bytes of files; max_adapter_file_bytes is {}",
                reg.id, self.limits.max_file_bytes
            )));
        }
        let t_read = std::time::Instant::now();
        // LoRA and Poly tensors are parsed from the very bytes hashed.
        let bytes = ModuleBytes::read(&reg.path, |f| {
            matches!(reg.kind, ModuleKind::Lora | ModuleKind::Poly) && f.file_name().is_some_and(|n| n == "adapter_model.safetensors")
        })?;
        let read_ms = t_read.elapsed().as_secs_f64() * 1e3;
        let t_parse = std::time::Instant::now();
        // The version is hashed while the files are parsed: both read the same kept bytes, and
        // a cold load waits on the longer of the two rather than on their sum.
        let (version, parsed) = rayon::join(|| bytes.version(), || self.parse(reg, &bytes));
        let (mut version, (data, rank)) = (version?, parsed?);
        if !sources.is_empty() {
            // A merge's version names its components' contents too: an edit inside a component
            // folder is a new version, never the old merge served on.
            let mut all = version.clone();
            for s in &sources {
                all.push_str(&super::source::content_hash(s)?);
            }
            version = short_hash(all.as_bytes());
        }
        if let Some(r) = rank.filter(|&r| r > self.limits.max_rank) {
            return Err(AdapterError::Limit(format!("module `{}` has rank {r}; max_adapter_rank is {}", reg.id, self.limits.max_rank)));
        }
        let hash_parse_ms = t_parse.elapsed().as_secs_f64() * 1e3;
        let t_prep = std::time::Instant::now();
        let data = match data {
            ModuleData::Deltas(d) => ModuleData::Deltas(self.finish(d)?),
            poly => poly,
        };
        let prepare_ms = t_prep.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(module = %reg.id, read_ms, hash_parse_ms, prepare_ms, "module loaded");
        Ok(LoadedModule { id: reg.id.clone(), kind: reg.kind, version, data, rank, file_bytes: size })
    }

    /// Parses module `reg`'s files (the kept ones from `bytes`) into its data and rank.
    fn parse(&self, reg: &Registration, bytes: &ModuleBytes) -> Result<(ModuleData, Option<usize>), AdapterError> {
        let file = |name: &str| if reg.path.is_dir() { reg.path.join(name) } else { reg.path.clone() };
        Ok(match reg.kind {
            ModuleKind::Lora => {
                // On the CPU with compact factors, packed straight from the file's bytes.
                let direct = self.compact_factors && self.device.is_cpu();
                let (d, info) = super::formats::lora::load_peft_lora_from(&reg.path, &self.base, Some(bytes), direct)?;
                (ModuleData::Deltas(Arc::new(d)), Some(info.rank))
            }
            ModuleKind::Poly => {
                let p = super::formats::poly::load_peft_poly_from(&reg.path, &self.base, Some(bytes))?;
                let r = p.rank();
                (ModuleData::Poly(Arc::new(p)), Some(r))
            }
            ModuleKind::SparseDiff => {
                (ModuleData::Deltas(Arc::new(super::formats::sft::load_pytorch_diff(&file("pytorch_diff.bin"), &self.base)?)), None)
            }
            ModuleKind::SparseNative => (
                ModuleData::Deltas(Arc::new(super::formats::sft::load_sparse_safetensors(&file("sparse_delta.safetensors"), &self.base)?)),
                None,
            ),
            ModuleKind::TaskVector => (
                ModuleData::Deltas(Arc::new(super::formats::task_vector::load_task_vector(&file("task_vector.safetensors"), &self.base)?)),
                None,
            ),
            ModuleKind::Merge => {
                let recipe = super::merge::load_recipe(&file("recipe.json"))?;
                let out = super::merge::merge(&recipe, &*self.base_weight, &self.base)?;
                tracing::info!(module = %reg.id, report = ?out.report, "merged module built");
                (ModuleData::Deltas(Arc::new(out.deltas)), None)
            }
        })
    }

    /// Readies parsed deltas for the model: on the CPU, the kernels' host layout; on a GPU, the
    /// tensors moved to its memory.
    fn finish(&self, d: Arc<ModuleDeltas>) -> Result<Arc<ModuleDeltas>, AdapterError> {
        if self.device.is_cpu() {
            let owned = Arc::try_unwrap(d).unwrap_or_else(|shared| (*shared).clone());
            Ok(Arc::new(owned.into_host(self.compact_factors)?))
        } else {
            Ok(Arc::new(d.to_device(&self.device)?))
        }
    }

    /// The mixture of inventory `p` (module `id`, version key `key`) for `routing`, ready for
    /// the model; `rkey` names the routing in the mixture's id.
    pub fn mix(&self, id: &str, p: &PolyInventory, routing: &Routing, key: &str, rkey: &str) -> Result<LoadedModule, AdapterError> {
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
            file_bytes: 0,
        })
    }
}

/// Every file of the module (following symlinks) must lie inside the adapter root.
fn check_confined(reg: &Registration, root: &Path) -> Result<(), AdapterError> {
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
            return Err(AdapterError::BadPath { id: reg.id.clone(), reason: format!("{} links outside the adapter root", p.display()) });
        }
    }
    Ok(())
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
