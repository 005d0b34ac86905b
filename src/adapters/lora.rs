//! PEFT LoRA adapters: `adapter_config.json` plus `adapter_model.safetensors` (or `.bin`) become a
//! [`ModuleDeltas`] of low-rank factors. Also holds the PEFT helpers Poly shares (config reading,
//! tensor loading, target selection).
//!
//! Invariants: every delta is `MatrixDelta::LowRank { a: [r, in], b: [out, r] }`, float32,
//! contiguous, on the CPU, with the module scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA,
//! `r` and `alpha` per module from `rank_pattern` / `alpha_pattern`) folded into `b`. The modules in
//! the file are exactly the base modules the config selects. Anything PEFT would compute
//! differently from `W + scale * B @ A` (DoRA, `modules_to_save`, biases, regex targets we cannot
//! evaluate, ...) is refused with an error naming the file, never approximated. Weights use the
//! Hugging Face layout, so no q/k row permutation happens here.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::delta::{BaseShapes, MatrixDelta, ModuleDeltas, Target};
use super::error::AdapterError;
use super::store::ModuleBytes;
use crate::model::linear::{LinearId, Proj};

/// Summary of a loaded LoRA adapter (listings, logs).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    /// Largest rank over the adapted modules.
    pub rank: usize,
    /// `lora_alpha` of the config (`alpha_pattern` may override it per module).
    pub alpha: f64,
    /// Names of the adapted projections (`q_proj`, ..., `lm_head`), sorted and deduplicated.
    pub targets: Vec<String>,
    /// Scaling is `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

#[derive(Debug, Deserialize)]
struct LoraConfig {
    peft_type: Option<String>,
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    use_rslora: Option<bool>,
    target_modules: Option<Value>,
    exclude_modules: Option<Value>,
    rank_pattern: Option<Ordered<usize>>,
    alpha_pattern: Option<Ordered<f64>>,
    layers_to_transform: Option<OneOrMany>,
    layers_pattern: Option<Value>,
    fan_in_fan_out: Option<bool>,
    use_dora: Option<bool>,
    modules_to_save: Option<Value>,
    bias: Option<String>,
    lora_bias: Option<bool>,
    layer_replication: Option<Value>,
    target_parameters: Option<Value>,
    trainable_token_indices: Option<Value>,
    alora_invocation_tokens: Option<Value>,
    use_qalora: Option<bool>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

/// A JSON object read in file order (PEFT takes the first matching pattern key).
#[derive(Debug, Default)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of module-name patterns")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Ordered<V>, M::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry()? {
                    v.push(e);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

impl<V: Copy> Ordered<V> {
    /// The value of the first key equal to `module` or to a whole-component dotted suffix of it.
    fn lookup(&self, module: &str) -> Option<V> {
        self.0.iter().find(|(k, _)| suffix_match(module, k)).map(|(_, v)| *v)
    }
}

fn suffix_match(module: &str, key: &str) -> bool {
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
    let bytes = std::fs::read(path).map_err(|e| AdapterError::Io { path: path.into(), reason: e.to_string() })?;
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
fn given(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|_| present(v))
}

/// Loads `adapter_model.safetensors` (else `adapter_model.bin`) of `dir` as CPU tensors; returns
/// the file used. Truncated or corrupt files are `Malformed` errors naming the file.
pub(crate) fn load_adapter_tensors(dir: &Path, read: Option<&ModuleBytes>) -> Result<(PathBuf, Vec<(String, Tensor)>), AdapterError> {
    let st = dir.join("adapter_model.safetensors");
    if let Some(bytes) = read.and_then(|r| r.get(&st)) {
        let tensors = safetensors_from_buffer(bytes, &st)?;
        return Ok((st, tensors));
    }
    if st.is_file() {
        let bytes = std::fs::read(&st).map_err(|e| AdapterError::Io { path: st.clone(), reason: e.to_string() })?;
        let tensors = safetensors_from_buffer(&bytes, &st)?;
        return Ok((st, tensors));
    }
    let bin = dir.join("adapter_model.bin");
    if bin.is_file() {
        let v = super::error::guard_parser(&bin, "PyTorch checkpoint", || read_pth(&bin))?;
        return Ok((bin, v));
    }
    Err(AdapterError::Io {
        path: dir.into(),
        reason: "no adapter_model.safetensors or adapter_model.bin in the adapter folder".into(),
    })
}

/// Every tensor of a safetensors buffer, converted to CPU tensors in parallel (what candle's
/// `load_buffer` does one tensor after another; a cold load waits on it), in file order.
fn safetensors_from_buffer(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>, AdapterError> {
    use candle_core::safetensors::Load;
    use rayon::prelude::*;
    let bad = |e: String| malformed(path, format!("not a readable safetensors file: {e}"));
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let views = st.tensors();
    let loaded: Vec<candle_core::Result<Tensor>> = views.par_iter().map(|(_, v)| v.load(&Device::Cpu)).collect();
    views
        .into_iter()
        .zip(loaded)
        .map(|((name, _), t)| t.map(|t| (name, t)).map_err(|e| bad(e.to_string())))
        .collect()
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
    let file = std::fs::File::open(bin).map_err(|e| AdapterError::Io { path: bin.into(), reason: e.to_string() })?;
    let file_len = file.metadata().map_err(|e| AdapterError::Io { path: bin.into(), reason: e.to_string() })?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(format!("not a zip archive ({e})")))?;
    let pickles: Vec<String> = zip.file_names().filter(|n| n.ends_with("data.pkl")).map(String::from).collect();
    // By name, the last entry of a name winning (as candle's map of tensor infos).
    let mut infos = BTreeMap::new();
    for entry in pickles {
        let mut bytes = Vec::new();
        zip.by_name(&entry)
            .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
            .map_err(|e| bad(format!("archive entry `{entry}`: {e}")))?;
        let obj = match super::pickle_guard::parse(bin, &entry, &bytes)? {
            Object::Build { callable, args } => match *callable {
                Object::Reduce { callable, .. }
                    if matches!(&*callable, Object::Class { module_name, class_name } if module_name == "__torch__" && class_name == "Module") =>
                {
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
            Value::String(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') => {
                Ok(Self::Literal(s.clone()))
            }
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
            Self::Literal(p) => {
                p.len() == module.len() && p.bytes().zip(module.bytes()).all(|(a, b)| a == b'.' || a == b)
            }
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
        for proj in Proj::ALL {
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
pub(crate) fn check_coverage(
    sel: &Selector,
    base: &BaseShapes,
    found: &BTreeSet<String>,
    file: &Path,
) -> Result<(), AdapterError> {
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Factor {
    A,
    B,
}

/// `[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight` -> (module, factor).
fn parse_lora_name(name: &str) -> Option<(String, Factor)> {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    [(".lora_A.", Factor::A), (".lora_B.", Factor::B)].into_iter().find_map(|(tag, f)| {
        let i = name.find(tag)?;
        let rest = &name[i + tag.len()..];
        let ok = rest == "weight" || rest.strip_suffix(".weight").is_some_and(|a| !a.is_empty() && !a.contains('.'));
        ok.then(|| (name[..i].to_string(), f))
    })
}

/// Error for a tensor that is not a LoRA factor.
fn foreign_tensor(name: &str, file: &Path) -> AdapterError {
    if name.contains("lora_embedding_") {
        unsupported(file, format!("`{name}`: LoRA on embedding layers"))
    } else if name.contains("lora_magnitude_vector") {
        unsupported(file, format!("`{name}`: DoRA magnitude vectors"))
    } else if name.contains(".lora_B.") && name.ends_with(".bias") {
        unsupported(file, format!("`{name}`: LoRA biases (lora_bias)"))
    } else {
        malformed(file, format!("unexpected tensor `{name}` (expected `<module>.lora_A.weight` / `.lora_B.weight`)"))
    }
}

/// Loads a PEFT LoRA adapter folder; every error names the file and the problem.
pub fn load_peft_lora(dir: &Path, base: &BaseShapes) -> Result<(ModuleDeltas, LoraInfo), AdapterError> {
    load_peft_lora_from(dir, base, None)
}

/// [`load_peft_lora`], parsing the tensor file from `read` when it holds its bytes.
pub fn load_peft_lora_from(dir: &Path, base: &BaseShapes, read: Option<&ModuleBytes>) -> Result<(ModuleDeltas, LoraInfo), AdapterError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: LoraConfig = read_config(&cfg_path)?;
    match cfg.peft_type.as_deref() {
        Some("LORA") => {}
        Some(other) => return Err(unsupported(&cfg_path, format!("peft_type `{other}` is not LORA"))),
        None => return Err(malformed(&cfg_path, "`peft_type` is missing")),
    }
    let refusals: [(bool, &str); 10] = [
        (cfg.use_dora == Some(true), "DoRA (`use_dora: true`)"),
        (present(&cfg.modules_to_save), "`modules_to_save` (fully trained extra modules)"),
        (cfg.bias.as_deref().is_some_and(|b| b != "none"), "`bias` other than \"none\""),
        (cfg.lora_bias == Some(true), "`lora_bias: true`"),
        (present(&cfg.layer_replication), "`layer_replication`"),
        (present(&cfg.target_parameters), "`target_parameters`"),
        (present(&cfg.trainable_token_indices), "`trainable_token_indices`"),
        (present(&cfg.alora_invocation_tokens), "activated LoRA (`alora_invocation_tokens`)"),
        (cfg.use_qalora == Some(true), "QALoRA (`use_qalora: true`)"),
        (cfg.r == 0, "`r: 0`"),
    ];
    if let Some((_, what)) = refusals.iter().find(|(bad, _)| *bad) {
        return Err(unsupported(&cfg_path, *what));
    }
    let mut sel = Selector::new(&cfg.target_modules, &cfg.exclude_modules, &cfg_path)?;
    if let Some(lp) = &cfg.layers_pattern {
        let ok = match lp {
            Value::Null => true,
            Value::String(s) => s == "layers",
            Value::Array(a) => a.is_empty() || a.iter().any(|v| v == "layers"),
            _ => false,
        };
        if !ok {
            return Err(unsupported(&cfg_path, format!("`layers_pattern` {lp} (llama layers are `layers`)")));
        }
    }
    sel.layers = cfg.layers_to_transform.map(|l| match l {
        OneOrMany::One(i) => vec![i],
        OneOrMany::Many(v) => v,
    });
    let (file, tensors) = load_adapter_tensors(dir, read)?;
    let mut pairs: BTreeMap<String, [Option<(String, Tensor)>; 2]> = BTreeMap::new();
    for (name, t) in tensors {
        let (module, f) = parse_lora_name(&name).ok_or_else(|| foreign_tensor(&name, &file))?;
        let slot = &mut pairs.entry(module.clone()).or_default()[f as usize];
        if slot.is_some() {
            return Err(malformed(&file, format!("two lora_{f:?} tensors for module `{module}`")));
        }
        *slot = Some((name, t));
    }
    let mut targets = BTreeMap::new();
    for module in pairs.keys() {
        targets.insert(module.clone(), module_target(module, &file, base)?);
    }
    check_coverage(&sel, base, &pairs.keys().cloned().collect(), &file)?;
    let fifo = cfg.fan_in_fan_out == Some(true);
    let rslora = cfg.use_rslora == Some(true);
    // Each module's factors are checked and scaled in parallel (a cold load waits on this); the
    // first failing module in name order is reported, as a sequential loop would.
    let one = |(module, [a, b]): (String, [Option<(String, Tensor)>; 2])| -> Result<(Target, usize, Tensor, Tensor), AdapterError> {
        let (an, a, bn, b) = match (a, b) {
            (Some((an, a)), Some((bn, b))) => (an, a, bn, b),
            (Some((have, _)), None) | (None, Some((have, _))) => {
                let f = if have.contains(".lora_A.") { "B" } else { "A" };
                return Err(malformed(&file, format!("module `{module}` has `{have}` but no lora_{f} tensor")));
            }
            (None, None) => unreachable!("a module is recorded with at least one factor"),
        };
        let target = targets[&module];
        let (out, inp) = base
            .shape(target)
            .ok_or_else(|| AdapterError::UnknownTarget { path: file.clone(), target: module.clone() })?;
        let (a, b) = orient(to_f32(&a, &file, &an)?, to_f32(&b, &file, &bn)?, (out, inp), fifo, &file, (&an, &bn))?;
        let (ra, rb) = (a.dim(0)?, b.dim(1)?);
        if ra != rb {
            return Err(malformed(&file, format!("`{an}` has rank {ra} but `{bn}` has rank {rb}")));
        }
        let rank = cfg.rank_pattern.as_ref().and_then(|p| p.lookup(&module)).unwrap_or(cfg.r);
        if ra != rank || rank == 0 {
            return Err(malformed(
                &file,
                format!("`{module}` has rank {ra} but adapter_config.json gives r={rank} (r / rank_pattern)"),
            ));
        }
        let alpha = cfg.alpha_pattern.as_ref().and_then(|p| p.lookup(&module)).unwrap_or(cfg.lora_alpha);
        let scaling = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        let b = (b * scaling)?.contiguous()?;
        Ok((target, rank, a, b))
    };
    let built: Vec<Result<(Target, usize, Tensor, Tensor), AdapterError>> = {
        use rayon::prelude::*;
        pairs.into_par_iter().map(one).collect()
    };
    let (mut deltas, mut max_rank, mut names) = (ModuleDeltas::default(), 0, BTreeSet::new());
    for r in built {
        let (target, rank, a, b) = r?;
        max_rank = max_rank.max(rank);
        names.insert(match target {
            Target::Linear(id) => id.proj.hf_name().to_string(),
            _ => "lm_head".to_string(),
        });
        if deltas.targets.insert(target, MatrixDelta::LowRank { a, b }).is_some() {
            return Err(malformed(&file, format!("two sets of factors for `{}`", target.hf_name())));
        }
    }
    deltas.validate(base, &file)?;
    let info =
        LoraInfo { rank: max_rank, alpha: cfg.lora_alpha, targets: names.into_iter().collect(), use_rslora: rslora };
    Ok((deltas, info))
}

/// Returns `(a [r, in], b [out, r])`. PEFT stores factors this way even with `fan_in_fan_out`
/// (it resets the flag for `nn.Linear`); with the flag, factors stored transposed are accepted.
fn orient(
    a: Tensor,
    b: Tensor,
    (out, inp): (usize, usize),
    fifo: bool,
    file: &Path,
    (an, bn): (&str, &str),
) -> Result<(Tensor, Tensor), AdapterError> {
    let shape_err = |name: &str, t: &Tensor, expected: Vec<usize>| AdapterError::Shape {
        path: file.into(),
        tensor: name.into(),
        expected,
        got: t.dims().to_vec(),
    };
    let (Ok((ar, ac)), Ok((br, bc))) = (a.dims2(), b.dims2()) else {
        let (name, t) = if a.rank() != 2 { (an, &a) } else { (bn, &b) };
        return Err(AdapterError::Malformed {
            path: file.into(),
            reason: format!("`{name}` has shape {:?}, expected a matrix", t.dims()),
        });
    };
    if ac == inp && br == out {
        return Ok((a, b));
    }
    if fifo && ar == inp && bc == out {
        return Ok((a.t()?.contiguous()?, b.t()?.contiguous()?));
    }
    Err(if ac != inp { shape_err(an, &a, vec![ar, inp]) } else { shape_err(bn, &b, vec![out, bc]) })
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
        assert!(
            TargetSpec::AllLinear.matches("model.layers.0.mlp.down_proj") && !TargetSpec::AllLinear.matches("lm_head")
        );
    }

    #[test]
    fn tensor_names_parse_with_and_without_adapter_name() {
        let m = "model.layers.2.mlp.up_proj".to_string();
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"),
            Some((m.clone(), Factor::A))
        );
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"),
            Some((m, Factor::B))
        );
        assert_eq!(parse_lora_name("base_model.model.model.layers.2.mlp.up_proj.lora_B.bias"), None);
        assert_eq!(parse_lora_name("base_model.model.model.embed_tokens.lora_embedding_A"), None);
    }

    #[test]
    fn ordered_patterns_keep_file_order() {
        let p: Ordered<usize> = serde_json::from_str(r#"{"q_proj": 4, "layers.0.self_attn.q_proj": 2}"#).unwrap();
        assert_eq!(p.lookup("model.layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(p.lookup("model.layers.0.self_attn.k_proj"), None);
    }
}
