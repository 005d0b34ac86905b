//! The one decoder forward pass shared by every family, over a batch of sequences at independent
//! positions.
//!
//! One call processes the rows of every sequence in the step (a prefill chunk or one decode token
//! each) as a single `[rows, hidden]` matrix through every linear layer, so each base weight is read
//! once per step; attention runs per sequence against its own [`SeqKvCache`] and position.
//! Family differences are the explicit switches of [`LlamaConfig::arch`] (biases live in the
//! [`Linear`] layers; q/k norms, sandwich norms, embedding scale, activation, fused projections,
//! per-layer windows and RoPE, soft-capping) — there is no second copy of this pass.
//! Invariants: weights are in Hugging Face layout (rotate-half RoPE, norms already `1 + w` where
//! the family computes so); the model is immutable after load; a sequence's result does not depend
//! on what else is in the batch beyond float rounding of the shared GEMMs.
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::ops::rms_norm;

use super::attention::{attention, AttnParams, AttnShape, RopeTables};
use super::config::LlamaConfig;
use super::device_attention::{DeviceAttention, DeviceRope};
use super::family::Activation;
use super::kv_cache::SeqKvCache;
use super::linear::{BaseWeight, Linear, LinearId, Proj, RowDeltas};
use crate::kernels::host::{with_host_f32, with_host_f32_in_place, with_host_f32_mut};

/// The attention input projections: q/k/v, or Phi-3's fused `qkv_proj` (rows `[q | k | v]`).
pub enum QkvProj {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP input projections: gate/up, or Phi-3's fused `gate_up_proj` (rows `[gate | up]`).
pub enum GateUpProj {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

/// One decoder block. Norm weights are the multipliers the family computes with (`1 + w` for
/// Gemma).
pub struct Block {
    /// `input_layernorm`.
    pub attn_norm: Tensor,
    pub qkv: QkvProj,
    /// Per-head RMSNorm weights `[head_dim]` of queries and keys (Qwen3, Gemma 3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub o: Linear,
    /// Gemma: `post_attention_layernorm`, on the attention output before the residual add.
    pub post_attn_norm: Option<Tensor>,
    /// The norm before the MLP (`post_attention_layernorm` in Llama, `pre_feedforward_layernorm`
    /// in Gemma).
    pub mlp_norm: Tensor,
    pub gate_up: GateUpProj,
    pub down: Linear,
    /// Gemma: `post_feedforward_layernorm`, on the MLP output before the residual add.
    pub post_mlp_norm: Option<Tensor>,
}

impl Block {
    /// The block's linear layer for `proj`, if the block has one.
    pub fn linear(&self, proj: Proj) -> Option<&Linear> {
        match (proj, &self.qkv, &self.gate_up) {
            (Proj::Q, QkvProj::Split { q, .. }, _) => Some(q),
            (Proj::K, QkvProj::Split { k, .. }, _) => Some(k),
            (Proj::V, QkvProj::Split { v, .. }, _) => Some(v),
            (Proj::Qkv, QkvProj::Fused(l), _) => Some(l),
            (Proj::O, ..) => Some(&self.o),
            (Proj::Gate, _, GateUpProj::Split { gate, .. }) => Some(gate),
            (Proj::Up, _, GateUpProj::Split { up, .. }) => Some(up),
            (Proj::GateUp, _, GateUpProj::Fused(l)) => Some(l),
            (Proj::Down, ..) => Some(&self.down),
            _ => None,
        }
    }

    /// q, k, v `[n, width]` for the normed input `h`.
    fn project_qkv(&self, h: &Tensor, deltas: &dyn RowDeltas, q_dim: usize, kv_dim: usize) -> Result<[Tensor; 3]> {
        match &self.qkv {
            QkvProj::Split { q, k, v } => Linear::forward_many(&[q, k, v], h, deltas)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("q/k/v: three outputs expected".into())),
            QkvProj::Fused(l) => {
                let y = l.forward(h, deltas)?;
                Ok([
                    y.narrow(1, 0, q_dim)?.contiguous()?,
                    y.narrow(1, q_dim, kv_dim)?.contiguous()?,
                    y.narrow(1, q_dim + kv_dim, kv_dim)?.contiguous()?,
                ])
            }
        }
    }

    /// gate, up `[n, intermediate]` for the normed input `h`.
    fn project_gate_up(&self, h: &Tensor, deltas: &dyn RowDeltas, ff: usize) -> Result<[Tensor; 2]> {
        match &self.gate_up {
            GateUpProj::Split { gate, up } => Linear::forward_many(&[gate, up], h, deltas)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up: two outputs expected".into())),
            GateUpProj::Fused(l) => {
                let y = l.forward(h, deltas)?;
                Ok([y.narrow(1, 0, ff)?.contiguous()?, y.narrow(1, ff, ff)?.contiguous()?])
            }
        }
    }
}

/// A sequence's share of a batch step.
pub struct SeqChunk<'a> {
    /// Tokens to append at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
    /// Whether to return next-token logits after the chunk's last token.
    pub want_logits: bool,
}

/// The decoder (every family; see the module comment).
pub struct Llama {
    pub cfg: LlamaConfig,
    /// Token embeddings `[vocab, hidden]`, float32, unscaled.
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    /// Output head `[vocab, hidden]` (the embeddings when tied).
    pub lm_head: BaseWeight,
    /// Rotary tables per distinct (base, scaling), and which one each layer uses.
    ropes: Vec<RopeTables>,
    /// The same tables as tensors, made on first use by the tensor-op attention.
    device_ropes: std::sync::OnceLock<Vec<DeviceRope>>,
    rope_of_layer: Vec<usize>,
    device: Device,
}

/// RMSNorm over the last dimension of each `width`-wide head of `x` `[n, heads * width]`.
fn head_norm(x: &Tensor, w: &Tensor, width: usize, eps: f32) -> Result<Tensor> {
    let (n, total) = x.dims2()?;
    norm(&x.reshape((n * total / width, width))?, w, eps)?.reshape((n, total))
}

/// RMSNorm of `x`'s rows: the host kernel on the CPU (one pass, no candle temporaries), candle's
/// op elsewhere.
fn norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return rms_norm(x, w, eps);
    }
    crate::kernels::host::with_host_f32(x, |xs| {
        crate::kernels::host::with_host_f32(w, |ws| {
            Tensor::from_vec(crate::kernels::norm::rms_norm_rows(xs, ws, eps), x.shape(), x.device())
        })
    })
}

/// The residual add and the RMSNorm after it: `(x + a, norm(x + a))`, in one host pass on the CPU.
fn add_norm(x: &Tensor, a: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || a.dtype() != DType::F32 || x.shape() != a.shape() {
        let s = (x + a)?;
        let h = rms_norm(&s, w, eps)?;
        return Ok((s, h));
    }
    crate::kernels::host::with_host_f32(x, |xs| {
        crate::kernels::host::with_host_f32(a, |avs| {
            crate::kernels::host::with_host_f32(w, |ws| {
                let (s, h) = crate::kernels::norm::add_rms_norm_rows(xs, avs, ws, eps);
                Ok((Tensor::from_vec(s, x.shape(), x.device())?, Tensor::from_vec(h, x.shape(), x.device())?))
            })
        })
    })
}

fn opt_norm(x: Tensor, w: &Option<Tensor>, eps: f32) -> Result<Tensor> {
    match w {
        Some(w) => norm(&x, w, eps),
        None => Ok(x),
    }
}

/// Applies `f` to the values of `x` on the host, in parallel chunks (`f` gets each chunk's offset
/// in `x` and the chunk): in place when `x` is a contiguous f32 tensor sharing no storage with
/// `reads` (the tensors `f` reads), else on a copy. `x` is consumed: nothing reads it after.
fn host_map(x: Tensor, reads: &[&Tensor], f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Result<Tensor> {
    use rayon::prelude::*;
    // One chunk per pool thread (at least 4096 values): fixed 16,384-value chunks split a
    // batch-32 MLP row block (49,152 values) 2 + 1 between 2 threads.
    let chunked = |v: &mut [f32]| {
        let chunk = v.len().div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(64).max(4096);
        v.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i * chunk, c));
    };
    let in_place = with_host_f32_in_place(&x, reads, |v| {
        chunked(v);
        Ok(())
    })?;
    if in_place.is_some() {
        return Ok(x);
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    chunked(&mut v);
    Tensor::from_vec(v, x.shape(), x.device())
}

/// `silu(g) * u` for CPU tensors of one shape, in one pass over `g`'s values (in place).
fn silu_mul_host(g: Tensor, u: &Tensor) -> Result<Tensor> {
    if g.shape() != u.shape() {
        candle_core::bail!("gate and up of different shapes: {:?} and {:?}", g.shape(), u.shape())
    }
    with_host_f32(u, |uv| host_map(g, &[u], |at, gc| crate::kernels::activation::silu_mul(gc, &uv[at..at + gc.len()])))
}

/// Runs `run` on host views of a step's `q`, `k` (mutable: RoPE turns them in place) and `v`:
/// `q` and `k` in place where each is a contiguous tensor of its own (neither is read after
/// attention), copies otherwise (a fused projection's single-row views share one storage).
fn with_host_qkv<R>(q: &Tensor, k: &Tensor, v: &Tensor, run: impl FnOnce(&mut [f32], &mut [f32], &[f32]) -> R) -> Result<R> {
    with_host_f32_mut(q, &[k, v], |qh| with_host_f32_mut(k, &[v], |kh| with_host_f32(v, |vh| Ok(run(qh, kh, vh)))))
}

/// `cap * tanh(x / cap)` (the vectorised tanh on the CPU).
fn softcap(x: Tensor, cap: Option<f32>) -> Result<Tensor> {
    match cap {
        Some(c) if x.device().is_cpu() => host_map(x, &[], |_, v| crate::kernels::tanh::softcap_in_place(v, c)),
        Some(c) => (x / c as f64)?.tanh()? * c as f64,
        None => Ok(x),
    }
}

impl Llama {
    /// Assembles a model from loaded parts and precomputes the rotary tables.
    pub fn new(
        cfg: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: BaseWeight,
        device: Device,
    ) -> Result<Self> {
        let max = cfg.max_position_embeddings;
        let rot = cfg.rotary_dim();
        let mut kinds: Vec<(f32, f32)> = Vec::new();
        let mut rope_of_layer = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let a = cfg.layer_attn(l);
            let kind = (a.rope_theta, a.rope_linear_factor);
            let i = kinds.iter().position(|&k| k == kind).unwrap_or_else(|| {
                kinds.push(kind);
                kinds.len() - 1
            });
            rope_of_layer.push(i);
        }
        let ropes: Vec<RopeTables> = kinds.iter().map(|&(theta, f)| RopeTables::new(rot, theta, f, max)).collect();
        let device_ropes = std::sync::OnceLock::new();
        if !device.is_cpu() {
            let _ = device_ropes.set(ropes.iter().map(|r| DeviceRope::new(r, max, &device)).collect::<Result<_>>()?);
        }
        Ok(Self { ropes, device_ropes, rope_of_layer, cfg, embed, blocks, final_norm, lm_head, device })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An 8-bit base run by the int8 kernels (the CPU has them, VNNI or AVX2, and the output
    /// head, like every weight, is block-quantized): adapter factors are then held as 8-bit
    /// blocks too.
    pub fn int8_base(&self) -> bool {
        matches!(self.lm_head, BaseWeight::Quantized(_)) && crate::kernels::int8_available()
    }

    /// Whether the serving engine keeps this model's KV caches in f16 ([`SeqKvCache::new_half`]):
    /// on the CPU with an [`Llama::int8_base`], whose own quantization error is far larger than
    /// f16's rounding; f32 weights (the parity mode) keep f32 caches.
    pub fn half_kv(&self) -> bool {
        self.device.is_cpu() && self.int8_base()
    }

    /// A KV cache of `capacity` positions for this model as the engine serves it.
    pub fn new_cache(&self, capacity: usize) -> Result<SeqKvCache> {
        SeqKvCache::new_half(&self.cfg, capacity, &self.device, self.half_kv())
    }

    /// Bytes of [`Llama::new_cache`]`(capacity)`.
    pub fn cache_bytes(&self, capacity: usize) -> usize {
        SeqKvCache::bytes_half(&self.cfg, capacity, &self.device, self.half_kv())
    }

    /// The linear layer identified by `id`.
    pub fn linear(&self, id: LinearId) -> Option<&Linear> {
        self.blocks.get(id.layer).and_then(|b| b.linear(id.proj))
    }

    /// Runs one batch step. Returns next-token logits `[k, vocab]` for the `k` chunks that asked
    /// for them, in chunk order. Every chunk's cache advances by its token count.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>], deltas: &dyn RowDeltas) -> Result<Tensor> {
        let cfg = &self.cfg;
        let arch = &cfg.arch;
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        for c in chunks.iter() {
            if c.tokens.is_empty() {
                candle_core::bail!("empty chunk in batch step")
            }
            if c.cache.len() + c.tokens.len() > c.cache.capacity().min(cfg.max_position_embeddings) {
                candle_core::bail!(
                    "sequence of {} tokens exceeds its context of {}",
                    c.cache.len() + c.tokens.len(),
                    c.cache.capacity().min(cfg.max_position_embeddings)
                )
            }
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                candle_core::bail!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)
            }
            spans.push((ids.len(), c.tokens.len(), c.cache.len()));
            ids.extend_from_slice(c.tokens);
        }
        let n = ids.len();
        let id_tensor = Tensor::from_vec(ids.clone(), n, &self.device)?;
        let embed = phase!("embed");
        let mut x = deltas.add_embedding_deltas(&ids, self.embed.index_select(&id_tensor, 0)?)?;
        if let Some(s) = arch.embed_scale {
            x = (x * s as f64)?;
        }
        drop(embed);
        let eps = cfg.rms_norm_eps as f32;
        let (hq, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let shape = AttnShape { n_heads: hq, n_kv_heads: hkv, head_dim: hd };
        let host = chunks.iter().all(|c| c.cache.is_host());
        if !host && chunks.iter().any(|c| c.cache.is_host()) {
            candle_core::bail!("a batch step mixes host and tensor KV caches")
        }
        let mut dev_attn = if host {
            None
        } else {
            if self.device_ropes.get().is_none() {
                let max = cfg.max_position_embeddings;
                let _ = self.device_ropes.set(self.ropes.iter().map(|r| DeviceRope::new(r, max, &self.device)).collect::<Result<_>>()?);
            }
            Some(DeviceAttention::new(shape, &spans, &self.device))
        };
        // The next layer's normed input, made with the residual add that ends a layer.
        let mut normed: Option<Tensor> = None;
        for (layer, b) in self.blocks.iter().enumerate() {
            let la = cfg.layer_attn(layer);
            let params = AttnParams {
                rope: &self.ropes[self.rope_of_layer[layer]],
                scale: cfg.attn_scale(),
                window: la.window,
                softcap: arch.attn_softcap,
            };
            let h = match normed.take() {
                Some(h) => h,
                None => {
                    let _p = phase!("attn_norm");
                    norm(&x, &b.attn_norm, eps)?
                }
            };
            let qkv = phase!("qkv");
            let [mut q, mut k, v] = b.project_qkv(&h, deltas, cfg.q_dim(), cfg.kv_dim())?;
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                q = head_norm(&q, qn, hd, eps)?;
                k = head_norm(&k, kn, hd, eps)?;
            }
            drop(qkv);
            let attention_phase = phase!("attention");
            let attn = match dev_attn.as_mut() {
                None => {
                    let mut caches: Vec<&mut SeqKvCache> = chunks.iter_mut().map(|c| &mut *c.cache).collect();
                    let o = with_host_qkv(&q, &k, &v, |qh, kh, vh| attention(layer, shape, &params, qh, kh, vh, &spans, &mut caches))?;
                    Tensor::from_vec(o, (n, hq * hd), &self.device)?
                }
                Some(d) => {
                    let mut caches: Vec<&mut SeqKvCache> = chunks.iter_mut().map(|c| &mut *c.cache).collect();
                    let ropes = self.device_ropes.get().expect("made above");
                    d.run(layer, &ropes[self.rope_of_layer[layer]], &params, &q, &k, &v, &mut caches)?
                }
            };
            drop(attention_phase);
            let a = {
                let _p = phase!("o_proj");
                opt_norm(b.o.forward(&attn.contiguous()?, deltas)?, &b.post_attn_norm, eps)?
            };
            let h = {
                let _p = phase!("mlp_norm");
                let (s, h) = add_norm(&x, &a, &b.mlp_norm, eps)?;
                x = s;
                h
            };
            let [g, u] = {
                let _p = phase!("gate_up");
                b.project_gate_up(&h, deltas, cfg.intermediate_size)?
            };
            let gu = {
                let _p = phase!("act");
                match arch.activation {
                    Activation::Silu if g.device().is_cpu() => silu_mul_host(g, &u)?,
                    Activation::Silu => (candle_nn::ops::silu(&g)? * u)?,
                    Activation::GeluTanh => (g.gelu()? * u)?,
                    Activation::GeluErf => (g.gelu_erf()? * u)?,
                }
            };
            let m = {
                let _p = phase!("down");
                opt_norm(b.down.forward(&gu, deltas)?, &b.post_mlp_norm, eps)?
            };
            match self.blocks.get(layer + 1) {
                Some(next) => {
                    let _p = phase!("attn_norm");
                    let (s, h) = add_norm(&x, &m, &next.attn_norm, eps)?;
                    x = s;
                    normed = Some(h);
                }
                None => x = (x + m)?,
            }
        }
        for (c, &(_, len, _)) in chunks.iter_mut().zip(spans.iter()) {
            c.cache.advance(len);
        }
        let wanted: Vec<usize> = (0..chunks.len()).filter(|&i| chunks[i].want_logits).collect();
        if wanted.is_empty() {
            return Tensor::zeros((0, cfg.vocab_size), DType::F32, &self.device);
        }
        let _head = phase!("head");
        let last: Vec<u32> = wanted.iter().map(|&i| (spans[i].0 + spans[i].1 - 1) as u32).collect();
        let rows = Tensor::from_vec(last, wanted.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = norm(&x, &self.final_norm, eps)?;
        let y = self.lm_head.matmul_t(&x)?;
        softcap(deltas.add_lm_head_deltas(&wanted, &x, y)?, arch.final_softcap)
    }

    /// Dimension of the last axis of the logits.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
