//! The common currency of every adapter kind: a module's additive change to the base model,
//! per target, in the cheapest exact form (low-rank factors, sparse CSR by output row, or dense).
//!
//! Formats (PEFT LoRA, Poly, composable-sft, task vectors, merges) all produce a [`ModuleDeltas`];
//! the batch step only ever sees these. Invariants: shapes match the base parameter they target
//! (checked by [`ModuleDeltas::validate`] against a [`BaseShapes`]); values are finite; low-rank
//! factors have any module scale folded into `b`; tensors are float32 and immutable once built.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::error::AdapterError;
use crate::model::config::LlamaConfig;
use crate::model::linear::{LinearId, Proj};

/// A sparse matrix `[rows, cols]` in CSR order by row (for a linear weight, rows are outputs).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMatrix {
    pub rows: usize,
    pub cols: usize,
    /// `row_ptr[r]..row_ptr[r+1]` index `col_idx` / `values` for row `r`.
    pub row_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseMatrix {
    /// Builds from row-major flat indices (`r * cols + c`) and values; duplicates are summed.
    pub fn from_flat(rows: usize, cols: usize, flat: &[u64], values: &[f32]) -> Result<Self, String> {
        if flat.len() != values.len() {
            return Err(format!("{} indices but {} values", flat.len(), values.len()));
        }
        let total = (rows as u64) * (cols as u64);
        let mut entries: Vec<(u64, f32)> = Vec::with_capacity(flat.len());
        for (&f, &v) in flat.iter().zip(values) {
            if f >= total {
                return Err(format!("index {f} is outside a {rows}x{cols} matrix"));
            }
            entries.push((f, v));
        }
        entries.sort_unstable_by_key(|e| e.0);
        let mut row_ptr = vec![0u32; rows + 1];
        let mut col_idx = Vec::with_capacity(entries.len());
        let mut vals: Vec<f32> = Vec::with_capacity(entries.len());
        let mut last: Option<u64> = None;
        for (f, v) in entries {
            if last == Some(f) {
                *vals.last_mut().expect("a previous entry") += v;
                continue;
            }
            last = Some(f);
            row_ptr[(f / cols as u64) as usize + 1] += 1;
            col_idx.push((f % cols as u64) as u32);
            vals.push(v);
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        Ok(Self { rows, cols, row_ptr, col_idx, values: vals })
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// `y[k, r] += scale * sum_c M[r, c] * x[k, c]` for host row-major buffers.
    pub fn add_matmul_t(&self, x: &[f32], n: usize, y: &mut [f32], scale: f32) {
        for k in 0..n {
            let xr = &x[k * self.cols..(k + 1) * self.cols];
            let yr = &mut y[k * self.rows..(k + 1) * self.rows];
            for r in 0..self.rows {
                let (s, e) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                if s == e {
                    continue;
                }
                let mut acc = 0f32;
                for i in s..e {
                    acc += self.values[i] * xr[self.col_idx[i] as usize];
                }
                yr[r] += scale * acc;
            }
        }
    }

    /// `out += scale * M[row, :]` (embedding lookup of one row).
    pub fn add_row(&self, row: usize, out: &mut [f32], scale: f32) {
        let (s, e) = (self.row_ptr[row] as usize, self.row_ptr[row + 1] as usize);
        for i in s..e {
            out[self.col_idx[i] as usize] += scale * self.values[i];
        }
    }

    /// Dense copy (tests, merges).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.add_row(r, &mut d[r * self.cols..(r + 1) * self.cols], 1.0);
        }
        d
    }

    pub fn bytes(&self) -> usize {
        self.row_ptr.len() * 4 + self.col_idx.len() * 4 + self.values.len() * 4
    }
}

/// The change to one parameter matrix `[out, in]`.
#[derive(Debug, Clone)]
pub enum MatrixDelta {
    /// `delta = b @ a`, `a: [r, in]`, `b: [out, r]` (scale folded into `b`).
    LowRank { a: Tensor, b: Tensor },
    Sparse(SparseMatrix),
    /// `[out, in]`.
    Dense(Tensor),
}

impl MatrixDelta {
    /// `(out, in)` of the delta.
    pub fn dims(&self) -> Result<(usize, usize), AdapterError> {
        Ok(match self {
            Self::LowRank { a, b } => (b.dim(0)?, a.dim(1)?),
            Self::Sparse(s) => (s.rows, s.cols),
            Self::Dense(d) => d.dims2()?,
        })
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Self::LowRank { a, b } => (a.elem_count() + b.elem_count()) * 4,
            Self::Sparse(s) => s.bytes(),
            Self::Dense(d) => d.elem_count() * 4,
        }
    }

    /// Dense `[out, in]` f32 copy (merges and tests only; never on the serving path).
    pub fn to_dense(&self) -> Result<Tensor, AdapterError> {
        Ok(match self {
            Self::LowRank { a, b } => b.matmul(a)?,
            Self::Sparse(s) => Tensor::from_vec(s.to_dense(), (s.rows, s.cols), &candle_core::Device::Cpu)?,
            Self::Dense(d) => d.clone(),
        })
    }

    /// Multiplies the delta by `s`.
    pub fn scaled(&self, s: f32) -> Result<Self, AdapterError> {
        Ok(match self {
            Self::LowRank { a, b } => Self::LowRank { a: a.clone(), b: (b * s as f64)? },
            Self::Sparse(m) => {
                let mut m = m.clone();
                m.values.iter_mut().for_each(|v| *v *= s);
                Self::Sparse(m)
            }
            Self::Dense(d) => Self::Dense((d * s as f64)?),
        })
    }
}

/// Where a delta applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Linear(LinearId),
    /// `model.embed_tokens.weight` `[vocab, hidden]` (also the output head when tied).
    Embedding,
    /// `lm_head.weight` of an untied model.
    LmHead,
}

impl Target {
    /// Parses a Hugging Face parameter name (`model.layers.3.mlp.up_proj.weight`, ...), accepting
    /// PEFT's `base_model.model.` prefix.
    pub fn from_hf_name(name: &str) -> Option<Target> {
        let name = name.strip_prefix("base_model.model.").unwrap_or(name);
        match name {
            "model.embed_tokens.weight" => return Some(Target::Embedding),
            "lm_head.weight" => return Some(Target::LmHead),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let rest = rest.strip_suffix(".weight")?;
        let (parent, proj) = rest.split_once('.')?;
        let proj = Proj::from_hf_name(proj)?;
        (proj.hf_parent() == parent).then_some(Target::Linear(LinearId { layer, proj }))
    }

    /// The Hugging Face parameter name.
    pub fn hf_name(&self) -> String {
        match self {
            Target::Linear(id) => id.hf_weight_name(),
            Target::Embedding => "model.embed_tokens.weight".into(),
            Target::LmHead => "lm_head.weight".into(),
        }
    }
}

/// The shapes of the base model's adaptable parameters.
#[derive(Debug, Clone)]
pub struct BaseShapes {
    pub cfg: LlamaConfig,
}

impl BaseShapes {
    pub fn new(cfg: LlamaConfig) -> Self {
        Self { cfg }
    }

    /// `(rows, cols)` of the parameter, or None if the model has no such parameter.
    pub fn shape(&self, t: Target) -> Option<(usize, usize)> {
        let c = &self.cfg;
        let (h, q, kv, ff) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
        match t {
            Target::Embedding => Some((c.vocab_size, h)),
            Target::LmHead => (!c.tie_word_embeddings).then_some((c.vocab_size, h)),
            Target::Linear(id) if id.layer >= c.num_hidden_layers => None,
            Target::Linear(id) => Some(match id.proj {
                Proj::Q => (q, h),
                Proj::K | Proj::V => (kv, h),
                Proj::O => (h, q),
                Proj::Gate | Proj::Up => (ff, h),
                Proj::Down => (h, ff),
            }),
        }
    }
}

/// Low-rank factors laid out for the per-row CPU kernel: `at` `[in, r]` = A^T and `bt` `[r, out]` =
/// B^T (scale folded), so both products are contiguous axpy loops that vectorise.
///
/// With `half`, the factors are held as f16 (IEEE binary16) and widened in the kernel: decode rows
/// of distinct adapters are bound by reading their factors, and half the bytes is half the time.
/// The server picks this when the base weights are block-quantized (8-bit), where f16 factors
/// (11-bit mantissa) are far finer than the base they adjust; with f32 base weights (the parity
/// mode) the factors stay f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLowRank {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    factors: HostFactors,
}

#[derive(Debug, Clone, PartialEq)]
enum HostFactors {
    F32 { at: Vec<f32>, bt: Vec<f32> },
    F16 { at: Vec<half::f16>, bt: Vec<half::f16> },
}

impl HostLowRank {
    fn from_factors(a: &Tensor, b: &Tensor, half: bool) -> Result<Self, AdapterError> {
        let (rank, in_dim) = a.dims2()?;
        let out_dim = b.dim(0)?;
        // a [rank, in] -> at [in, rank]; b [out, rank] -> bt [rank, out], read in place from the
        // tensors and written once in the final type (no f32 staging copy: fresh pages were most
        // of the cost of preparing a 10 MB LoRA).
        // Each output row is gathered into a small f32 buffer, then converted as one slice
        // (F16C where available; per-element f16 conversion doubled the preparation time).
        fn transpose<T: Copy + Default>(t: &Tensor, rows: usize, cols: usize, conv: impl Fn(&[f32], &mut [T])) -> candle_core::Result<Vec<T>> {
            crate::model::qgemm::with_host_f32(t, |v| {
                let mut out = vec![T::default(); rows * cols];
                let mut col = vec![0f32; rows];
                for (c, dst) in out.chunks_exact_mut(rows).enumerate() {
                    for (r, x) in col.iter_mut().enumerate() {
                        *x = v[r * cols + c];
                    }
                    conv(&col, dst);
                }
                Ok(out)
            })
        }
        let factors = if half {
            use half::slice::HalfFloatSliceExt;
            let h = |src: &[f32], dst: &mut [half::f16]| dst.convert_from_f32_slice(src);
            HostFactors::F16 { at: transpose(a, rank, in_dim, h)?, bt: transpose(b, out_dim, rank, h)? }
        } else {
            let f = |src: &[f32], dst: &mut [f32]| dst.copy_from_slice(src);
            HostFactors::F32 { at: transpose(a, rank, in_dim, f)?, bt: transpose(b, out_dim, rank, f)? }
        };
        Ok(Self { rank, in_dim, out_dim, factors })
    }

    /// Whether the factors are held as f16.
    pub fn is_half(&self) -> bool {
        matches!(self.factors, HostFactors::F16 { .. })
    }

    /// `y += scale * (x A^T) B^T` for one row `x` (`in_dim`) into `y` (`out_dim`).
    pub fn add_row(&self, x: &[f32], y: &mut [f32], scale: f32) {
        assert!(x.len() == self.in_dim && y.len() == self.out_dim, "row of the wrong width");
        #[cfg(target_arch = "x86_64")]
        {
            if self.rank == 8 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c") {
                // SAFETY: the CPU supports the features; widths were checked above and the
                // factors hold in_dim x 8 and 8 x out_dim values.
                unsafe {
                    match &self.factors {
                        HostFactors::F32 { at, bt } => rank8_avx2(x, y, scale, at.as_ptr(), bt.as_ptr(), |p| _mm256_loadu_ps(p)),
                        HostFactors::F16 { at, bt } => rank8_avx2(x, y, scale, at.as_ptr(), bt.as_ptr(), |p| {
                            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
                        }),
                    }
                }
                return;
            }
        }
        match &self.factors {
            HostFactors::F32 { at, bt } => add_row_generic(self.rank, self.out_dim, x, y, scale, at, bt, |v| *v),
            HostFactors::F16 { at, bt } => add_row_generic(self.rank, self.out_dim, x, y, scale, at, bt, |v| v.to_f32()),
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.factors {
            HostFactors::F32 { at, bt } => (at.len() + bt.len()) * 4,
            HostFactors::F16 { at, bt } => (at.len() + bt.len()) * 2,
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m128i, __m256, _mm256_cvtph_ps, _mm256_loadu_ps, _mm_loadu_si128};

/// Rank-8 row kernel: four independent accumulators for `x A^T`, then one pass over `y` per 8
/// outputs for the second product. `load` reads 8 factor values (f32 or f16) as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rank8_avx2<T>(x: &[f32], y: &mut [f32], scale: f32, ap: *const T, bp: *const T, load: impl Fn(*const T) -> __m256) {
    use std::arch::x86_64::*;
    let (n, out) = (x.len(), y.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 4 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i + u)), load(ap.add((i + u) * 8)), *a);
        }
        i += 4;
    }
    while i < n {
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i)), load(ap.add(i * 8)), acc[0]);
        i += 1;
    }
    let t = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])), _mm256_set1_ps(scale));
    let mut tj = [0f32; 8];
    _mm256_storeu_ps(tj.as_mut_ptr(), t);
    let tb: [__m256; 8] = std::array::from_fn(|j| _mm256_set1_ps(tj[j]));
    let yp = y.as_mut_ptr();
    let mut o = 0;
    while o + 8 <= out {
        let mut v = _mm256_loadu_ps(yp.add(o));
        for (j, t) in tb.iter().enumerate() {
            v = _mm256_fmadd_ps(*t, load(bp.add(j * out + o)), v);
        }
        _mm256_storeu_ps(yp.add(o), v);
        o += 8;
    }
    for oo in o..out {
        // Tail columns: one value at a time (a vector load would read past the factor).
        let mut v = *yp.add(oo);
        for (j, t) in tj.iter().enumerate() {
            v += t * scalar_of(bp.add(j * out + oo));
        }
        *yp.add(oo) = v;
    }
}

/// Reads one factor value (f32 or f16) as f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scalar_of<T>(p: *const T) -> f32 {
    if std::mem::size_of::<T>() == 2 {
        half::f16::from_bits(*(p as *const u16)).to_f32()
    } else {
        *(p as *const f32)
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn add_row_generic<T>(r: usize, out: usize, x: &[f32], y: &mut [f32], scale: f32, at: &[T], bt: &[T], f: impl Fn(&T) -> f32) {
    let mut t = vec![0f32; r];
    for (xi, row) in x.iter().zip(at.chunks_exact(r)) {
        if *xi != 0.0 {
            for (tj, a) in t.iter_mut().zip(row) {
                *tj += xi * f(a);
            }
        }
    }
    for (tj, row) in t.iter().zip(bt.chunks_exact(out)) {
        let s = tj * scale;
        for (yo, b) in y.iter_mut().zip(row) {
            *yo += s * f(b);
        }
    }
}

/// One module's deltas, by target.
#[derive(Debug, Clone, Default)]
pub struct ModuleDeltas {
    pub targets: BTreeMap<Target, MatrixDelta>,
    /// CPU layout of the low-rank targets, built once by [`ModuleDeltas::prepare_host`].
    host: std::sync::OnceLock<BTreeMap<Target, HostLowRank>>,
}

impl ModuleDeltas {
    /// Resident bytes (tensors plus the CPU kernel layout once prepared).
    pub fn bytes(&self) -> usize {
        let host: usize = self.host.get().map(|h| h.values().map(HostLowRank::bytes).sum()).unwrap_or(0);
        self.targets.values().map(|d| d.bytes()).sum::<usize>() + host
    }

    /// Builds the CPU kernel layout of the low-rank targets (idempotent; call off the engine
    /// thread); `half`: hold the factors as f16 (see [`HostLowRank`]).
    pub fn prepare_host(&self, half: bool) -> Result<(), AdapterError> {
        if self.host.get().is_some() {
            return Ok(());
        }
        use rayon::prelude::*;
        // In parallel: a cold load waits on this.
        let m: BTreeMap<Target, HostLowRank> = self
            .targets
            .par_iter()
            .filter_map(|(t, d)| match d {
                MatrixDelta::LowRank { a, b } if a.device().is_cpu() => Some(HostLowRank::from_factors(a, b, half).map(|h| (*t, h))),
                _ => None,
            })
            .collect::<Result<_, _>>()?;
        let _ = self.host.set(m);
        Ok(())
    }

    /// The CPU layout of a low-rank target, if prepared.
    pub fn host_low_rank(&self, t: &Target) -> Option<&HostLowRank> {
        self.host.get()?.get(t)
    }

    /// Checks every target exists in the base model with the delta's shape and that all values
    /// are finite. `path` names the source in errors.
    pub fn validate(&self, base: &BaseShapes, path: &Path) -> Result<(), AdapterError> {
        use rayon::prelude::*;
        // Targets are checked in parallel (a cold load waits on this); the first failing target
        // in order is reported, as a sequential check would.
        let checked: Vec<Result<(), AdapterError>> = self
            .targets
            .par_iter()
            .map(|(t, d)| {
                let want = base
                    .shape(*t)
                    .ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: t.hf_name() })?;
                let got = d.dims()?;
                if got != want {
                    return Err(AdapterError::Shape {
                        path: path.into(),
                        tensor: t.hf_name(),
                        expected: vec![want.0, want.1],
                        got: vec![got.0, got.1],
                    });
                }
                check_finite(d, path, &t.hf_name())
            })
            .collect();
        checked.into_iter().collect()
    }
}

fn check_finite(d: &MatrixDelta, path: &Path, name: &str) -> Result<(), AdapterError> {
    let bad = |v: &[f32]| v.iter().find(|x| !x.is_finite()).map(|x| if x.is_nan() { "NaN" } else { "infinite" });
    let host = |t: &Tensor| crate::model::qgemm::with_host_f32(t, |v| Ok(bad(v)));
    let found = match d {
        MatrixDelta::Sparse(s) => bad(&s.values),
        MatrixDelta::Dense(t) => host(t)?,
        MatrixDelta::LowRank { a, b } => host(a)?.or(host(b)?),
    };
    match found {
        Some(what) => Err(AdapterError::NonFinite { path: path.into(), tensor: name.into(), what }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-row kernels (rank-8 SIMD and generic, f32 and f16 factors, widths that are not
    /// multiples of 8) against `scale * x (B A)^T` computed by candle.
    #[test]
    fn host_low_rank_row_kernels_match_the_dense_product() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let dev = candle_core::Device::Cpu;
        for &(r, inp, out) in &[(8, 576, 192), (8, 37, 21), (4, 64, 40), (16, 33, 70)] {
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let x: Vec<f32> = (0..inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let (at, bt) = (Tensor::from_vec(a, (r, inp), &dev).unwrap(), Tensor::from_vec(b, (out, r), &dev).unwrap());
            let xt = Tensor::from_vec(x.clone(), (1, inp), &dev).unwrap();
            let want = (xt.matmul(&bt.matmul(&at).unwrap().t().unwrap()).unwrap() * 0.75).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for half in [false, true] {
                let h = HostLowRank::from_factors(&at, &bt, half).unwrap();
                assert_eq!(h.is_half(), half);
                let mut y: Vec<f32> = (0..out).map(|i| i as f32).collect();
                h.add_row(&x, &mut y, 0.75);
                // f16 factors: ~1e-3 relative per factor value.
                let tol = if half { 2e-2 } else { 1e-4 };
                for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                    let g = g - i as f32;
                    assert!((g - w).abs() <= tol * (1.0 + w.abs()), "r={r} {inp}->{out} half={half} [{i}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn csr_from_flat_sums_duplicates_and_multiplies() {
        // M = [[0, 2, 0], [1, 0, 3]]
        let m = SparseMatrix::from_flat(2, 3, &[1, 3, 5, 5], &[2.0, 1.0, 1.0, 2.0]).unwrap();
        assert_eq!(m.nnz(), 3);
        assert_eq!(m.to_dense(), vec![0.0, 2.0, 0.0, 1.0, 0.0, 3.0]);
        let x = [1.0, 10.0, 100.0, 2.0, 20.0, 200.0];
        let mut y = vec![0.0; 4];
        m.add_matmul_t(&x, 2, &mut y, 0.5);
        assert_eq!(y, vec![10.0, 150.5, 20.0, 301.0]);
        assert!(SparseMatrix::from_flat(2, 3, &[6], &[1.0]).is_err());
    }

    #[test]
    fn target_names_round_trip() {
        for n in ["model.layers.12.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"] {
            assert_eq!(Target::from_hf_name(n).unwrap().hf_name(), n);
        }
        assert_eq!(
            Target::from_hf_name("base_model.model.model.layers.1.self_attn.q_proj.weight"),
            Some(Target::Linear(LinearId { layer: 1, proj: Proj::Q }))
        );
        assert_eq!(Target::from_hf_name("model.layers.1.mlp.q_proj.weight"), None);
        assert_eq!(Target::from_hf_name("model.layers.1.self_attn.rotary.weight"), None);
    }
}
