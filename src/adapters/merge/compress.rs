//! Storage of dense deltas computed by merges: the cheapest exact form, top-k sparsification and
//! truncated-SVD low-rank compression.
//!
//! Invariants: [`exact_form`] is lossless; [`low_rank`] is deterministic (fixed seed) and returns
//! the squared Frobenius error of the factors it stores; [`top_k_mask`] breaks ties by index.
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adapters::error::AdapterError;
use crate::adapters::module_deltas::MatrixDelta;
use crate::kernels::sparse_layout::SparseMatrix;

/// The cheapest exact storage of a dense `[rows, cols]` delta: CSR (8 bytes per non-zero) when
/// fewer than a third of the elements are non-zero, else dense (4 bytes per element).
pub fn exact_form(rows: usize, cols: usize, d: &[f32]) -> Result<MatrixDelta, AdapterError> {
    let nnz = d.iter().filter(|x| **x != 0.0).count();
    if nnz * 3 < d.len() {
        let (flat, vals): (Vec<u64>, Vec<f32>) = d.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, v)| (i as u64, *v)).unzip();
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
mod tests {
    use super::*;

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
}
