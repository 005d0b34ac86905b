//! PEFT LoRA adapters: `adapter_config.json` plus `adapter_model.safetensors` (or `.bin`) become a
//! [`ModuleDeltas`] of low-rank factors (the helpers Poly shares are in [`super::peft`]).
//!
//! Invariants: every delta is `MatrixDelta::LowRank { a: [r, in], b: [out, r] }`, float32,
//! contiguous, on the CPU (or, when the caller asks for the compact CPU layout, the linear targets
//! of rank up to 128 are `MatrixDelta::Packed`, packed straight from the file's bytes), with the module scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA,
//! `r` and `alpha` per module from `rank_pattern` / `alpha_pattern`) folded into `b`. The modules in
//! the file are exactly the base modules the config selects. Anything PEFT would compute
//! differently from `W + scale * B @ A` (DoRA, `modules_to_save`, biases, regex targets we cannot
//! evaluate, ...) is refused with an error naming the file, never approximated. Weights use the
//! Hugging Face layout, so no q/k row permutation happens here.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::peft::{
    adapter_tensors, check_coverage, malformed, module_target, present, read_config, suffix_match, unsupported, AdapterTensor, Selector,
};
use crate::adapters::error::AdapterError;
use crate::adapters::module_deltas::{non_finite, MatrixDelta, ModuleDeltas};
use crate::adapters::source::ModuleBytes;
use crate::adapters::target::{BaseShapes, Target};
use crate::kernels::lowrank::{HostLowRank, MAX_KERNEL_RANK};

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
    load_peft_lora_from(dir, base, None, false)
}

/// [`load_peft_lora`], parsing the tensor file from `read` when it holds its bytes; `compact`:
/// the linear targets' factors of rank up to [`MAX_KERNEL_RANK`] become the CPU kernels' compact
/// layout ([`MatrixDelta::Packed`]) packed straight from the file's bytes, with no f32 tensor in
/// between (what `ModuleDeltas::into_host(true)` would make of the tensors, up to float
/// rounding of the scaling).
pub fn load_peft_lora_from(
    dir: &Path,
    base: &BaseShapes,
    read: Option<&ModuleBytes>,
    compact: bool,
) -> Result<(ModuleDeltas, LoraInfo), AdapterError> {
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
    let mut local = Vec::new();
    let (file, tensors) = adapter_tensors(dir, read, &mut local)?;
    let mut pairs: BTreeMap<String, [Option<(String, AdapterTensor<'_>)>; 2]> = BTreeMap::new();
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
    // Shapes, ranks and scalings are checked from the file's header alone, module by module in
    // name order (the first failing module is reported); no value is read yet.
    let mut checked = Vec::with_capacity(pairs.len());
    for (module, [a, b]) in pairs {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((have, _)), None) | (None, Some((have, _))) => {
                let f = if have.contains(".lora_A.") { "B" } else { "A" };
                return Err(malformed(&file, format!("module `{module}` has `{have}` but no lora_{f} tensor")));
            }
            (None, None) => unreachable!("a module is recorded with at least one factor"),
        };
        let target = targets[&module];
        let (out, inp) = base.shape(target).ok_or_else(|| AdapterError::UnknownTarget { path: file.clone(), target: module.clone() })?;
        let transposed = orient(a.1.dims(), b.1.dims(), (out, inp), fifo, &file, (&a.0, &b.0))?;
        let (ad, bd) = (a.1.dims(), b.1.dims());
        let (ra, rb) = if transposed { (ad[1], bd[0]) } else { (ad[0], bd[1]) };
        if ra != rb {
            return Err(malformed(&file, format!("`{}` has rank {ra} but `{}` has rank {rb}", a.0, b.0)));
        }
        let rank = cfg.rank_pattern.as_ref().and_then(|p| p.lookup(&module)).unwrap_or(cfg.r);
        if ra != rank || rank == 0 {
            return Err(malformed(&file, format!("`{module}` has rank {ra} but adapter_config.json gives r={rank} (r / rank_pattern)")));
        }
        let alpha = cfg.alpha_pattern.as_ref().and_then(|p| p.lookup(&module)).unwrap_or(cfg.lora_alpha);
        let scaling = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        checked.push(Checked { target, rank, in_dim: inp, out_dim: out, scaling, transposed, a, b });
    }
    let (mut deltas, mut max_rank, mut names) = (ModuleDeltas::default(), 0, BTreeSet::new());
    for c in &checked {
        max_rank = max_rank.max(c.rank);
        names.insert(match c.target {
            Target::Linear(id) => id.proj.hf_name().to_string(),
            _ => "lm_head".to_string(),
        });
    }
    let (fast, slow): (Vec<Checked<'_>>, Vec<Checked<'_>>) = checked.into_iter().partition(|c| compact && c.packs_directly());
    let built = pack_direct(&fast, &file)?.into_iter().chain(materialize(slow, &file)?);
    for (target, delta) in built {
        if deltas.targets.insert(target, delta).is_some() {
            return Err(malformed(&file, format!("two sets of factors for `{}`", target.hf_name())));
        }
    }
    deltas.validate(base, &file)?;
    let info = LoraInfo { rank: max_rank, alpha: cfg.lora_alpha, targets: names.into_iter().collect(), use_rslora: rslora };
    Ok((deltas, info))
}

/// One module's factors, checked against the base and the config from the file's header.
struct Checked<'a> {
    target: Target,
    rank: usize,
    in_dim: usize,
    out_dim: usize,
    scaling: f64,
    /// Stored `[in, r]` / `[r, out]` (`fan_in_fan_out`).
    transposed: bool,
    a: (String, AdapterTensor<'a>),
    b: (String, AdapterTensor<'a>),
}

impl Checked<'_> {
    /// Whether the compact kernel layout can be packed straight from the file's bytes.
    fn packs_directly(&self) -> bool {
        matches!(self.target, Target::Linear(_))
            && !self.transposed
            && self.rank <= MAX_KERNEL_RANK
            && self.a.1.is_float_view()
            && self.b.1.is_float_view()
    }
}

thread_local! {
    /// f32 copies of f16/bf16 (or unaligned) factors while they are packed (reused per thread).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The compact kernel layout of `fast`'s factors, packed in parallel straight from the file's
/// bytes into one buffer (the scaling goes into `b`'s block scales; every value is checked to be
/// finite on the way): a cold load's only pass over the values after hashing them.
fn pack_direct(fast: &[Checked<'_>], file: &Path) -> Result<Vec<(Target, MatrixDelta)>, AdapterError> {
    if fast.is_empty() {
        return Ok(Vec::new());
    }
    let shapes: Vec<(usize, usize, usize)> = fast.iter().map(|c| (c.rank, c.in_dim, c.out_dim)).collect();
    let packed = HostLowRank::new_compact_many(&shapes, |i, slot| {
        let c = &fast[i];
        let finite =
            SCRATCH.with_borrow_mut(|(sa, sb)| c.a.1.with_f32(sa, |a| c.b.1.with_f32(sb, |b| slot.pack_scaled(a, b, c.scaling as f32))));
        if finite == Some(Some(true)) {
            Ok(())
        } else {
            Err(())
        }
    });
    match packed {
        Ok(hs) => Ok(fast.iter().zip(hs).map(|(c, h)| (c.target, MatrixDelta::Packed(std::sync::Arc::new(h)))).collect()),
        // A value is not finite: name the first such target in target order, `a` before `b`
        // (what `ModuleDeltas::validate` reports on the tensor path).
        Err(()) => Err(fast
            .iter()
            .flat_map(|c| [&c.a, &c.b].map(|f| (c.target, f)))
            .filter_map(|(t, (_, f))| f.with_f32(&mut Vec::new(), non_finite).flatten().map(|what| (t, what)))
            .min_by_key(|(t, _)| *t)
            .map(|(t, what)| AdapterError::NonFinite { path: file.into(), tensor: t.hf_name(), what })
            .unwrap_or_else(|| malformed(file, "factors could not be packed"))),
    }
}

/// `slow`'s factors as f32 tensors `a [r, in]`, `b [out, r]` with the scaling folded into `b`, in
/// parallel (a cold load waits on this); the first failing module in name order is reported.
fn materialize(slow: Vec<Checked<'_>>, file: &Path) -> Result<Vec<(Target, MatrixDelta)>, AdapterError> {
    use rayon::prelude::*;
    let built: Vec<Result<(Target, MatrixDelta), AdapterError>> = slow
        .into_par_iter()
        .map(|c| {
            let (a, b) = (c.a.1.to_tensor(file, &c.a.0)?, c.b.1.to_tensor(file, &c.b.0)?);
            let (a, b) = if c.transposed { (a.t()?.contiguous()?, b.t()?.contiguous()?) } else { (a, b) };
            let b = (b * c.scaling)?.contiguous()?;
            Ok((c.target, MatrixDelta::LowRank { a, b }))
        })
        .collect();
    built.into_iter().collect()
}

/// Whether factors of dims `a`, `b` are stored transposed (`[in, r]` / `[r, out]`): PEFT stores
/// `a [r, in]`, `b [out, r]` even with `fan_in_fan_out` (it resets the flag for `nn.Linear`);
/// with the flag, factors stored transposed are accepted.
fn orient(
    a: &[usize],
    b: &[usize],
    (out, inp): (usize, usize),
    fifo: bool,
    file: &Path,
    (an, bn): (&str, &str),
) -> Result<bool, AdapterError> {
    let shape_err = |name: &str, got: &[usize], expected: Vec<usize>| AdapterError::Shape {
        path: file.into(),
        tensor: name.into(),
        expected,
        got: got.to_vec(),
    };
    let (&[ar, ac], &[br, bc]) = (a, b) else {
        let (name, d) = if a.len() != 2 { (an, a) } else { (bn, b) };
        return Err(AdapterError::Malformed { path: file.into(), reason: format!("`{name}` has shape {d:?}, expected a matrix") });
    };
    if ac == inp && br == out {
        return Ok(false);
    }
    if fifo && ar == inp && bc == out {
        return Ok(true);
    }
    Err(if ac != inp { shape_err(an, a, vec![ar, inp]) } else { shape_err(bn, b, vec![out, bc]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse_with_and_without_adapter_name() {
        let m = "model.layers.2.mlp.up_proj".to_string();
        assert_eq!(parse_lora_name("base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"), Some((m.clone(), Factor::A)));
        assert_eq!(parse_lora_name("base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"), Some((m, Factor::B)));
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
