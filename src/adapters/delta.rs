//! The common currency of every adapter kind: a module's additive change to the base model,
//! per target, in the cheapest exact form (low-rank factors, sparse by output row in the batched
//! kernel's block layout, or dense).
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

/// A sparse matrix `[rows, cols]` by row (for a linear weight, rows are outputs), laid out in the
/// order the batched kernel reads it: block after block of [`SPARSE_ROW_BLOCK`] rows, within a
/// block the rows in runs of equal length (longest first, ascending index within a run, empty rows
/// last), within a row by column. The kernel then streams each block's non-zeros front to back
/// with a fixed trip count per run: rows of a few non-zeros each (0.5% of 576 columns is about 3)
/// made a row-by-row loop mispredict its exit on almost every row, and jump around in memory.
/// A row's own sum is unchanged by the layout: its non-zeros are still visited by column.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMatrix {
    pub rows: usize,
    pub cols: usize,
    /// 16-bit column indices: every Llama-family weight has at most 65,536 columns (rows are
    /// outputs; embedding and head rows have the hidden size), and a quarter less memory traffic
    /// made the memory-bound kernel faster.
    col_idx: Vec<u16>,
    values: Vec<f32>,
    /// Per row, its first entry in `col_idx` / `values` and its length.
    spans: Vec<(u32, u32)>,
    /// Row index within its block, block after block, in layout order.
    order: Vec<u16>,
    /// `(length, rows)` runs, block after block.
    runs: Vec<(u32, u32)>,
    /// Per block, where it starts in `order`, `runs` and the entries (one extra end entry).
    starts: Vec<(u32, u32, u32)>,
}

/// The widest sparse matrix (16-bit column indices).
pub const MAX_SPARSE_COLS: usize = 1 << 16;

/// Rows per block of the batched sparse kernel: its unit of parallel work and of layout.
pub const SPARSE_ROW_BLOCK: usize = 192;

/// One block of a [`SparseMatrix`] as the kernel reads it.
pub struct SparseBlock<'a> {
    /// Row indices within the block, in layout order.
    pub order: &'a [u16],
    /// `(length, rows)`: the next `rows` rows of `order` hold `length` entries each.
    pub runs: &'a [(u32, u32)],
    /// The block's entries, row after row in `order`.
    pub col_idx: &'a [u16],
    pub values: &'a [f32],
}

impl SparseMatrix {
    /// Builds from row-major flat indices (`r * cols + c`) and values; duplicates are summed.
    pub fn from_flat(rows: usize, cols: usize, flat: &[u64], values: &[f32]) -> Result<Self, String> {
        if flat.len() != values.len() {
            return Err(format!("{} indices but {} values", flat.len(), values.len()));
        }
        if cols > MAX_SPARSE_COLS || flat.len() > u32::MAX as usize {
            return Err(format!(
                "a {rows}x{cols} sparse matrix with {} entries is not supported (at most {MAX_SPARSE_COLS} columns and 2^32 entries)",
                flat.len()
            ));
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
        // CSR by row first (duplicates summed), then the kernel layout.
        let mut row_ptr = vec![0u32; rows + 1];
        let mut csr: Vec<(u16, f32)> = Vec::with_capacity(entries.len());
        let mut last: Option<u64> = None;
        for (f, v) in entries {
            if last == Some(f) {
                csr.last_mut().expect("a previous entry").1 += v;
                continue;
            }
            last = Some(f);
            row_ptr[(f / cols as u64) as usize + 1] += 1;
            csr.push(((f % cols as u64) as u16, v));
        }
        for r in 0..rows {
            row_ptr[r + 1] += row_ptr[r];
        }
        let len = |r: usize| row_ptr[r + 1] - row_ptr[r];
        let mut m = SparseMatrix {
            rows,
            cols,
            col_idx: Vec::with_capacity(csr.len()),
            values: Vec::with_capacity(csr.len()),
            spans: vec![(0, 0); rows],
            order: Vec::with_capacity(rows),
            runs: Vec::new(),
            starts: vec![(0, 0, 0)],
        };
        for r0 in (0..rows).step_by(SPARSE_ROW_BLOCK) {
            let r1 = (r0 + SPARSE_ROW_BLOCK).min(rows);
            let mut local: Vec<u16> = (0..(r1 - r0) as u16).collect();
            local.sort_by_key(|&i| std::cmp::Reverse(len(r0 + i as usize)));
            let first_run = m.runs.len();
            for &i in &local {
                let r = r0 + i as usize;
                let l = len(r);
                let block_runs = &mut m.runs[first_run..];
                match block_runs.last_mut() {
                    Some((rl, n)) if *rl == l => *n += 1,
                    _ => m.runs.push((l, 1)),
                }
                m.spans[r] = (m.col_idx.len() as u32, l);
                for &(c, v) in &csr[row_ptr[r] as usize..row_ptr[r + 1] as usize] {
                    m.col_idx.push(c);
                    m.values.push(v);
                }
            }
            m.order.extend(local);
            m.starts.push((m.order.len() as u32, m.runs.len() as u32, m.col_idx.len() as u32));
        }
        Ok(m)
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Row `r`'s column indices (ascending) and values.
    pub fn row(&self, r: usize) -> (&[u16], &[f32]) {
        let (s, n) = self.spans[r];
        let (s, e) = (s as usize, (s + n) as usize);
        (&self.col_idx[s..e], &self.values[s..e])
    }

    /// Every stored value, in layout order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Block `b` (rows `b * SPARSE_ROW_BLOCK..`) in the kernel's layout.
    pub fn block(&self, b: usize) -> SparseBlock<'_> {
        let ((o0, u0, e0), (o1, u1, e1)) = (self.starts[b], self.starts[b + 1]);
        let (e0, e1) = (e0 as usize, e1 as usize);
        SparseBlock {
            order: &self.order[o0 as usize..o1 as usize],
            runs: &self.runs[u0 as usize..u1 as usize],
            col_idx: &self.col_idx[e0..e1],
            values: &self.values[e0..e1],
        }
    }

    /// `y[k, r] += scale * sum_c M[r, c] * x[k, c]` for host row-major buffers.
    pub fn add_matmul_t(&self, x: &[f32], n: usize, y: &mut [f32], scale: f32) {
        for k in 0..n {
            let xr = &x[k * self.cols..(k + 1) * self.cols];
            let yr = &mut y[k * self.rows..(k + 1) * self.rows];
            for (r, yv) in yr.iter_mut().enumerate() {
                let (cols, vals) = self.row(r);
                if cols.is_empty() {
                    continue;
                }
                let mut acc = 0f32;
                for (&c, &v) in cols.iter().zip(vals) {
                    acc += v * xr[c as usize];
                }
                *yv += scale * acc;
            }
        }
    }

    /// `out += scale * M[row, :]` (embedding lookup of one row).
    pub fn add_row(&self, row: usize, out: &mut [f32], scale: f32) {
        let (cols, vals) = self.row(row);
        for (&c, &v) in cols.iter().zip(vals) {
            out[c as usize] += scale * v;
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

    /// The matrix times `s`.
    pub fn scaled(&self, s: f32) -> Self {
        let mut m = self.clone();
        m.values.iter_mut().for_each(|v| *v *= s);
        m
    }

    pub fn bytes(&self) -> usize {
        let layout = self.spans.len() * 8 + self.order.len() * 2 + self.runs.len() * 8 + self.starts.len() * 12;
        self.col_idx.len() * 2 + self.values.len() * 4 + layout
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
            Self::Sparse(m) => Self::Sparse(m.scaled(s)),
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
/// With `compact` (rank 8 only), both factors are held as 8-bit blocks for a VNNI kernel: the
/// row `x` is quantized per 32 inputs as the base kernel quantizes activations, `x A^T` is an
/// int8 dot product per block, the 8 values of `t` are quantized to 8 bits, and `t B^T` is an
/// int8 dot product per output. Decode rows of distinct adapters read their own factors, which
/// made the f32/f16 row kernels the main cost of mixed LoRA batches (measured on one core for
/// 32 distinct r=8 all-projection LoRAs per step: f32 15.5 ms, f16 9.4 ms, float kernel over
/// int8 storage 9.5 ms: bound by the widening instructions, not the bytes). The server picks this
/// when the base weights are 8-bit blocks run by the VNNI kernel themselves (error of the delta
/// about 1% of its norm, far below the base's quantization error); with f32 base weights (the
/// parity mode) the factors stay f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLowRank {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    factors: HostFactors,
}

/// Inputs per quantization block of compact factors (and of the quantized row).
pub const FACTOR_BLOCK: usize = 32;

#[derive(Debug, Clone, PartialEq)]
enum HostFactors {
    F32 { at: Vec<f32>, bt: Vec<f32> },
    /// Rank 8. `a4`: `[in_pad / 4][8][4]` bytes `q + 128` (4 consecutive inputs of one rank
    /// column per 32-bit lane, as `vpdpbusd` reads them), `in_pad` = `in` rounded up to
    /// [`FACTOR_BLOCK`], zero-padded; `sa`: `[in_pad / 32][8]` absmax/127 scales per (input
    /// block, rank column). `b8`: `[out_pad][8]` bytes `q + 128` (one output's 8 rank values in
    /// two lanes), `out_pad` = `out` rounded up to 8; `sb`: one absmax/127 scale per 32 outputs
    /// (all 8 columns).
    Int8 { a4: Vec<u8>, sa: Vec<f32>, b8: Vec<u8>, sb: Vec<f32> },
}

/// Rank of the compact layout.
const COMPACT_RANK: usize = 8;

/// `round(s)` (half away from zero, as Q8_0) clamped to +-127. The cast rounds without a libm
/// call (`f32::round` is one, and made packing twice as slow).
fn round_i8(s: f32) -> i8 {
    ((s + 0.5f32.copysign(s)) as i32).clamp(-127, 127) as i8
}

/// `round(v * inv)` clamped to +-127 ([`round_i8`]), stored `+ 128`.
fn q8(v: f32, inv: f32) -> u8 {
    (round_i8(v * inv) as u8).wrapping_add(128)
}

/// `a` `[8, in]` (row-major, as stored by PEFT) as [`HostFactors::Int8`]'s `a4`, `sa`.
fn pack_a(a: &[f32], n: usize) -> (Vec<u8>, Vec<f32>) {
    const R: usize = COMPACT_RANK;
    let blocks = n.div_ceil(FACTOR_BLOCK);
    let (mut a4, mut sa) = (vec![128u8; blocks * FACTOR_BLOCK * R], vec![0f32; blocks * R]);
    for (j, row) in a.chunks_exact(n).enumerate() {
        for (blk, vals) in row.chunks(FACTOR_BLOCK).enumerate() {
            let d = vals.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            sa[blk * R + j] = d;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (k, v) in vals.iter().enumerate() {
                let i = blk * FACTOR_BLOCK + k;
                a4[((i / 4) * R + j) * 4 + i % 4] = q8(*v, inv);
            }
        }
    }
    (a4, sa)
}

/// `b` `[out, 8]` (row-major, as stored by PEFT) as [`HostFactors::Int8`]'s `b8`, `sb`.
fn pack_b(b: &[f32], out: usize) -> (Vec<u8>, Vec<f32>) {
    const R: usize = COMPACT_RANK;
    let blocks = out.div_ceil(FACTOR_BLOCK);
    let (mut b8, mut sb) = (vec![128u8; out.div_ceil(8) * 8 * R], vec![0f32; blocks]);
    for blk in 0..blocks {
        let vals = &b[blk * FACTOR_BLOCK * R..((blk + 1) * FACTOR_BLOCK).min(out) * R];
        let d = vals.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        sb[blk] = d;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (k, v) in vals.iter().enumerate() {
            b8[blk * FACTOR_BLOCK * R + k] = q8(*v, inv);
        }
    }
    (b8, sb)
}

impl HostLowRank {
    fn from_factors(a: &Tensor, b: &Tensor, compact: bool) -> Result<Self, AdapterError> {
        let (rank, in_dim) = a.dims2()?;
        let out_dim = b.dim(0)?;
        // a [rank, in] -> at [in, rank]; b [out, rank] -> bt [rank, out], read in place from the
        // tensors (no staging copy of the tensor data).
        fn transpose(t: &Tensor, rows: usize, cols: usize) -> candle_core::Result<Vec<f32>> {
            crate::model::qgemm::with_host_f32(t, |v| {
                let mut out = vec![0f32; rows * cols];
                for (r, row) in v.chunks_exact(cols).enumerate() {
                    for (c, &x) in row.iter().enumerate() {
                        out[c * rows + r] = x;
                    }
                }
                Ok(out)
            })
        }
        let factors = if compact && rank == COMPACT_RANK {
            let (a4, sa) = crate::model::qgemm::with_host_f32(a, |v| Ok(pack_a(v, in_dim)))?;
            let (b8, sb) = crate::model::qgemm::with_host_f32(b, |v| Ok(pack_b(v, out_dim)))?;
            HostFactors::Int8 { a4, sa, b8, sb }
        } else {
            HostFactors::F32 { at: transpose(a, rank, in_dim)?, bt: transpose(b, out_dim, rank)? }
        };
        Ok(Self { rank, in_dim, out_dim, factors })
    }

    /// Whether the factors are held as 8-bit blocks.
    pub fn is_compact(&self) -> bool {
        matches!(self.factors, HostFactors::Int8 { .. })
    }

    /// `y += scale * (x A^T) B^T` for one row `x` (`in_dim`) into `y` (`out_dim`).
    pub fn add_row(&self, x: &[f32], y: &mut [f32], scale: f32) {
        assert!(x.len() == self.in_dim && y.len() == self.out_dim, "row of the wrong width");
        #[cfg(target_arch = "x86_64")]
        {
            match &self.factors {
                HostFactors::F32 { at, bt } if self.rank == 8 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") => {
                    // SAFETY: the CPU supports the features; widths were checked above and the
                    // factors hold in_dim x 8 and 8 x out_dim values.
                    unsafe { rank8_f32_avx2(x, y, scale, at, bt) };
                    return;
                }
                HostFactors::Int8 { a4, sa, b8, sb } if crate::model::qgemm::available() => {
                    // SAFETY: the CPU supports the features; the buffers hold the padded sizes
                    // documented on HostFactors::Int8 for these widths.
                    unsafe { rank8_vnni(x, y, scale, a4, sa, b8, sb) };
                    return;
                }
                _ => {}
            }
        }
        self.add_row_generic(x, y, scale);
    }

    /// [`HostLowRank::add_row`] for a row `x` that [`QuantRow::set`] already quantized into `row`:
    /// the targets that read the same input (q, k and v; gate and up) quantize it once. The same
    /// result as `add_row(x, ..)`, bit for bit.
    pub fn add_row_q(&self, x: &[f32], row: &QuantRow, y: &mut [f32], scale: f32) {
        assert!(x.len() == self.in_dim && row.n == x.len() && y.len() == self.out_dim, "row of the wrong width");
        #[cfg(target_arch = "x86_64")]
        if let HostFactors::Int8 { a4, sa, b8, sb } = &self.factors {
            if crate::model::qgemm::available() {
                // SAFETY: the CPU supports the features; the buffers hold the padded sizes
                // documented on HostFactors::Int8 for these widths, and `row` holds whole blocks.
                unsafe { rank8_vnni_q(row, y, scale, a4, sa, b8, sb) };
                return;
            }
        }
        self.add_row(x, y, scale);
    }

    /// Portable form of [`HostLowRank::add_row`] (any rank, any CPU; compact factors are
    /// widened, the row is not quantized).
    fn add_row_generic(&self, x: &[f32], y: &mut [f32], scale: f32) {
        let (r, out) = (self.rank, self.out_dim);
        let mut t = vec![0f32; r];
        match &self.factors {
            HostFactors::F32 { at, bt } => {
                for (xi, row) in x.iter().zip(at.chunks_exact(r)) {
                    for (tj, a) in t.iter_mut().zip(row) {
                        *tj += xi * a;
                    }
                }
                for (tj, row) in t.iter().zip(bt.chunks_exact(out)) {
                    let s = tj * scale;
                    for (yo, b) in y.iter_mut().zip(row) {
                        *yo += s * b;
                    }
                }
            }
            HostFactors::Int8 { a4, sa, b8, sb } => {
                for (i, xi) in x.iter().enumerate() {
                    for (j, tj) in t.iter_mut().enumerate() {
                        let q = a4[((i / 4) * r + j) * 4 + i % 4] as f32 - 128.0;
                        *tj += xi * q * sa[(i / FACTOR_BLOCK) * r + j];
                    }
                }
                for (o, yo) in y.iter_mut().enumerate() {
                    let d = sb[o / FACTOR_BLOCK] * scale;
                    let dot: f32 = t.iter().zip(&b8[o * r..(o + 1) * r]).map(|(tj, q)| tj * (*q as f32 - 128.0)).sum();
                    *yo += d * dot;
                }
            }
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.factors {
            HostFactors::F32 { at, bt } => (at.len() + bt.len()) * 4,
            HostFactors::Int8 { a4, sa, b8, sb } => a4.len() + b8.len() + (sa.len() + sb.len()) * 4,
        }
    }
}

/// Rank-8 row kernel, f32 factors: four independent accumulators for `x A^T`, then one pass over
/// `y` per 8 outputs for the second product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rank8_f32_avx2(x: &[f32], y: &mut [f32], scale: f32, at: &[f32], bt: &[f32]) {
    use std::arch::x86_64::*;
    let (n, out) = (x.len(), y.len());
    let (ap, bp) = (at.as_ptr(), bt.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 4 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i + u)), _mm256_loadu_ps(ap.add((i + u) * 8)), *a);
        }
        i += 4;
    }
    while i < n {
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(i)), _mm256_loadu_ps(ap.add(i * 8)), acc[0]);
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
            v = _mm256_fmadd_ps(*t, _mm256_loadu_ps(bp.add(j * out + o)), v);
        }
        _mm256_storeu_ps(yp.add(o), v);
        o += 8;
    }
    for oo in o..out {
        // Tail columns: one value at a time (a vector load would read past the factor).
        let mut v = *yp.add(oo);
        for (j, t) in tj.iter().enumerate() {
            v += t * *bp.add(j * out + oo);
        }
        *yp.add(oo) = v;
    }
}

thread_local! {
    /// The quantized row of [`rank8_vnni`] (reused: it runs thousands of times per step).
    static ROW_Q: std::cell::RefCell<QuantRow> = std::cell::RefCell::new(QuantRow::default());
}

/// One input row quantized per [`FACTOR_BLOCK`] inputs for the compact rank-8 kernel: 8-bit
/// values (absmax/127 per block, the base kernel's activation scheme), the block scales and the
/// blocks' sums of quantized values. Reused between rows (no allocation once grown).
#[derive(Debug, Default)]
pub struct QuantRow {
    q: Vec<i8>,
    d: Vec<f32>,
    qsum: Vec<i32>,
    n: usize,
}

impl QuantRow {
    /// Quantizes `x` (a no-op where the CPU lacks VNNI: the portable kernels read `x` itself).
    pub fn set(&mut self, x: &[f32]) {
        self.n = x.len();
        #[cfg(target_arch = "x86_64")]
        if crate::model::qgemm::available() {
            let blocks = x.len().div_ceil(FACTOR_BLOCK);
            self.q.resize(blocks * FACTOR_BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.qsum.resize(blocks, 0);
            // SAFETY: the CPU supports the features; the buffers hold `blocks` blocks.
            unsafe { quantize_row(x, &mut self.q, &mut self.d, &mut self.qsum) };
        }
    }
}

/// `x` quantized per 32 inputs (absmax/127, round to nearest even): `q` (zero-padded to whole
/// blocks), per block the scale `d` and the sum of its quantized values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], qsum: &mut [i32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut xb = [0f32; FACTOR_BLOCK];
    for blk in 0..n.div_ceil(FACTOR_BLOCK) {
        let (i0, i1) = (blk * FACTOR_BLOCK, ((blk + 1) * FACTOR_BLOCK).min(n));
        let src: &[f32] = if i1 - i0 == FACTOR_BLOCK {
            &x[i0..i1]
        } else {
            xb.fill(0.0);
            xb[..i1 - i0].copy_from_slice(&x[i0..i1]);
            &xb
        };
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let db = amax / 127.0;
        let inv = _mm512_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
        let ql = _mm512_cvtps_epi32(_mm512_roundscale_ps::<0x08>(_mm512_mul_ps(lo, inv)));
        let qh = _mm512_cvtps_epi32(_mm512_roundscale_ps::<0x08>(_mm512_mul_ps(hi, inv)));
        let qp = q.as_mut_ptr().add(i0);
        _mm_storeu_si128(qp as *mut __m128i, _mm512_cvtsepi32_epi8(ql));
        _mm_storeu_si128(qp.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qh));
        d[blk] = db;
        qsum[blk] = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
    }
}

/// Rank-8 row kernel on [`HostFactors::Int8`] factors (see there for the layouts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn rank8_vnni(x: &[f32], y: &mut [f32], scale: f32, a4: &[u8], sa: &[f32], b8: &[u8], sb: &[f32]) {
    ROW_Q.with_borrow_mut(|row| {
        row.set(x);
        rank8_vnni_q(row, y, scale, a4, sa, b8, sb)
    })
}

/// [`rank8_vnni`] on a row quantized by [`QuantRow::set`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn rank8_vnni_q(row: &QuantRow, y: &mut [f32], scale: f32, a4: &[u8], sa: &[f32], b8: &[u8], sb: &[f32]) {
    use std::arch::x86_64::*;
    let (n, out) = (row.n, y.len());
    let blocks = n.div_ceil(FACTOR_BLOCK);
    debug_assert!(a4.len() == blocks * FACTOR_BLOCK * 8 && sa.len() == blocks * 8);
    debug_assert!(b8.len() == out.div_ceil(8) * 64 && sb.len() == out.div_ceil(FACTOR_BLOCK));
    debug_assert!(row.q.len() == blocks * FACTOR_BLOCK);
    // x A^T: per block of 32 inputs, 8 vpdpbusd over 4 inputs each (a + 128 unsigned, x
    // signed), remove 128 * sum(x_q), scale by d_x * d_a per column.
    let mut t = _mm256_setzero_ps();
    for blk in 0..blocks {
        let qp = row.q.as_ptr().add(blk * FACTOR_BLOCK);
        let ap = a4.as_ptr().add(blk * FACTOR_BLOCK * 8);
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        for g in (0..8).step_by(2) {
            let x0 = _mm256_set1_epi32((qp.add(4 * g) as *const i32).read_unaligned());
            let x1 = _mm256_set1_epi32((qp.add(4 * g + 4) as *const i32).read_unaligned());
            acc0 = _mm256_dpbusd_epi32(acc0, _mm256_loadu_si256(ap.add(g * 32) as *const __m256i), x0);
            acc1 = _mm256_dpbusd_epi32(acc1, _mm256_loadu_si256(ap.add(g * 32 + 32) as *const __m256i), x1);
        }
        let acc = _mm256_sub_epi32(_mm256_add_epi32(acc0, acc1), _mm256_set1_epi32(128 * *row.qsum.get_unchecked(blk)));
        let s = _mm256_mul_ps(_mm256_loadu_ps(sa.as_ptr().add(blk * 8)), _mm256_set1_ps(*row.d.get_unchecked(blk)));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, t);
    }
    // t B^T: t quantized to 8 bits with one scale; per 4 outputs one vpdpbusd against the
    // (lo, hi) halves of t, pairs of lanes summed.
    let mut tv = [0f32; 8];
    _mm256_storeu_ps(tv.as_mut_ptr(), t);
    let tmax = tv.iter().fold(0f32, |m, v| m.max(v.abs()));
    if tmax == 0.0 {
        return;
    }
    let dt = tmax / 127.0;
    let tq: [i8; 8] = std::array::from_fn(|j| round_i8(tv[j] / dt));
    let tsum: i32 = tq.iter().map(|&v| v as i32).sum();
    let lo = i32::from_le_bytes([tq[0] as u8, tq[1] as u8, tq[2] as u8, tq[3] as u8]);
    let hi = i32::from_le_bytes([tq[4] as u8, tq[5] as u8, tq[6] as u8, tq[7] as u8]);
    let pat = _mm256_set_epi32(hi, lo, hi, lo, hi, lo, hi, lo);
    let bias = _mm256_set1_epi32(128 * tsum);
    let yp = y.as_mut_ptr();
    let bp = b8.as_ptr();
    let mut o = 0;
    while o < out {
        let r1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(bp.add(o * 8) as *const __m256i), pat);
        let r2 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(bp.add(o * 8 + 32) as *const __m256i), pat);
        // hadd gives outputs (0, 1, 4, 5 | 2, 3, 6, 7); the 64-bit permute restores the order.
        let h = _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(r1, r2));
        let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(h, bias));
        let s = _mm256_set1_ps(scale * dt * *sb.get_unchecked(o / FACTOR_BLOCK));
        if o + 8 <= out {
            _mm256_storeu_ps(yp.add(o), _mm256_fmadd_ps(v, s, _mm256_loadu_ps(yp.add(o))));
        } else {
            let mut part = [0f32; 8];
            _mm256_storeu_ps(part.as_mut_ptr(), _mm256_mul_ps(v, s));
            for (k, p) in part.iter().enumerate().take(out - o) {
                *yp.add(o + k) += p;
            }
        }
        o += 8;
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

    /// A copy whose low-rank and dense tensors live on `device` (a GPU model's). Sparse matrices
    /// stay on the host: their product runs there (the rows' inputs are copied over and back).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self, AdapterError> {
        let mut targets = BTreeMap::new();
        for (t, d) in &self.targets {
            let moved = match d {
                MatrixDelta::LowRank { a, b } => MatrixDelta::LowRank { a: a.to_device(device)?, b: b.to_device(device)? },
                MatrixDelta::Dense(w) => MatrixDelta::Dense(w.to_device(device)?),
                MatrixDelta::Sparse(s) => MatrixDelta::Sparse(s.clone()),
            };
            targets.insert(*t, moved);
        }
        Ok(Self { targets, host: Default::default() })
    }

    /// Builds the CPU kernel layout of the low-rank targets (idempotent; call off the engine
    /// thread); `compact`: hold rank-8 factors as 8-bit blocks (see [`HostLowRank`]).
    pub fn prepare_host(&self, compact: bool) -> Result<(), AdapterError> {
        if self.host.get().is_some() {
            return Ok(());
        }
        use rayon::prelude::*;
        // In parallel: a cold load waits on this.
        let m: BTreeMap<Target, HostLowRank> = self
            .targets
            .par_iter()
            .filter_map(|(t, d)| match d {
                MatrixDelta::LowRank { a, b } if a.device().is_cpu() => Some(HostLowRank::from_factors(a, b, compact).map(|h| (*t, h))),
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
        MatrixDelta::Sparse(s) => bad(s.values()),
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

    /// The per-row kernels (rank-8 SIMD and portable, f32 and compact 8-bit factors, widths that
    /// are not multiples of 8 or of the 32-block) against `scale * x (B A)^T` computed by candle.
    #[test]
    fn host_low_rank_row_kernels_match_the_dense_product() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let dev = candle_core::Device::Cpu;
        for &(r, inp, out) in &[(8, 576, 192), (8, 37, 21), (8, 1536, 576), (8, 64, 1540), (4, 64, 40), (16, 33, 70)] {
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let x: Vec<f32> = (0..inp).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let (at, bt) = (Tensor::from_vec(a, (r, inp), &dev).unwrap(), Tensor::from_vec(b, (out, r), &dev).unwrap());
            let xt = Tensor::from_vec(x.clone(), (1, inp), &dev).unwrap();
            let want = (xt.matmul(&bt.matmul(&at).unwrap().t().unwrap()).unwrap() * 0.75).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let norm = want.iter().map(|w| w * w).sum::<f32>().sqrt();
            let rel = |got: &[f32]| got.iter().zip(&want).map(|(g, w)| (g - w) * (g - w)).sum::<f32>().sqrt() / norm;
            for compact in [false, true] {
                let h = HostLowRank::from_factors(&at, &bt, compact).unwrap();
                assert_eq!(h.is_compact(), compact && r == 8);
                let mut y: Vec<f32> = (0..out).map(|i| (i % 7) as f32).collect();
                h.add_row(&x, &mut y, 0.75);
                // A row quantized once for several targets gives the same bits.
                let mut q = QuantRow::default();
                q.set(&x);
                let mut yq: Vec<f32> = (0..out).map(|i| (i % 7) as f32).collect();
                h.add_row_q(&x, &q, &mut yq, 0.75);
                assert_eq!(y, yq, "r={r} {inp}->{out} compact={compact}: add_row_q differs from add_row");
                let got: Vec<f32> = y.iter().enumerate().map(|(i, g)| g - (i % 7) as f32).collect();
                // The portable kernel (other ranks, other CPUs) on the same factors.
                let mut portable = vec![0f32; out];
                h.add_row_generic(&x, &mut portable, 0.75);
                if h.is_compact() {
                    // 8-bit factors, row and t: about 1% of the product's norm.
                    assert!(rel(&got) <= 0.03, "r={r} {inp}->{out} compact: relative L2 error {}", rel(&got));
                    assert!(rel(&portable) <= 0.03, "r={r} {inp}->{out} compact portable: relative L2 error {}", rel(&portable));
                } else {
                    for (i, ((g, p), w)) in got.iter().zip(&portable).zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "r={r} {inp}->{out} f32 [{i}]: {g} vs {w}");
                        assert!((p - w).abs() <= 1e-4 * (1.0 + w.abs()), "r={r} {inp}->{out} f32 portable [{i}]: {p} vs {w}");
                    }
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
        let e = SparseMatrix::from_flat(1, MAX_SPARSE_COLS + 1, &[0], &[1.0]).unwrap_err();
        assert!(e.contains("at most 65536 columns"), "{e}");
        let wide = SparseMatrix::from_flat(1, MAX_SPARSE_COLS, &[MAX_SPARSE_COLS as u64 - 1], &[1.0]).unwrap();
        assert_eq!(wide.row(0), (&[u16::MAX][..], &[1.0f32][..]));
    }

    /// The kernel layout holds every row of each block exactly once, in runs of rows that
    /// really have the run's length, longest first, and each row's entries equal the CSR
    /// matrix's (checked against the dense copy built entry by entry).
    #[test]
    fn kernel_layout_covers_each_block_in_runs_of_equal_length() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        for (rows, cols, nnz) in [(1, 7, 3), (SPARSE_ROW_BLOCK, 9, 40), (2 * SPARSE_ROW_BLOCK + 37, 50, 3000), (500, 3, 0)] {
            let flat: Vec<u64> = (0..nnz).map(|_| rng.random_range(0..(rows * cols) as u64)).collect();
            let vals: Vec<f32> = (0..nnz).map(|_| rng.random_range(-1f32..1.0)).collect();
            let m = SparseMatrix::from_flat(rows, cols, &flat, &vals).unwrap();
            let mut dense = vec![0f32; rows * cols];
            for (&f, &v) in flat.iter().zip(&vals) {
                dense[f as usize] += v;
            }
            let mut seen_entries = 0;
            for b in 0..rows.div_ceil(SPARSE_ROW_BLOCK) {
                let r0 = b * SPARSE_ROW_BLOCK;
                let w = (rows - r0).min(SPARSE_ROW_BLOCK);
                let blk = m.block(b);
                let mut seen: Vec<u16> = blk.order.to_vec();
                seen.sort_unstable();
                assert_eq!(seen, (0..w as u16).collect::<Vec<_>>(), "block {b} of {rows} rows");
                assert_eq!(blk.runs.iter().map(|r| r.1 as usize).sum::<usize>(), w);
                assert!(blk.runs.windows(2).all(|p| p[0].0 > p[1].0), "runs longest first, one per length: {:?}", blk.runs);
                let (mut k, mut e) = (0, 0);
                for &(len, n) in blk.runs {
                    for &i in &blk.order[k..k + n as usize] {
                        let r = r0 + i as usize;
                        let (cols_r, vals_r) = (&blk.col_idx[e..e + len as usize], &blk.values[e..e + len as usize]);
                        assert_eq!((cols_r, vals_r), m.row(r));
                        assert!(cols_r.windows(2).all(|c| c[0] < c[1]));
                        let want: Vec<(u16, f32)> =
                            (0..cols).filter(|&c| dense[r * cols + c] != 0.0).map(|c| (c as u16, dense[r * cols + c])).collect();
                        let got: Vec<(u16, f32)> = cols_r.iter().copied().zip(vals_r.iter().copied()).collect();
                        assert_eq!(got, want, "row {r}");
                        e += len as usize;
                    }
                    k += n as usize;
                }
                assert_eq!(e, blk.col_idx.len());
                seen_entries += e;
            }
            assert_eq!(seen_entries, m.nnz());
        }
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
