//! PEFT helpers shared by the LoRA and Poly formats: reading `adapter_config.json`, loading
//! `adapter_model.safetensors` / `.bin` tensors, and selecting the base modules a config targets
//! (`target_modules`, `exclude_modules`, `layers_to_transform`, suffix matching as PEFT does it).
//!
//! Invariants: a tensor file is parsed from the very bytes the module's version hashed when they
//! are given ([`ModuleBytes`]); pickled `.bin` files pass [`super::pickle_guard`] before candle
//! reads them; every error names the file.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::adapters::error::AdapterError;
use crate::adapters::source::ModuleBytes;
use crate::adapters::target::{BaseShapes, Target};
use crate::model::linear::LinearId;

pub(crate) fn suffix_match(module: &str, key: &str) -> bool {
    module == key || module.strip_suffix(key).is_some_and(|p| p.ends_with('.'))
}

pub(crate) fn malformed(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Malformed { path: path.into(), reason: reason.into() }
}

pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Unsupported { path: path.into(), reason: reason.into() }
}

/// Reads and parses a JSON config file.
pub(crate) fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, AdapterError> {
    let bytes = crate::adapters::source::read_regular(path)?;
    serde_json::from_slice(&bytes).map_err(|e| malformed(path, format!("invalid adapter config: {e}")))
}

/// True when a JSON value is present and not empty (`null`, `[]`, `{}`, `""` count as absent).
pub(crate) fn present(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// The value when [`present`].
pub(crate) fn given(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|_| present(v))
}

/// Loads `adapter_model.safetensors` (else `adapter_model.bin`) of `dir` as CPU tensors; returns
/// the file used. Truncated or corrupt files are `Malformed` errors naming the file.
pub(crate) fn load_adapter_tensors(dir: &Path, read: Option<&ModuleBytes>) -> Result<(PathBuf, Vec<(String, Tensor)>), AdapterError> {
    let mut local = Vec::new();
    let (file, tensors) = adapter_tensors(dir, read, &mut local)?;
    let tensors = load_all(tensors, &file)?;
    Ok((file, tensors))
}

/// One tensor of an adapter file: a view of the safetensors bytes (nothing copied yet), or a
/// tensor of a `.bin` checkpoint.
pub(crate) enum AdapterTensor<'a> {
    View(safetensors::tensor::TensorView<'a>),
    Loaded(Tensor),
}

impl AdapterTensor<'_> {
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::View(v) => v.shape(),
            Self::Loaded(t) => t.dims(),
        }
    }

    /// The values as a contiguous f32 CPU tensor (copied out of the file's bytes for a view).
    pub fn to_tensor(&self, file: &Path, name: &str) -> Result<Tensor, AdapterError> {
        match self {
            Self::View(v) => to_f32(&load_view(v, file)?, file, name),
            Self::Loaded(t) => to_f32(t, file, name),
        }
    }

    /// Whether [`Self::with_f32`] reads it: an f32, f16 or bf16 view.
    pub fn is_float_view(&self) -> bool {
        use safetensors::Dtype;
        matches!(self, Self::View(v) if matches!(v.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16))
    }

    /// Runs `f` on the values of an f32, f16 or bf16 view as f32, row-major: in place for an
    /// aligned little-endian f32 view, else converted into `scratch`. `None` for any other dtype
    /// or a loaded tensor (read those with [`Self::to_tensor`]).
    pub fn with_f32<R>(&self, scratch: &mut Vec<f32>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        use safetensors::Dtype;
        let Self::View(v) = self else { return None };
        let data = v.data();
        let convert = |scratch: &mut Vec<f32>, width: usize, one: &dyn Fn(&[u8]) -> f32| {
            scratch.clear();
            scratch.extend(data.chunks_exact(width).map(one));
        };
        let values: &[f32] = match v.dtype() {
            Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(data) {
                Ok(vals) if cfg!(target_endian = "little") => vals,
                _ => {
                    convert(scratch, 4, &|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    scratch
                }
            },
            Dtype::F16 => {
                convert(scratch, 2, &|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                scratch
            }
            Dtype::BF16 => {
                convert(scratch, 2, &|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
                scratch
            }
            _ => return None,
        };
        Some(f(values))
    }
}

/// The tensors of `adapter_model.safetensors` (as views of its bytes: from `read` when it kept
/// them, else read into `local`) or else of `adapter_model.bin`, in file order; returns the file
/// used.
pub(crate) fn adapter_tensors<'a>(
    dir: &Path,
    read: Option<&'a ModuleBytes>,
    local: &'a mut Vec<u8>,
) -> Result<(PathBuf, Vec<(String, AdapterTensor<'a>)>), AdapterError> {
    let st = dir.join("adapter_model.safetensors");
    let bytes = match read.and_then(|r| r.get(&st)) {
        Some(b) => Some(b),
        None if st.exists() => {
            *local = crate::adapters::source::read_regular(&st)?;
            Some(local.as_slice())
        }
        None => None,
    };
    if let Some(bytes) = bytes {
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| unreadable(&st, e))?;
        let views = file.tensors().into_iter().map(|(n, v)| (n, AdapterTensor::View(v))).collect();
        return Ok((st, views));
    }
    let bin = dir.join("adapter_model.bin");
    if bin.exists() {
        let v = crate::adapters::error::guard_parser(&bin, "PyTorch checkpoint", || read_pth(&bin))?;
        return Ok((bin, v.into_iter().map(|(n, t)| (n, AdapterTensor::Loaded(t))).collect()));
    }
    Err(AdapterError::Io { path: dir.into(), reason: "no adapter_model.safetensors or adapter_model.bin in the adapter folder".into() })
}

/// Every tensor as a CPU tensor, converted in parallel (what candle's `load_buffer` does one
/// tensor after another; a cold load waits on it), in file order.
fn load_all(tensors: Vec<(String, AdapterTensor<'_>)>, file: &Path) -> Result<Vec<(String, Tensor)>, AdapterError> {
    use rayon::prelude::*;
    tensors
        .into_par_iter()
        .map(|(name, t)| match t {
            AdapterTensor::View(v) => Ok((name, load_view(&v, file)?)),
            AdapterTensor::Loaded(t) => Ok((name, t)),
        })
        .collect()
}

/// A safetensors view of `file` as a CPU tensor of its own dtype (its values copied).
fn load_view(v: &safetensors::tensor::TensorView<'_>, file: &Path) -> Result<Tensor, AdapterError> {
    use candle_core::safetensors::Load;
    v.load(&Device::Cpu).map_err(|e| unreadable(file, e))
}

/// The error for a safetensors file that cannot be parsed.
fn unreadable(file: &Path, e: impl std::fmt::Display) -> AdapterError {
    malformed(file, format!("not a readable safetensors file: {e}"))
}

/// Reads every tensor of a torch.save zip checkpoint (PEFT `adapter_model.bin`) the way candle's
/// `pickle::read_all` does (every `*data.pkl` entry, a `__torch__.Module` unwrapped, dict entries
/// built by `_rebuild_tensor_v2` kept, others skipped, contiguous or Fortran-ordered storages), but
/// from one read of the archive: each pickle goes through [`super::pickle_guard::parse`] (pre-scan,
/// then candle's reader on the very bytes scanned), and each tensor's claimed size is checked
/// against its storage entry and the file before anything is allocated from it.
fn read_pth(bin: &Path) -> Result<Vec<(String, Tensor)>, AdapterError> {
    use candle_core::pickle::Object;
    use std::io::Read;
    let bad = |reason: String| malformed(bin, format!("not a readable PyTorch checkpoint: {reason}"));
    let file = crate::adapters::source::open_regular(bin)?;
    let file_len = file.metadata().map_err(|e| AdapterError::Io { path: bin.into(), reason: e.to_string() })?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(format!("not a zip archive ({e})")))?;
    let pickles: Vec<String> = zip.file_names().filter(|n| n.ends_with("data.pkl")).map(String::from).collect();
    // By name, the last entry of a name winning (as candle's map of tensor infos).
    let mut infos = BTreeMap::new();
    for entry in pickles {
        let bytes = super::pickle_guard::read_zip_entry(&mut zip, &entry, super::pickle_guard::MAX_PICKLE_BYTES, bin)?;
        let obj = match super::pickle_guard::parse(bin, &entry, &bytes)? {
            Object::Build { callable, args } => match *callable {
                Object::Reduce { callable, .. } if matches!(&*callable, Object::Class { module_name, class_name } if module_name == "__torch__" && class_name == "Module") => {
                    *args
                }
                _ => continue,
            },
            obj => obj,
        };
        let Object::Dict(items) = obj else { continue };
        let dir_name = PathBuf::from(entry.strip_suffix(".pkl").unwrap_or(&entry));
        for (name, value) in items {
            // candle skips an entry it cannot read as a tensor (and so do we, silently).
            if let Ok(Some(info)) = value.into_tensor_info(name, &dir_name) {
                infos.insert(info.name.clone(), info);
            }
        }
    }
    let mut out = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let layout = &info.layout;
        let dims = layout.dims().to_vec();
        let fortran = layout.is_fortran_contiguous();
        if !layout.is_contiguous() && !fortran {
            return Err(bad(format!("tensor `{name}` has a non-contiguous layout (size {dims:?}, stride {:?})", layout.stride())));
        }
        let mut f = zip.by_name(&info.path).map_err(|e| bad(format!("tensor `{name}`: storage `{}`: {e}", info.path)))?;
        let start = layout.start_offset() as u64;
        let n = dims.iter().try_fold(info.dtype.size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64));
        let n = match n.filter(|&n| start.checked_add(n).is_some_and(|end| end <= f.size() && end <= file_len)) {
            Some(n) => n,
            None => return Err(malformed(bin, format!("tensor `{name}` claims more data than the file holds"))),
        };
        std::io::copy(&mut f.by_ref().take(start), &mut std::io::sink()).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let mut buf = Vec::with_capacity(n as usize);
        f.take(n).read_to_end(&mut buf).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        if buf.len() as u64 != n {
            return Err(malformed(bin, format!("tensor `{name}`: its storage `{}` is truncated", info.path)));
        }
        let t = if dims.len() > 1 && fortran {
            // Stored column-major: read as the reversed shape, then transpose back (as candle does).
            let reversed: Vec<usize> = dims.iter().rev().copied().collect();
            let order: Vec<usize> = (0..dims.len()).rev().collect();
            Tensor::from_raw_buffer(&buf, info.dtype, &reversed, &Device::Cpu).and_then(|t| t.permute(order))
        } else {
            Tensor::from_raw_buffer(&buf, info.dtype, &dims, &Device::Cpu)
        };
        let t = t.map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// A tensor as float32, contiguous, erroring with the file and tensor name.
pub(crate) fn to_f32(t: &Tensor, file: &Path, name: &str) -> Result<Tensor, AdapterError> {
    t.to_dtype(DType::F32).and_then(|t| t.contiguous()).map_err(|e| malformed(file, format!("tensor `{name}`: {e}")))
}

/// How `target_modules` / `exclude_modules` name modules.
#[derive(Debug, Clone)]
pub(crate) enum TargetSpec {
    /// A list: a module matches when its path equals an entry or ends with `.entry`.
    Names(Vec<String>),
    /// PEFT's `"all-linear"`: every linear layer but the output head.
    AllLinear,
    /// A string without regex operators other than `.`: full match, `.` matching any character.
    Literal(String),
}

impl TargetSpec {
    /// Parses the JSON value of `key` in the config at `cfg`.
    pub(crate) fn parse(v: &Value, key: &str, cfg: &Path) -> Result<Self, AdapterError> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(Self::AllLinear),
            Value::String(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') => Ok(Self::Literal(s.clone())),
            Value::String(s) => Err(unsupported(
                cfg,
                format!("`{key}` is a regular expression (`{s}`); regex targets are not supported, list the module names instead"),
            )),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Self::Names)
                .ok_or_else(|| malformed(cfg, format!("`{key}` must be a list of strings or a string"))),
            _ => Err(malformed(cfg, format!("`{key}` must be a list of strings or a string"))),
        }
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Self::Names(ns) => ns.iter().any(|n| suffix_match(module, n)),
            Self::AllLinear => module != "lm_head",
            Self::Literal(p) => p.len() == module.len() && p.bytes().zip(module.bytes()).all(|(a, b)| a == b'.' || a == b),
        }
    }
}

/// Which base modules a PEFT config adapts.
#[derive(Debug, Clone)]
pub(crate) struct Selector {
    pub(crate) targets: TargetSpec,
    pub(crate) exclude: Option<TargetSpec>,
    /// `layers_to_transform`.
    pub(crate) layers: Option<Vec<usize>>,
}

impl Selector {
    /// Builds from the raw `target_modules` and `exclude_modules` values.
    pub(crate) fn new(targets: &Option<Value>, exclude: &Option<Value>, cfg: &Path) -> Result<Self, AdapterError> {
        let targets = given(targets).ok_or_else(|| malformed(cfg, "`target_modules` is missing or empty"))?;
        let targets = TargetSpec::parse(targets, "target_modules", cfg)?;
        let exclude = given(exclude).map(|v| TargetSpec::parse(v, "exclude_modules", cfg)).transpose()?;
        Ok(Self { targets, exclude, layers: None })
    }

    /// Whether the module at `path` (e.g. `model.layers.3.self_attn.q_proj`) is adapted.
    pub(crate) fn selects(&self, path: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(path)) || !self.targets.matches(path) {
            return false;
        }
        match &self.layers {
            None => true,
            Some(ls) => layer_index(path).is_some_and(|i| ls.contains(&i)),
        }
    }
}

/// The index PEFT reads from `.<name>.<digits>.` in a module path.
fn layer_index(path: &str) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    (1..parts.len().saturating_sub(1)).rev().find_map(|i| parts[i].parse().ok())
}

/// Every adaptable linear module of the base model, with its path.
pub(crate) fn candidate_modules(base: &BaseShapes) -> Vec<(String, Target)> {
    let mut v = Vec::new();
    for layer in 0..base.cfg.num_hidden_layers {
        for proj in base.projections() {
            let path = format!("model.layers.{layer}.{}.{}", proj.hf_parent(), proj.hf_name());
            v.push((path, Target::Linear(LinearId { layer, proj })));
        }
    }
    if base.shape(Target::LmHead).is_some() {
        v.push(("lm_head".into(), Target::LmHead));
    }
    v
}

/// The base parameter a module path adapts (linear layers and an untied head only).
pub(crate) fn module_target(module: &str, file: &Path, base: &BaseShapes) -> Result<Target, AdapterError> {
    let unknown = || AdapterError::UnknownTarget { path: file.into(), target: module.into() };
    match Target::from_hf_name(&format!("{module}.weight")) {
        Some(Target::Embedding) => Err(unsupported(file, format!("low-rank factors on the embedding `{module}`"))),
        Some(t) if base.shape(t).is_some() => Ok(t),
        _ => Err(unknown()),
    }
}

/// Checks that the file holds tensors for exactly the modules the config selects.
pub(crate) fn check_coverage(sel: &Selector, base: &BaseShapes, found: &BTreeSet<String>, file: &Path) -> Result<(), AdapterError> {
    if found.is_empty() {
        return Err(malformed(file, "the file holds no adapter tensors"));
    }
    if let Some(m) = found.iter().find(|m| !sel.selects(m)) {
        return Err(malformed(
            file,
            format!("holds tensors for `{m}`, which adapter_config.json does not select (target_modules / exclude_modules / layers_to_transform)"),
        ));
    }
    if let Some((m, _)) = candidate_modules(base).into_iter().find(|(m, _)| sel.selects(m) && !found.contains(m)) {
        return Err(malformed(file, format!("adapter_config.json selects `{m}` but the file has no tensors for it")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_patterns_match_whole_components() {
        assert!(suffix_match("model.layers.1.self_attn.q_proj", "q_proj"));
        assert!(suffix_match("model.layers.1.self_attn.q_proj", "layers.1.self_attn.q_proj"));
        assert!(!suffix_match("model.layers.1.self_attn.q_proj", "_proj"));
        assert!(!suffix_match("model.layers.11.self_attn.q_proj", "1.self_attn.q_proj"));
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_index("lm_head"), None);
        let lit = TargetSpec::Literal("model.layers.0.self_attn.q_proj".into());
        assert!(lit.matches("model.layers.0.self_attn.q_proj") && !lit.matches("model.layers.0.self_attn.k_proj"));
        assert!(TargetSpec::AllLinear.matches("model.layers.0.mlp.down_proj") && !TargetSpec::AllLinear.matches("lm_head"));
    }
}
