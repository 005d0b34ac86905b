//! Merges: a new module built from existing ones (task vectors, sparse fine-tunings, LoRAs) as
//! described by a JSON recipe (format in docs/ADAPTER_FORMATS.md): Elastic Weight Removal (EWR),
//! task arithmetic, linear averaging, TIES, DARE and Fisher merging, with optional low-rank or
//! top-k compression of the result.
//!
//! Invariants: a recipe's paths are relative to its folder and never leave it (`..`, absolute
//! paths and symbolic links out are refused); every component is validated against the base
//! shapes before any arithmetic; per-element arithmetic runs in f64 in a fixed order, so a merge is
//! deterministic (DARE's RNG is seeded per component and tensor); the output is the exact delta
//! `theta' - theta0` in its cheapest exact form (sparse CSR when under a third of the elements are
//! non-zero, else dense) unless the recipe asks for compression, whose relative Frobenius error
//! is reported. All-zero deltas are omitted.
use std::collections::BTreeSet;
use std::path::{Component as PathPart, Path, PathBuf};

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::delta::{BaseShapes, MatrixDelta, ModuleDeltas, Target};
use super::dense::{exact_form, load_fisher, load_task_vector, low_rank, metadata, read_bytes, top_k_mask, Fisher};
use super::error::AdapterError;
use super::sft::{load_pytorch_diff, load_sparse_safetensors, SPARSE_FILE, SPARSE_FORMAT};

/// How components are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    Ewr,
    TaskArithmetic,
    Linear,
    Ties,
    DareLinear,
    Fisher,
}

impl MergeMethod {
    /// The recipe spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ewr => "ewr",
            Self::TaskArithmetic => "task_arithmetic",
            Self::Linear => "linear",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::Fisher => "fisher",
        }
    }
}

/// Optional lossy storage of the merged delta.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Compression {
    /// Best rank-`r` approximation per tensor (truncated SVD by subspace iteration).
    LowRank(usize),
    /// Keep this fraction of each tensor's entries, the largest in magnitude.
    TopK(f64),
}

/// One module taking part in a merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// A task-vector file or module folder (resolved, inside the recipe folder).
    pub task_vector: PathBuf,
    /// Its diagonal Fisher file (ewr, fisher).
    pub fisher: Option<PathBuf>,
    pub lambda: f64,
    /// Use `-tau` (an anti-expert).
    pub negate: bool,
}

/// A validated merge recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe file (named in errors).
    pub path: PathBuf,
    pub method: MergeMethod,
    pub lambda_base: f64,
    pub fisher_base: Option<PathBuf>,
    pub fisher_floor: f64,
    pub density: Option<f64>,
    pub seed: u64,
    pub components: Vec<Component>,
    pub compress: Option<Compression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    method: Option<MergeMethod>,
    #[allow(dead_code)]
    formula: Option<serde_json::Value>,
    #[allow(dead_code)]
    description: Option<String>,
    lambda_base: Option<f64>,
    fisher_base: Option<String>,
    fisher_floor: Option<f64>,
    density: Option<f64>,
    seed: Option<u64>,
    components: Vec<ComponentFile>,
    compress: Option<Compression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentFile {
    task_vector: String,
    fisher: Option<String>,
    lambda: Option<f64>,
    #[serde(default)]
    negate: bool,
}

/// Reads and validates a recipe; every referenced file must exist inside the recipe's folder.
pub fn load_recipe(path: &Path) -> Result<Recipe, AdapterError> {
    let err = |reason: String| AdapterError::Recipe { path: path.into(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| AdapterError::Io { path: path.into(), reason: format!("cannot read: {e}") })?;
    let f: RecipeFile = serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON recipe: {e}")))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let method = match (f.method, &f.fisher_base) {
        (Some(m), _) => m,
        (None, Some(_)) => MergeMethod::Ewr,
        (None, None) => return Err(err("no `method` (and no `fisher_base`, which would imply ewr)".into())),
    };
    let m = method.name();
    let uses_fisher = matches!(method, MergeMethod::Ewr | MergeMethod::Fisher);
    let uses_density = matches!(method, MergeMethod::Ties | MergeMethod::DareLinear);
    let only = |field: &str, used: bool, present: bool, by: &str| -> Result<(), AdapterError> {
        if present && !used {
            return Err(err(format!("`{field}` is only used by {by}, not by {m}")));
        }
        Ok(())
    };
    only("fisher_base", method == MergeMethod::Ewr, f.fisher_base.is_some(), "ewr")?;
    only("lambda_base", method == MergeMethod::Ewr, f.lambda_base.is_some(), "ewr")?;
    only("fisher_floor", uses_fisher, f.fisher_floor.is_some(), "ewr and fisher")?;
    only("density", uses_density, f.density.is_some(), "ties and dare_linear")?;
    only("seed", method == MergeMethod::DareLinear, f.seed.is_some(), "dare_linear")?;
    if f.components.is_empty() {
        return Err(err("`components` is empty".into()));
    }
    let lambda_base = f.lambda_base.unwrap_or(1.0);
    if method == MergeMethod::Ewr && !(lambda_base.is_finite() && lambda_base > 0.0) {
        return Err(err(format!("`lambda_base` must be finite and > 0, got {lambda_base}")));
    }
    let fisher_floor = f.fisher_floor.unwrap_or(1e-6);
    if !(fisher_floor.is_finite() && fisher_floor > 0.0) {
        return Err(err(format!("`fisher_floor` must be finite and > 0, got {fisher_floor}")));
    }
    if uses_density {
        match f.density {
            Some(d) if d > 0.0 && d <= 1.0 => {}
            Some(d) => return Err(err(format!("`density` must be in (0, 1], got {d}"))),
            None => return Err(err(format!("{m} needs `density`"))),
        }
    }
    match f.compress {
        Some(Compression::LowRank(0)) => return Err(err("`compress.low_rank` must be >= 1".into())),
        Some(Compression::TopK(k)) if !(k > 0.0 && k <= 1.0) => return Err(err(format!("`compress.top_k` must be in (0, 1], got {k}"))),
        _ => {}
    }
    let fisher_base = match &f.fisher_base {
        Some(p) => Some(resolve(&dir, p, "fisher_base", path)?),
        None if method == MergeMethod::Ewr => return Err(err("ewr needs `fisher_base`".into())),
        None => None,
    };
    let mut components = Vec::with_capacity(f.components.len());
    for (i, c) in f.components.into_iter().enumerate() {
        let lambda = c.lambda.unwrap_or(1.0);
        if !lambda.is_finite() {
            return Err(err(format!("component {i}: `lambda` must be finite, got {lambda}")));
        }
        if uses_fisher && lambda < 0.0 {
            return Err(err(format!("component {i}: {m} needs `lambda` >= 0 (use `negate` for anti-experts), got {lambda}")));
        }
        let fisher = match (&c.fisher, uses_fisher) {
            (Some(p), true) => Some(resolve(&dir, p, &format!("component {i} fisher"), path)?),
            (None, true) => return Err(err(format!("component {i}: {m} needs a `fisher` file"))),
            (Some(_), false) => return Err(err(format!("component {i}: `fisher` is only used by ewr and fisher, not by {m}"))),
            (None, false) => None,
        };
        let task_vector = resolve(&dir, &c.task_vector, &format!("component {i} task_vector"), path)?;
        components.push(Component { task_vector, fisher, lambda, negate: c.negate });
    }
    let sum: f64 = components.iter().map(|c| c.lambda).sum();
    if matches!(method, MergeMethod::Fisher | MergeMethod::Linear) && sum.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(err(format!("{m} needs lambdas with a positive sum, got {sum}")));
    }
    if method == MergeMethod::Linear && components.iter().any(|c| c.lambda < 0.0) {
        return Err(err("linear is a weighted average: lambdas must be >= 0".into()));
    }
    Ok(Recipe {
        path: path.into(),
        method,
        lambda_base,
        fisher_base,
        fisher_floor,
        density: f.density,
        seed: f.seed.unwrap_or(0),
        components,
        compress: f.compress,
    })
}

/// `dir/rel`, refusing absolute paths, `..` and anything (symbolic links included) outside `dir`.
fn resolve(dir: &Path, rel: &str, what: &str, recipe: &Path) -> Result<PathBuf, AdapterError> {
    let err = |reason: String| AdapterError::Recipe { path: recipe.into(), reason: format!("{what} `{rel}`: {reason}") };
    let p = Path::new(rel);
    if rel.is_empty() {
        return Err(err("empty path".into()));
    }
    for part in p.components() {
        match part {
            PathPart::Normal(_) | PathPart::CurDir => {}
            PathPart::ParentDir => return Err(err("`..` may not leave the recipe folder".into())),
            PathPart::RootDir | PathPart::Prefix(_) => return Err(err("must be relative to the recipe folder".into())),
        }
    }
    let joined = dir.join(p);
    let canon = joined.canonicalize().map_err(|e| err(format!("not found ({}: {e})", joined.display())))?;
    let canon_dir = dir.canonicalize().map_err(|e| err(format!("recipe folder unreadable: {e}")))?;
    if !canon.starts_with(&canon_dir) {
        return Err(err("resolves outside the recipe folder".into()));
    }
    Ok(canon)
}

/// Loads any module delta: a folder (PEFT LoRA `adapter_config.json`, `sparse_delta.safetensors`,
/// `pytorch_diff.bin` or `task_vector.safetensors`, first found), a `.bin` composable-sft diff, a
/// native sparse safetensors file (by its metadata) or a dense task-vector safetensors file.
pub fn load_delta(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return Ok(super::lora::load_peft_lora(path, base)?.0);
        }
        for f in [SPARSE_FILE, "pytorch_diff.bin", "task_vector.safetensors"] {
            if path.join(f).is_file() {
                return load_delta(&path.join(f), base);
            }
        }
        return Err(AdapterError::Unsupported {
            path: path.into(),
            reason: format!("folder holds no adapter_config.json, {SPARSE_FILE}, pytorch_diff.bin or task_vector.safetensors"),
        });
    }
    if path.extension().is_some_and(|e| e == "bin") {
        return load_pytorch_diff(path, base);
    }
    let sparse = metadata(&read_bytes(path)?, path)?.is_some_and(|m| m.get("format").is_some_and(|f| f == SPARSE_FORMAT));
    if sparse {
        load_sparse_safetensors(path, base)
    } else {
        load_task_vector(path, base)
    }
}

/// Summary of a compression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressionReport {
    pub compression: Compression,
    /// `||D - D_c||_F / ||D||_F` over all tensors together.
    pub relative_error: f64,
    /// The largest per-tensor relative error.
    pub max_tensor_relative_error: f64,
}

/// What a merge produced.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub method: MergeMethod,
    /// Tensors in the output.
    pub tensors: usize,
    /// Component tensors left unchanged (not covered by the Fisher files, or a zero delta).
    pub unchanged: usize,
    pub sparse: usize,
    pub dense: usize,
    pub low_rank: usize,
    /// Non-zeros of the exact merged delta over the output tensors.
    pub nnz: u64,
    /// Elements of the output tensors.
    pub elements: u64,
    /// Resident bytes of the output.
    pub bytes: usize,
    pub compression: Option<CompressionReport>,
}

/// A merge's result.
#[derive(Debug, Clone)]
pub struct MergeOutcome {
    pub deltas: ModuleDeltas,
    pub report: MergeReport,
}

/// One component's view of one tensor, ready for per-element arithmetic.
struct Term<'a> {
    /// `s_i * tau_i` (negation applied); None when the component leaves the tensor unchanged.
    tau: Option<Vec<f32>>,
    fisher: Option<&'a [f32]>,
    lambda: f64,
}

fn host(t: &Tensor) -> Result<Vec<f32>, AdapterError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs `recipe`. `base_weight(t)` gives theta0 `[out, in]` (dense f32; only EWR asks for it).
pub fn merge(
    recipe: &Recipe,
    base_weight: &dyn Fn(Target) -> Result<Tensor, AdapterError>,
    base: &BaseShapes,
) -> Result<MergeOutcome, AdapterError> {
    let mut taus = Vec::with_capacity(recipe.components.len());
    let mut fishers: Vec<Option<Fisher>> = Vec::with_capacity(recipe.components.len());
    for c in &recipe.components {
        taus.push(load_delta(&c.task_vector, base)?);
        fishers.push(c.fisher.as_deref().map(|f| load_fisher(f, base)).transpose()?);
    }
    let fisher_base = recipe.fisher_base.as_deref().map(|f| load_fisher(f, base)).transpose()?;
    let targets: BTreeSet<Target> = taus.iter().flat_map(|d| d.targets.keys().copied()).collect();
    let mut out = ModuleDeltas::default();
    let mut report = MergeReport {
        method: recipe.method,
        tensors: 0,
        unchanged: 0,
        sparse: 0,
        dense: 0,
        low_rank: 0,
        nnz: 0,
        elements: 0,
        bytes: 0,
        compression: None,
    };
    let (mut err2, mut norm2, mut max_rel) = (0f64, 0f64, 0f64);
    for t in targets {
        let Some((rows, cols)) = base.shape(t) else {
            return Err(AdapterError::UnknownTarget { path: recipe.path.clone(), target: t.hf_name() });
        };
        let fisher_host = |f: &Option<Fisher>| f.as_ref().and_then(|f| f.tensors.get(&t)).map(host).transpose();
        let fh: Vec<Option<Vec<f32>>> = fishers.iter().map(fisher_host).collect::<Result<_, _>>()?;
        let f0 = fisher_host(&fisher_base)?;
        if matches!(recipe.method, MergeMethod::Ewr | MergeMethod::Fisher) {
            let covered = fh.iter().filter(|f| f.is_some()).count() + f0.is_some() as usize;
            let files = fh.len() + (recipe.method == MergeMethod::Ewr) as usize;
            if covered == 0 {
                report.unchanged += 1;
                continue;
            }
            if covered != files {
                return Err(AdapterError::Recipe {
                    path: recipe.path.clone(),
                    reason: format!("`{}` is covered by {covered} of the {files} Fisher files; it must be in all or none", t.hf_name()),
                });
            }
        }
        let mut terms = Vec::with_capacity(taus.len());
        for (i, c) in recipe.components.iter().enumerate() {
            let tau = match taus[i].targets.get(&t) {
                Some(d) => {
                    let mut v = host(&d.to_dense()?)?;
                    if c.negate {
                        v.iter_mut().for_each(|x| *x = -*x);
                    }
                    Some(v)
                }
                None => None,
            };
            terms.push(Term { tau, fisher: fh[i].as_deref(), lambda: c.lambda });
        }
        let n = rows * cols;
        let floor = recipe.fisher_floor;
        let delta = match recipe.method {
            MergeMethod::Ewr => {
                let theta0 = base_weight(t)?;
                if theta0.dims() != [rows, cols] {
                    return Err(AdapterError::Shape {
                        path: recipe.path.clone(),
                        tensor: format!("base weight {}", t.hf_name()),
                        expected: vec![rows, cols],
                        got: theta0.dims().to_vec(),
                    });
                }
                let f0 = f0.unwrap_or_default();
                ewr(&host(&theta0)?, &f0, recipe.lambda_base, &terms, floor)
            }
            MergeMethod::Fisher => fisher_merge(n, &terms, floor),
            MergeMethod::TaskArithmetic => weighted_sum(n, &terms, 1.0),
            MergeMethod::Linear => weighted_sum(n, &terms, terms.iter().map(|t| t.lambda).sum()),
            MergeMethod::Ties => ties(n, &terms, recipe.density.unwrap_or(1.0)),
            MergeMethod::DareLinear => {
                let density = recipe.density.unwrap_or(1.0);
                let mut dropped = Vec::with_capacity(terms.len());
                for (i, term) in terms.iter().enumerate() {
                    let tau = term.tau.as_deref().map(|v| dare(v, density, dare_seed(recipe.seed, i, t)));
                    dropped.push(Term { tau, fisher: None, lambda: term.lambda });
                }
                weighted_sum(n, &dropped, 1.0)
            }
        };
        let nnz = delta.iter().filter(|x| **x != 0.0).count();
        if nnz == 0 {
            report.unchanged += 1;
            continue;
        }
        let stored = match recipe.compress {
            None => exact_form(rows, cols, &delta)?,
            Some(c) => {
                let (form, e2) = match c {
                    Compression::TopK(f) => {
                        let keep = top_k_mask(&delta, ((f * n as f64).floor() as usize).max(1));
                        let kept: Vec<f32> = delta.iter().zip(&keep).map(|(v, k)| if *k { *v } else { 0.0 }).collect();
                        let e2 = delta.iter().zip(&keep).filter(|(_, k)| !**k).map(|(v, _)| (*v as f64).powi(2)).sum();
                        (exact_form(rows, cols, &kept)?, e2)
                    }
                    Compression::LowRank(r) => low_rank(&delta, rows, cols, r)?,
                };
                let d2: f64 = delta.iter().map(|v| (*v as f64).powi(2)).sum();
                err2 += e2;
                norm2 += d2;
                max_rel = max_rel.max((e2 / d2).sqrt());
                form
            }
        };
        match &stored {
            MatrixDelta::Sparse(_) => report.sparse += 1,
            MatrixDelta::Dense(_) => report.dense += 1,
            MatrixDelta::LowRank { .. } => report.low_rank += 1,
        }
        report.nnz += nnz as u64;
        report.elements += n as u64;
        out.targets.insert(t, stored);
    }
    out.validate(base, &recipe.path)?;
    report.tensors = out.targets.len();
    report.bytes = out.bytes();
    report.compression = recipe.compress.map(|compression| CompressionReport {
        compression,
        relative_error: if norm2 > 0.0 { (err2 / norm2).sqrt() } else { 0.0 },
        max_tensor_relative_error: max_rel,
    });
    Ok(MergeOutcome { deltas: out, report })
}

/// EWR: `theta' = (l0 F0 theta0 + sum_i l_i F_i tau_i) / (l0 F0 + sum_i l_i F_i)` with
/// `F = max(F, floor)` and a missing tau counting as zero; returns `theta' - theta0`.
fn ewr(theta0: &[f32], f0: &[f32], l0: f64, terms: &[Term<'_>], floor: f64) -> Vec<f32> {
    (0..theta0.len())
        .map(|j| {
            let th = theta0[j] as f64;
            let w0 = l0 * (f0[j] as f64).max(floor);
            let (mut num, mut den) = (w0 * th, w0);
            for t in terms {
                let w = t.lambda * t.fisher.map_or(floor, |f| (f[j] as f64).max(floor));
                num += w * t.tau.as_ref().map_or(0.0, |v| v[j] as f64);
                den += w;
            }
            (num / den - th) as f32
        })
        .collect()
}

/// Fisher merging of `theta_i = theta0 + tau_i`: `sum l_i F_i theta_i / sum l_i F_i - theta0`,
/// computed as `sum l_i F_i tau_i / sum l_i F_i` (identical, without cancellation).
fn fisher_merge(n: usize, terms: &[Term<'_>], floor: f64) -> Vec<f32> {
    (0..n)
        .map(|j| {
            let (mut num, mut den) = (0f64, 0f64);
            for t in terms {
                let w = t.lambda * t.fisher.map_or(floor, |f| (f[j] as f64).max(floor));
                num += w * t.tau.as_ref().map_or(0.0, |v| v[j] as f64);
                den += w;
            }
            (num / den) as f32
        })
        .collect()
}

/// `sum_i l_i tau_i / divisor` (task arithmetic with divisor 1; linear with `sum_i l_i`).
fn weighted_sum(n: usize, terms: &[Term<'_>], divisor: f64) -> Vec<f32> {
    (0..n)
        .map(|j| {
            let s: f64 = terms.iter().map(|t| t.lambda * t.tau.as_ref().map_or(0.0, |v| v[j] as f64)).sum();
            (s / divisor) as f32
        })
        .collect()
}

/// TIES on the scaled task vectors `c_i = lambda_i * tau_i`: trim each to its `floor(density * n)`
/// largest magnitudes, elect the sign of `sum_i c_i` per element, and average the trimmed values
/// agreeing with it (mean over the agreeing non-zero entries).
fn ties(n: usize, terms: &[Term<'_>], density: f64) -> Vec<f32> {
    let k = (density * n as f64).floor() as usize;
    let trimmed: Vec<Vec<f64>> = terms
        .iter()
        .filter_map(|t| {
            let v = t.tau.as_ref()?;
            let keep = top_k_mask(v, k);
            Some(v.iter().zip(keep).map(|(x, k)| if k { t.lambda * *x as f64 } else { 0.0 }).collect())
        })
        .collect();
    (0..n)
        .map(|j| {
            let sign = trimmed.iter().map(|c| c[j]).sum::<f64>().signum();
            let (mut s, mut cnt) = (0f64, 0usize);
            for c in &trimmed {
                if c[j] != 0.0 && c[j].signum() == sign {
                    s += c[j];
                    cnt += 1;
                }
            }
            if cnt == 0 { 0.0 } else { (s / cnt as f64) as f32 }
        })
        .collect()
}

/// DARE: drops each element with probability `1 - density`, rescales survivors by `1 / density`.
fn dare(v: &[f32], density: f64, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    v.iter().map(|x| if rng.random::<f64>() < density { (*x as f64 / density) as f32 } else { 0.0 }).collect()
}

/// Per (component, tensor) seed: FNV-1a of `"{component}:{hf_name}"` xor the recipe seed, so a
/// tensor's mask depends on nothing else in the merge.
fn dare_seed(seed: u64, component: usize, t: Target) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{component}:{}", t.hf_name()).bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed
}


#[cfg(test)]
mod tests {
    use super::*;

    fn term(tau: &[f32], fisher: Option<&'static [f32]>, lambda: f64) -> Term<'static> {
        Term { tau: Some(tau.to_vec()), fisher, lambda }
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn ewr_follows_the_formula_with_floor() {
        // theta0 = [1, 2], F0 = [1, 0 -> 1e-6], l0 = 1; tau1 = [2, 4] (F [1, 1], l 0.5);
        // tau2 = -[1, -2] (negated by the caller; F [3, 0 -> 1e-6], l 1).
        // e0: (1 + 0.5*2 + 3*(-1)) / (1 + 0.5 + 3) - 1 = -1/4.5 - 1
        // e1: (1e-6*2 + 0.5*4 + 1e-6*2) / (1e-6 + 0.5 + 1e-6) - 2 = 2.000004/0.500002 - 2
        let terms = [term(&[2.0, 4.0], Some(&[1.0, 1.0]), 0.5), term(&[-1.0, 2.0], Some(&[3.0, 0.0]), 1.0)];
        let d = ewr(&[1.0, 2.0], &[1.0, 0.0], 1.0, &terms, 1e-6);
        close(&d, &[-1.0 / 4.5 - 1.0, 2.000004 / 0.500002 - 2.0]);
    }

    #[test]
    fn fisher_task_arithmetic_and_linear_follow_their_formulas() {
        // Fisher: e0 (1*2 + 3*4) / 4 = 3.5; e1 (1e-6*2 + 1*(-2)) / (1e-6 + 1).
        let f = fisher_merge(2, &[term(&[2.0, 2.0], Some(&[1.0, 0.0]), 1.0), term(&[4.0, -2.0], Some(&[3.0, 1.0]), 1.0)], 1e-6);
        close(&f, &[3.5, -1.999998 / 1.000001]);
        // Task arithmetic: 2*[1, 2, 0, 0] + 1*(-[1, 1, 1, 0]) = [1, 3, -1, 0].
        let t = weighted_sum(4, &[term(&[1.0, 2.0, 0.0, 0.0], None, 2.0), term(&[-1.0, -1.0, -1.0, 0.0], None, 1.0)], 1.0);
        close(&t, &[1.0, 3.0, -1.0, 0.0]);
        // Linear, weights 1 and 3 normalised: [(4 + 0)/4, (0 + 24)/4] = [1, 6]; a missing tau is 0.
        let absent = Term { tau: None, fisher: None, lambda: 4.0 };
        let l = weighted_sum(2, &[term(&[4.0, 0.0], None, 1.0), term(&[0.0, 8.0], None, 3.0)], 4.0);
        close(&l, &[1.0, 6.0]);
        let l = weighted_sum(2, &[term(&[4.0, 0.0], None, 1.0), term(&[0.0, 8.0], None, 3.0), absent], 8.0);
        close(&l, &[0.5, 3.0]);
    }

    #[test]
    fn ties_trims_elects_and_averages() {
        // density 0.5 of 4 -> keep 2: [3,0,0,2], [-2,-4,0,0], [0,2,-3,0]; sums [1,-2,-3,2];
        // agreeing means [3, -4, -3, 2]; lambda scales each trimmed vector.
        let taus: [&[f32]; 3] = [&[3.0, -1.0, 0.5, 2.0], &[-2.0, -4.0, 1.0, 0.5], &[1.0, 2.0, -3.0, 0.0]];
        let mk = |l: [f64; 3]| taus.iter().zip(l).map(|(t, l)| term(t, None, l)).collect::<Vec<_>>();
        close(&ties(4, &mk([1.0; 3]), 0.5), &[3.0, -4.0, -3.0, 2.0]);
        close(&ties(4, &mk([0.5; 3]), 0.5), &[1.5, -2.0, -1.5, 1.0]);
        // lambda2 = 2: e0 sum 3 - 4 = -1 -> only -4 agrees.
        close(&ties(4, &mk([1.0, 2.0, 1.0]), 0.5), &[-4.0, -8.0, -3.0, 2.0]);
        // density 1 keeps all: e0 sum 2 > 0, agreeing {3, 1} -> 2.
        close(&ties(4, &mk([1.0; 3]), 1.0)[..1], &[2.0]);
    }

    #[test]
    fn dare_drops_rescales_and_is_seeded() {
        let v: Vec<f32> = (0..10_000).map(|i| 1.0 + i as f32).collect();
        assert_eq!(dare(&v, 1.0, 7), v);
        let a = dare(&v, 0.5, 7);
        assert_eq!(a, dare(&v, 0.5, 7));
        assert_ne!(a, dare(&v, 0.5, 8));
        let kept = a.iter().zip(&v).filter(|(x, y)| **x == 2.0 * **y).count();
        assert_eq!(kept, a.iter().filter(|x| **x != 0.0).count());
        assert!((4_500..5_500).contains(&kept), "{kept}");
        let t = Target::Embedding;
        assert_ne!(dare_seed(0, 0, t), dare_seed(0, 1, t));
    }
}
