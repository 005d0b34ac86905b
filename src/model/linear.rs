//! The linear layer of the decoder: the single seam where adapter deltas enter.
//!
//! `y = x W^T` runs once over every row of a batch step (base weights, quantized or f32), and the
//! step's [`RowDeltas`] add each composition's deltas to its own rows (with the int8 kernel, the
//! deltas of a layer group are computed beside the base product and added after it). Invariant:
//! the base weight is never mutated; a linear layer knows its [`LinearId`] so deltas can be looked
//! up by (layer, proj).
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::kernels::host::with_host_f32;
use crate::kernels::int8_gemm::PackedWeight;
use std::fmt;

/// The adaptable projections of a decoder block, named as in Hugging Face / PEFT. A model has
/// either q/k/v or the fused `qkv_proj` (Phi-3), and either gate/up or `gate_up_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Phi-3's fused projection, rows `[q | k | v]`.
    Qkv,
    /// Phi-3's fused projection, rows `[gate | up]`.
    GateUp,
}

impl Proj {
    /// Every projection name; a given model has a subset (`BaseShapes::projections`).
    pub const ALL: [Proj; 9] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down, Proj::Qkv, Proj::GateUp];
    /// The projections of an unfused (Llama-like) block.
    pub const UNFUSED: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The PEFT / Hugging Face module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
            Proj::Qkv => "qkv_proj",
            Proj::GateUp => "gate_up_proj",
        }
    }

    /// The parent module in a Hugging Face parameter name (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O | Proj::Qkv => "self_attn",
            _ => "mlp",
        }
    }

    /// Parses `q_proj`, `up_proj`, ...
    pub fn from_hf_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == name)
    }
}

/// Identifies one linear layer of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: usize,
    pub proj: Proj,
}

impl LinearId {
    /// Hugging Face parameter name of the weight, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf_weight_name(&self) -> String {
        format!("model.layers.{}.{}.{}.weight", self.layer, self.proj.hf_parent(), self.proj.hf_name())
    }
}

impl fmt::Display for LinearId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layers.{}.{}", self.layer, self.proj.hf_name())
    }
}

/// Adds per-composition deltas to the rows of a batch step. Implemented by the adapter layer;
/// [`NoDeltas`] is the base model alone. `Sync`: the host deltas of a step are computed on the
/// thread pool while the base product runs.
pub trait RowDeltas: Sync {
    /// `x`: the layer input rows `[n, in]`; `y`: the base output `[n, out]`. Returns `y` plus, for
    /// every row, the deltas of that row's composition applied to that row's input.
    fn add_deltas(&self, id: LinearId, x: &Tensor, y: Tensor) -> Result<Tensor>;

    /// Host-memory form of [`RowDeltas::add_deltas`] for several layers reading the same `n` rows
    /// `x` (`[n, in]`): per layer `ids[i]` (output width `outs[i]`), the deltas of every row's
    /// composition as a fresh `[n, outs[i]]` buffer, or None where no row has one. It depends on
    /// `x` alone, never on the base output, so it may run while the base product does. Returns
    /// None when only the tensor form is supported.
    fn host_deltas(&self, _ids: &[LinearId], _x: &[f32], _n: usize, _outs: &[usize]) -> Result<Option<Vec<Option<Vec<f32>>>>> {
        Ok(None)
    }

    /// Adds embedding-table deltas: `x` holds the embeddings `[n, hidden]` of the step's tokens
    /// `ids` (all rows, batch order).
    fn add_embedding_deltas(&self, _ids: &[u32], x: Tensor) -> Result<Tensor> {
        Ok(x)
    }

    /// Adds output-head deltas: `x` `[k, hidden]` are the final hidden states of the chunks listed in
    /// `chunks` (one row each, indices into the step's chunks), `y` their base logits.
    fn add_lm_head_deltas(&self, _chunks: &[usize], _x: &Tensor, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }
}

/// The empty composition: the base model alone.
pub struct NoDeltas;

impl RowDeltas for NoDeltas {
    fn add_deltas(&self, _id: LinearId, _x: &Tensor, y: Tensor) -> Result<Tensor> {
        Ok(y)
    }

    fn host_deltas(&self, ids: &[LinearId], _x: &[f32], _n: usize, _outs: &[usize]) -> Result<Option<Vec<Option<Vec<f32>>>>> {
        Ok(Some(vec![None; ids.len()]))
    }
}

/// How base weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// Keep GGUF block-quantized weights and multiply with candle's quantized kernels.
    Quantized,
    /// Dequantize every tensor to float32 (the mode that matches the parity kit).
    F32,
    /// Hold both: quantized blocks for steps of few rows (memory-bound matrix-vector products),
    /// float32 for larger batch steps (compute-bound GEMMs). About 5x the memory of `quantized`.
    Auto,
}

/// Steps with at least this many rows use the float32 copy in `auto` mode.
pub const AUTO_DENSE_MIN_ROWS: usize = 8;

/// A dense f32 weight `[out, in]`, stored transposed (`[in, out]`, contiguous) so the GEMM reads
/// it with unit column stride: candle's CPU matmul then packs it with vector copies instead of a
/// scalar strided gather, which cost a quarter of all batched-decode time when stored `[out, in]`.
#[derive(Clone)]
pub struct DenseWeight {
    wt: Tensor,
}

impl DenseWeight {
    /// From the weight in its natural `[out, in]` layout (copies it once, transposed).
    pub fn new(w: &Tensor) -> Result<Self> {
        Ok(Self { wt: w.t()?.contiguous()? })
    }

    /// `x W^T` for `x` of shape `[n, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.wt)
    }

    /// The weight `[out, in]` (a transposed view of the stored tensor).
    pub fn weight(&self) -> Result<Tensor> {
        self.wt.t()
    }
}

/// A block-quantized weight `[out, in]`: packed for the int8 kernel (AVX-512 VNNI or AVX2) when
/// it is a Q8_0 CPU tensor on a CPU that runs one (or a Q4_1 one where
/// [`crate::kernels::CpuFeatures::q4_1`] holds), else candle's quantized matmul.
pub enum QuantWeight {
    Candle(QMatMul),
    Int8(PackedWeight),
}

impl QuantWeight {
    pub fn new(q: QTensor) -> Result<Self> {
        match PackedWeight::from_qtensor(&q)? {
            Some(p) => Ok(Self::Int8(p)),
            None => Ok(Self::Candle(QMatMul::from_qtensor(q)?)),
        }
    }

    /// `x W^T` for `x` of shape `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(q) => q.forward(x),
            Self::Int8(p) => p.matmul_t(x),
        }
    }

    /// The weight as f32 `[out, in]`.
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device()),
            Self::Candle(QMatMul::Tensor(t)) | Self::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32),
            Self::Int8(p) => p.dequantize(),
        }
    }
}

/// A base weight matrix `[out, in]`.
pub enum BaseWeight {
    Quantized(QuantWeight),
    Dense(DenseWeight),
    /// `auto` mode: both forms of the same weight.
    Both {
        q: QuantWeight,
        dense: DenseWeight,
    },
}

impl BaseWeight {
    /// Builds the weight in the requested mode from a (possibly quantized) tensor.
    pub fn from_qtensor(q: QTensor, mode: WeightMode) -> Result<Self> {
        match mode {
            WeightMode::Quantized => Ok(Self::Quantized(QuantWeight::new(q)?)),
            WeightMode::F32 => Ok(Self::Dense(DenseWeight::new(&q.dequantize(&q.device())?)?)),
            WeightMode::Auto => {
                let dense = DenseWeight::new(&q.dequantize(&q.device())?)?;
                Ok(Self::Both { q: QuantWeight::new(q)?, dense })
            }
        }
    }

    /// Builds the weight from a dense tensor (Hugging Face checkpoints); `Quantized` mode stores it
    /// as Q8_0 when the row length allows, else keeps it dense.
    pub fn from_dense(w: Tensor, mode: WeightMode) -> Result<Self> {
        let w = w.to_dtype(DType::F32)?;
        match mode {
            WeightMode::Quantized if w.dim(1)? % 32 == 0 => {
                let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)?;
                Ok(Self::Quantized(QuantWeight::new(q)?))
            }
            WeightMode::Auto if w.dim(1)? % 32 == 0 => {
                let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)?;
                Ok(Self::Both { q: QuantWeight::new(q)?, dense: DenseWeight::new(&w)? })
            }
            _ => Ok(Self::Dense(DenseWeight::new(&w)?)),
        }
    }

    /// `x W^T` for `x` of shape `[n, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(q) => q.forward(x),
            Self::Dense(w) => w.matmul_t(x),
            Self::Both { q, dense } => {
                if x.dim(0)? >= AUTO_DENSE_MIN_ROWS {
                    dense.matmul_t(x)
                } else {
                    q.forward(x)
                }
            }
        }
    }

    /// The weight as a dense f32 tensor `[out, in]` (dequantizing if needed).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Quantized(q) => q.to_dense(),
            Self::Dense(w) | Self::Both { dense: w, .. } => w.weight(),
        }
    }
}

/// A projection of a decoder block: base weight (and optional bias) plus the delta seam.
pub struct Linear {
    id: LinearId,
    weight: BaseWeight,
    /// `[out]`, added to every row (Qwen2's q/k/v); deltas never touch it.
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub fn new(id: LinearId, weight: BaseWeight, out_dim: usize, in_dim: usize) -> Self {
        Self { id, weight, bias: None, in_dim, out_dim }
    }

    /// The same layer with a bias `[out]` (float32).
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn id(&self) -> LinearId {
        self.id
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    /// [`Linear::forward`] of several layers reading the same input (q/k/v, gate/up): when all
    /// hold int8-packed weights, their base products run as one parallel dispatch.
    pub fn forward_many(layers: &[&Linear], x: &Tensor, deltas: &dyn RowDeltas) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<&PackedWeight>> = layers
            .iter()
            .map(|l| match &l.weight {
                BaseWeight::Quantized(QuantWeight::Int8(p)) => Some(p),
                _ => None,
            })
            .collect();
        // One call quantizes the rows once for one kernel variant: layers packed for different
        // ones (a file mixing Q4_1 and Q8_0 in a group) go one by one.
        let packed = packed.filter(|ps| ps.iter().all(|p| p.variant() == ps[0].variant()));
        match packed {
            Some(ps) if x.device().is_cpu() => {
                // Base products and deltas both in host buffers, computed side by side on the pool
                // (the deltas depend on `x` alone): one fork-join for the whole group of layers,
                // and the memory-bound delta kernels overlap the compute-bound base GEMM.
                let (m, _) = x.dims2()?;
                let ids: Vec<LinearId> = layers.iter().map(|l| l.id).collect();
                let outs: Vec<usize> = ps.iter().map(|p| p.dims().0).collect();
                let phase = tracing::Span::current();
                let (ys, dhs) = with_host_f32(x, |xs| {
                    let (ys, dhs) = rayon::join(
                        || PackedWeight::matmul_host_many(&ps, xs, m),
                        || {
                            let _p = tracing::trace_span!(target: super::PHASE, parent: &phase, "deltas").entered();
                            deltas.host_deltas(&ids, xs, m, &outs)
                        },
                    );
                    Ok((ys?, dhs?))
                })?;
                let mut res = Vec::with_capacity(layers.len());
                for (i, (mut y, l)) in ys.into_iter().zip(layers).enumerate() {
                    let dh = match &dhs {
                        Some(d) => d[i].as_deref(),
                        None => None,
                    };
                    if let Some(dh) = dh {
                        for (a, d) in y.iter_mut().zip(dh) {
                            *a += d;
                        }
                    }
                    let t = Tensor::from_vec(y, (m, outs[i]), x.device())?;
                    let t = if dhs.is_some() { t } else { deltas.add_deltas(l.id, x, t)? };
                    res.push(l.add_bias(t)?);
                }
                Ok(res)
            }
            _ => layers.iter().map(|l| l.forward(x, deltas)).collect(),
        }
    }

    /// Base product for all rows, then each row's composition deltas.
    pub fn forward(&self, x: &Tensor, deltas: &dyn RowDeltas) -> Result<Tensor> {
        if matches!(self.weight, BaseWeight::Quantized(QuantWeight::Int8(_))) && x.device().is_cpu() {
            return Ok(Self::forward_many(&[self], x, deltas)?.pop().expect("one output"));
        }
        let y = self.weight.matmul_t(x)?;
        self.add_bias(deltas.add_deltas(self.id, x, y)?)
    }
}
