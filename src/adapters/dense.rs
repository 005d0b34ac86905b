//! Dense task vectors and diagonal Fisher files: safetensors files keyed by Hugging Face parameter
//! names (`model.layers.3.self_attn.q_proj.weight`, `model.embed_tokens.weight`, ...), each tensor
//! the shape of the weight it belongs to; and the storage of dense deltas computed here (merges):
//! the cheapest exact form, top-k sparsification and truncated-SVD low-rank compression.
//!
//! Invariants: every tensor names a base parameter and has its shape; values are finite; results
//! are float32 on the CPU (F16 / BF16 / F64 files are converted on load); Fisher values are also
//! non-negative (a diagonal Fisher is an expectation of squared gradients). A truncated or
//! otherwise unreadable file is `Malformed`, naming the file. The safetensors `__metadata__` is
//! ignored, except that a native sparse delta (`modserve-sparse-v1`) is refused with a pointer to
//! the right loader.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};

use super::delta::{BaseShapes, MatrixDelta, ModuleDeltas, SparseMatrix, Target};
use super::error::AdapterError;

/// A diagonal Fisher information estimate: one non-negative f32 tensor `[out, in]` per parameter.
#[derive(Debug, Clone, Default)]
pub struct Fisher {
    pub tensors: BTreeMap<Target, Tensor>,
}

/// Loads a dense task vector `tau = theta_finetuned - theta_base` as one `MatrixDelta::Dense` per
/// tensor.
pub fn load_task_vector(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    let mut out = ModuleDeltas::default();
    for (t, tensor) in load_checked(path, base)? {
        out.targets.insert(t, MatrixDelta::Dense(tensor));
    }
    out.validate(base, path)?;
    Ok(out)
}

/// Loads a diagonal Fisher file; refuses non-finite and negative values.
pub fn load_fisher(path: &Path, base: &BaseShapes) -> Result<Fisher, AdapterError> {
    let mut tensors = BTreeMap::new();
    for (t, tensor) in load_checked(path, base)? {
        let v = tensor.flatten_all()?.to_vec1::<f32>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            let what = if x.is_nan() { "NaN" } else { "infinite" };
            return Err(AdapterError::NonFinite { path: path.into(), tensor: t.hf_name(), what });
        }
        if let Some(x) = v.iter().copied().find(|x| *x < 0.0) {
            return Err(AdapterError::Malformed {
                path: path.into(),
                reason: format!("Fisher tensor `{}` has a negative value ({x}); a diagonal Fisher is non-negative", t.hf_name()),
            });
        }
        tensors.insert(t, tensor);
    }
    Ok(Fisher { tensors })
}

/// Reads a whole file, mapping I/O failures to `Io` naming it.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, AdapterError> {
    std::fs::read(path).map_err(|e| AdapterError::Io { path: path.into(), reason: format!("cannot read: {e}") })
}

/// Parses a safetensors buffer; a truncated or corrupt file is `Malformed`.
pub(crate) fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>, AdapterError> {
    SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Malformed {
        path: path.into(),
        reason: format!("not a readable safetensors file: {e}"),
    })
}

/// The `__metadata__` map of a safetensors buffer (None when absent).
pub(crate) fn metadata(
    bytes: &[u8],
    path: &Path,
) -> Result<Option<std::collections::HashMap<String, String>>, AdapterError> {
    let (_, md) = SafeTensors::read_metadata(bytes).map_err(|e| AdapterError::Malformed {
        path: path.into(),
        reason: format!("not a readable safetensors file: {e}"),
    })?;
    Ok(md.metadata().clone())
}

/// Converts a floating-point tensor view to an f32 CPU tensor; other dtypes are `Unsupported`.
pub(crate) fn view_to_f32(
    view: &safetensors::tensor::TensorView<'_>,
    path: &Path,
    name: &str,
) -> Result<Tensor, AdapterError> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        other => {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                reason: format!("tensor `{name}` has dtype {other:?} (expected F32, F16, BF16 or F64)"),
            })
        }
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Every tensor of the file as f32, mapped to its target and checked against the base shape.
fn load_checked(path: &Path, base: &BaseShapes) -> Result<Vec<(Target, Tensor)>, AdapterError> {
    let bytes = read_bytes(path)?;
    if let Some(md) = metadata(&bytes, path)? {
        if md.get("format").is_some_and(|f| f.starts_with("modserve-sparse")) {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                reason: "this is a native sparse delta (modserve-sparse-v1), not a dense tensor file".into(),
            });
        }
    }
    let st = parse(&bytes, path)?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let view = st.tensor(&name).map_err(|e| AdapterError::Malformed { path: path.into(), reason: format!("`{name}`: {e}") })?;
        let target = Target::from_hf_name(&name)
            .ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: name.clone() })?;
        let want = base
            .shape(target)
            .ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: name.clone() })?;
        if view.shape() != [want.0, want.1] {
            return Err(AdapterError::Shape {
                path: path.into(),
                tensor: name,
                expected: vec![want.0, want.1],
                got: view.shape().to_vec(),
            });
        }
        out.push((target, view_to_f32(&view, path, &name)?));
    }
    Ok(out)
}

/// The cheapest exact storage of a dense `[rows, cols]` delta: CSR (8 bytes per non-zero) when
/// fewer than a third of the elements are non-zero, else dense (4 bytes per element).
pub fn exact_form(rows: usize, cols: usize, d: &[f32]) -> Result<MatrixDelta, AdapterError> {
    let nnz = d.iter().filter(|x| **x != 0.0).count();
    if nnz * 3 < d.len() {
        let (flat, vals): (Vec<u64>, Vec<f32>) =
            d.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, v)| (i as u64, *v)).unzip();
        let m = SparseMatrix::from_flat(rows, cols, &flat, &vals).map_err(AdapterError::Tensor)?;
        Ok(MatrixDelta::Sparse(m))
    } else {
        Ok(MatrixDelta::Dense(Tensor::from_slice(d, (rows, cols), &Device::Cpu)?))
    }
}

/// Marks the `k` largest-magnitude entries of `v` (ties broken by lower index: deterministic).
pub fn top_k_mask(v: &[f32], k: usize) -> Vec<bool> {
    let mut keep = vec![k >= v.len(); v.len()];
    if k > 0 && k < v.len() {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
        idx[..k].iter().for_each(|&i| keep[i] = true);
    }
    keep
}

/// Power (subspace) iterations of the randomized range finder.
const POWER_ITERS: usize = 6;

/// Best rank-`r` approximation of a dense `[rows, cols]` delta `D` by randomized subspace
/// iteration (fixed seed, `r + 8` probe vectors, f64 candle matmuls): `Q` spans the dominant
/// column space, the eigenvectors `U_r` of `(Q^T D)(Q^T D)^T` pick its best `r` directions,
/// `P = Q U_r`, and the result is `LowRank { b: P, a: P^T D }` (fewer than `r` directions when
/// the numerical rank is lower). Returns it with `||D - b a||_F^2` of the stored f32 factors.
pub fn low_rank(d: &[f32], rows: usize, cols: usize, r: usize) -> Result<(MatrixDelta, f64), AdapterError> {
    let dev = Device::Cpu;
    let m = Tensor::from_vec(d.iter().map(|x| *x as f64).collect::<Vec<_>>(), (rows, cols), &dev)?;
    let mt = m.t()?.contiguous()?;
    let full = rows.min(cols);
    let k = (r.min(full) + 8).min(full);
    let mut rng = StdRng::seed_from_u64(0x6d6f_6473_6572_7665);
    let omega: Vec<f64> = (0..cols * k).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    let mut q = orthonormal_columns(&m.matmul(&Tensor::from_vec(omega, (cols, k), &dev)?)?)?;
    for _ in 0..POWER_ITERS {
        let z = orthonormal_columns(&mt.matmul(&q)?)?;
        q = orthonormal_columns(&m.matmul(&z)?)?;
    }
    let kq = q.dim(1)?;
    if kq == 0 {
        return Err(AdapterError::Tensor("low-rank compression of an all-zero delta".into()));
    }
    let b = q.t()?.contiguous()?.matmul(&m)?;
    let g = b.matmul(&b.t()?.contiguous()?)?.flatten_all()?.to_vec1::<f64>()?;
    let (vals, vecs) = sym_eigen(g, kq);
    let mut order: Vec<usize> = (0..kq).collect();
    order.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]).then(i.cmp(&j)));
    let top = vals[order[0]].max(0.0);
    let keep: Vec<usize> = order.into_iter().take(r).filter(|&i| vals[i] > top * 1e-24).collect();
    let u: Vec<f64> = (0..kq).flat_map(|row| keep.iter().map(move |&c| (row, c))).map(|(row, c)| vecs[row * kq + c]).collect();
    let p = q.matmul(&Tensor::from_vec(u, (kq, keep.len()), &dev)?)?;
    let a = p.t()?.contiguous()?.matmul(&m)?;
    let (a, p) = (a.to_dtype(DType::F32)?, p.to_dtype(DType::F32)?);
    let approx = p.matmul(&a)?.to_dtype(DType::F64)?;
    let e2 = (m - approx)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((MatrixDelta::LowRank { a, b: p }, e2))
}

/// Orthonormalizes the columns of `y` `[n, k]` (modified Gram-Schmidt, twice), dropping columns
/// that vanish (rank deficiency); returns `[n, k']`.
fn orthonormal_columns(y: &Tensor) -> Result<Tensor, AdapterError> {
    let n = y.dim(0)?;
    let cols = y.t()?.contiguous()?.to_vec2::<f64>()?;
    let scale = cols.iter().map(|c| norm(c)).fold(0f64, f64::max);
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(cols.len());
    for mut c in cols {
        for _ in 0..2 {
            for q in &basis {
                let dot: f64 = c.iter().zip(q).map(|(a, b)| a * b).sum();
                c.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let nc = norm(&c);
        if nc > scale * 1e-12 && nc > 0.0 {
            c.iter_mut().for_each(|a| *a /= nc);
            basis.push(c);
        }
    }
    let k = basis.len();
    let flat: Vec<f64> = basis.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (k, n), &Device::Cpu)?.t()?.contiguous()?)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Eigen-decomposition of a symmetric `n x n` row-major matrix by cyclic Jacobi rotations:
/// eigenvalues and the eigenvectors as the columns of a row-major `n x n` matrix.
fn sym_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    for _ in 0..100 {
        let total: f64 = a.iter().map(|x| x * x).sum();
        let off: f64 = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).map(|(i, j)| a[i * n + j].powi(2)).sum();
        if off <= 1e-30 * total || total == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (x, y) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * x - s * y;
                    a[k * n + q] = s * x + c * y;
                }
                for k in 0..n {
                    let (x, y) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * x - s * y;
                    a[q * n + k] = s * x + c * y;
                }
                for k in 0..n {
                    let (x, y) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * x - s * y;
                    v[k * n + q] = s * x + c * y;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::LlamaConfig;
    use crate::model::linear::{LinearId, Proj};
    use std::collections::HashMap;

    /// q_proj 8x8, k/v 4x8, gate/up 12x8, down 8x12, embeddings 16x8, two layers.
    pub(crate) fn tiny_base() -> BaseShapes {
        BaseShapes::new(LlamaConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![2],
        })
    }

    /// Writes f32 tensors `(name, shape, values)` to a safetensors file.
    pub(crate) fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, v)| (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
            .iter()
            .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
    }

    const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

    #[test]
    fn task_vector_loads_dense_f32_and_converts_f16() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tv.safetensors");
        write_f32(&p, &[(Q0, vec![8, 8], (0..64).map(|i| i as f32 * 0.5).collect())]);
        let d = load_task_vector(&p, &tiny_base()).unwrap();
        let t = Target::Linear(LinearId { layer: 0, proj: Proj::Q });
        let v = d.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[3], 1.5);
        assert_eq!(v[63], 31.5);

        // F16 values 1.0, -2.5 (0x3C00, 0xC100) for a 4x8 k_proj.
        let mut bytes = Vec::new();
        for i in 0..32 {
            bytes.extend_from_slice(&(if i % 2 == 0 { 0x3C00u16 } else { 0xC100u16 }).to_le_bytes());
        }
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![4, 8], &bytes).unwrap();
        let p16 = dir.path().join("tv16.safetensors");
        safetensors::serialize_to_file(vec![("model.layers.1.self_attn.k_proj.weight", view)], None, &p16).unwrap();
        let d = load_task_vector(&p16, &tiny_base()).unwrap();
        let t = Target::Linear(LinearId { layer: 1, proj: Proj::K });
        let v = d.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[..2], &[1.0, -2.5]);
    }

    #[test]
    fn task_vector_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tv.safetensors");
        write_f32(&p, &[(Q0, vec![4, 8], vec![0.0; 32])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::Shape { .. })));
        write_f32(&p, &[("model.layers.5.self_attn.q_proj.weight", vec![8, 8], vec![0.0; 64])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::UnknownTarget { .. })));
        write_f32(&p, &[(Q0, vec![8, 8], vec![f32::NAN; 64])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::NonFinite { .. })));
        write_f32(&p, &[(Q0, vec![8, 8], vec![1.0; 64])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = load_task_vector(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("tv.safetensors"), "{e}");
        let e = load_task_vector(&dir.path().join("missing.safetensors"), &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Io { .. }), "{e}");
    }

    #[test]
    fn exact_form_picks_the_cheaper_layout_and_top_k_is_deterministic() {
        // 2 of 6 non-zero: 2 * 3 = 6 is not < 6 -> dense; 1 of 6 -> sparse.
        assert!(matches!(exact_form(2, 3, &[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]).unwrap(), MatrixDelta::Dense(_)));
        match exact_form(2, 3, &[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]).unwrap() {
            MatrixDelta::Sparse(s) => assert_eq!((s.nnz(), s.row(0), s.row(1)), (1, (&[][..], &[][..]), (&[1u16][..], &[2.0f32][..]))),
            other => panic!("{other:?}"),
        }
        let v = [0.5, -3.0, 2.0, -2.0, 0.1];
        assert_eq!(top_k_mask(&v, 2), vec![false, true, true, false, false]); // tie |2| = |-2|: lower index
        assert_eq!(top_k_mask(&v, 0), vec![false; 5]);
        assert_eq!(top_k_mask(&v, 9), vec![true; 5]);
    }

    #[test]
    fn low_rank_is_the_truncated_svd() {
        // D = diag(3, 2, 1) padded to 3x4: singular values 3, 2, 1, ||D||^2 = 14.
        let mut d = vec![0f32; 12];
        d[0] = 3.0;
        d[5] = 2.0;
        d[10] = 1.0;
        for (r, want_e2) in [(1, 5.0), (2, 1.0), (3, 0.0), (7, 0.0)] {
            let (m, e2) = low_rank(&d, 3, 4, r).unwrap();
            assert!((e2 - want_e2).abs() < 1e-5, "r={r}: {e2}");
            let got = m.to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!((got[0] - 3.0).abs() < 1e-6, "r={r}: {got:?}");
            assert_eq!(m.dims().unwrap(), (3, 4));
        }
        // Rank one u v^T with u = (1, 2), v = (1, -1, 0.5): exact at r = 1.
        let d: Vec<f32> = [1.0f32, 2.0].iter().flat_map(|u| [1.0f32, -1.0, 0.5].map(|v| u * v)).collect();
        let (m, e2) = low_rank(&d, 2, 3, 1).unwrap();
        assert!(e2 < 1e-10, "{e2}");
        let got = m.to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        got.iter().zip(&d).for_each(|(g, w)| assert!((g - w).abs() < 1e-6, "{got:?}"));
    }

    #[test]
    fn fisher_rejects_negative_and_non_finite_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        write_f32(&p, &[(Q0, vec![8, 8], vec![0.25; 64])]);
        let f = load_fisher(&p, &tiny_base()).unwrap();
        assert_eq!(f.tensors.len(), 1);
        let mut v = vec![0.25; 64];
        v[7] = -1e-3;
        write_f32(&p, &[(Q0, vec![8, 8], v.clone())]);
        let e = load_fisher(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("negative"), "{e}");
        v[7] = f32::INFINITY;
        write_f32(&p, &[(Q0, vec![8, 8], v)]);
        assert!(matches!(load_fisher(&p, &tiny_base()), Err(AdapterError::NonFinite { .. })));
    }
}
