//! Running a merge: every component loaded and validated against the base shapes, the method's
//! formula applied per tensor, and the result stored in its cheapest exact form or compressed.
//!
//! Invariants: per-element arithmetic runs in f64 in a fixed order, so a merge is deterministic
//! (DARE's RNG is seeded per component and tensor); the output is the exact delta
//! `theta' - theta0` unless the recipe asks for compression, whose relative Frobenius error is
//! reported; all-zero deltas are omitted.
use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::compress::{exact_form, low_rank, top_k_mask};
use super::methods::{dare, dare_seed, ewr, fisher_merge, ties, weighted_sum, Term};
use super::recipe::{Compression, MergeMethod, Recipe};
use crate::adapters::error::AdapterError;
use crate::adapters::formats::safetensors_io::{metadata, read_bytes};
use crate::adapters::formats::sft::{load_pytorch_diff, load_sparse_safetensors, SPARSE_FILE, SPARSE_FORMAT};
use crate::adapters::formats::task_vector::{load_fisher, load_task_vector, Fisher};
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::target::{BaseShapes, Target};

/// Loads any module delta: a folder (PEFT LoRA `adapter_config.json`, `sparse_delta.safetensors`,
/// `pytorch_diff.bin` or `task_vector.safetensors`, first found), a `.bin` composable-sft diff, a
/// native sparse safetensors file (by its metadata) or a dense task-vector safetensors file.
pub fn load_delta(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return Ok(crate::adapters::formats::lora::load_peft_lora(path, base)?.0);
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
            MatrixDelta::LowRank { .. } | MatrixDelta::Packed(_) => report.low_rank += 1,
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
