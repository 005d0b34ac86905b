//! The Llama-family forward pass over a batch of sequences at independent positions.
//!
//! One call processes the rows of every sequence in the step (a prefill chunk or one decode token
//! each) as a single `[rows, hidden]` matrix through every linear layer, so each base weight is read
//! once per step; attention runs per sequence against its own [`SeqKvCache`] and position.
//! Invariants: weights are in Hugging Face layout (rotate-half RoPE); the model is immutable after
//! load; a sequence's result does not depend on what else is in the batch beyond float rounding of
//! the shared GEMMs.
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::ops::{rms_norm, softmax_last_dim};

use super::attention::{attention, AttnShape, RopeTables};
use super::config::LlamaConfig;
use super::kv_cache::SeqKvCache;
use super::linear::{BaseWeight, Linear, LinearId, Proj, RowDeltas};

/// One decoder block.
pub struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Block {
    /// The block's linear layer for `proj`.
    pub fn linear(&self, proj: Proj) -> &Linear {
        match proj {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
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

/// The decoder.
pub struct Llama {
    pub cfg: LlamaConfig,
    /// Token embeddings `[vocab, hidden]`, float32.
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    /// Output head `[vocab, hidden]` (the embeddings when tied).
    pub lm_head: BaseWeight,
    cos: Tensor,
    sin: Tensor,
    rope: RopeTables,
    device: Device,
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
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
        let max = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, half), &device)?;
        let pos = Tensor::arange(0u32, max as u32, &device)?.to_dtype(DType::F32)?.reshape((max, 1))?;
        let freqs = pos.matmul(&inv)?;
        let rope = RopeTables::new(cfg.head_dim, cfg.rope_theta, max);
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()?, rope, cfg, embed, blocks, final_norm, lm_head, device })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The linear layer identified by `id`.
    pub fn linear(&self, id: LinearId) -> Option<&Linear> {
        self.blocks.get(id.layer).map(|b| b.linear(id.proj))
    }

    /// Runs one batch step. Returns next-token logits `[k, vocab]` for the `k` chunks that asked
    /// for them, in chunk order. Every chunk's cache advances by its token count.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>], deltas: &dyn RowDeltas) -> Result<Tensor> {
        let cfg = &self.cfg;
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
        let mut x = deltas.add_embedding_deltas(&ids, self.embed.index_select(&id_tensor, 0)?)?;
        let masks = if self.device.is_cpu() {
            Vec::new()
        } else {
            spans.iter().map(|&(_, len, pos)| self.causal_mask(len, pos)).collect::<Result<Vec<_>>>()?
        };
        let eps = cfg.rms_norm_eps as f32;
        let (hq, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps)?;
            let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&b.q, &b.k, &b.v], &h, deltas)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("q/k/v: three outputs expected".into()))?;
            let attn = if self.device.is_cpu() {
                let mut qh = q.flatten_all()?.to_vec1::<f32>()?;
                let mut kh = k.flatten_all()?.to_vec1::<f32>()?;
                let vh = v.flatten_all()?.to_vec1::<f32>()?;
                let mut caches: Vec<&mut SeqKvCache> = chunks.iter_mut().map(|c| &mut *c.cache).collect();
                let shape = AttnShape { n_heads: hq, n_kv_heads: hkv, head_dim: hd };
                let o = attention(layer, shape, &self.rope, &mut qh, &mut kh, &vh, &spans, &mut caches);
                Tensor::from_vec(o, (n, hq * hd), &self.device)?
            } else {
                self.attention_tensors(layer, &q, &k, &v, &spans, &masks, chunks, scale)?
            };
            x = (x + b.o.forward(&attn.contiguous()?, deltas)?)?;
            let h = rms_norm(&x, &b.mlp_norm, eps)?;
            let [g, u]: [Tensor; 2] = Linear::forward_many(&[&b.gate, &b.up], &h, deltas)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up: two outputs expected".into()))?;
            let m = (candle_nn::ops::silu(&g)? * u)?;
            x = (x + b.down.forward(&m, deltas)?)?;
        }
        for (c, &(_, len, _)) in chunks.iter_mut().zip(spans.iter()) {
            c.cache.advance(len);
        }
        let wanted: Vec<usize> = (0..chunks.len()).filter(|&i| chunks[i].want_logits).collect();
        if wanted.is_empty() {
            return Tensor::zeros((0, cfg.vocab_size), DType::F32, &self.device);
        }
        let last: Vec<u32> = wanted.iter().map(|&i| (spans[i].0 + spans[i].1 - 1) as u32).collect();
        let rows = Tensor::from_vec(last, wanted.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = rms_norm(&x, &self.final_norm, eps)?;
        let y = self.lm_head.matmul_t(&x)?;
        deltas.add_lm_head_deltas(&wanted, &x, y)
    }

    /// Attention with tensor ops per sequence (non-CPU devices).
    #[allow(clippy::too_many_arguments)]
    fn attention_tensors(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spans: &[(usize, usize, usize)],
        masks: &[Option<Tensor>],
        chunks: &mut [SeqChunk<'_>],
        scale: f64,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (hq, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let group = cfg.group_size();
        let mut outs = Vec::with_capacity(spans.len());
        for (ci, &(start, len, pos)) in spans.iter().enumerate() {
            let cos = self.cos.narrow(0, pos, len)?;
            let sin = self.sin.narrow(0, pos, len)?;
            let qs = q.narrow(0, start, len)?.reshape((1, len, hq, hd))?;
            let ks = k.narrow(0, start, len)?.reshape((1, len, hkv, hd))?;
            let qs = candle_nn::rotary_emb::rope_thd(&qs.contiguous()?, &cos, &sin)?;
            let ks = candle_nn::rotary_emb::rope_thd(&ks.contiguous()?, &cos, &sin)?;
            // [len, heads, hd] -> [heads, len, hd]
            let ks = ks.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            let vs = v.narrow(0, start, len)?.reshape((len, hkv, hd))?.transpose(0, 1)?.contiguous()?;
            let (kc, vc) = chunks[ci].cache.append(layer, &ks, &vs)?;
            // Query heads h = kv * group + g share kv head `kv`: [hkv, group*len, hd].
            let qs = qs.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((hkv, group * len, hd))?;
            let att = (qs.matmul(&kc.t()?)? * scale)?;
            let att = match &masks[ci] {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = softmax_last_dim(&att)?;
            let o = att.matmul(&vc)?; // [hkv, group*len, hd]
            let o = o.reshape((hq, len, hd))?.transpose(0, 1)?.reshape((len, hq * hd))?;
            outs.push(o);
        }
        let attn = if outs.len() == 1 { outs.pop().expect("one output") } else { Tensor::cat(&outs, 0)? };
        Ok(attn)
    }

    /// Additive mask `[group*len, pos+len]` letting query `i` (at `pos+i`) see keys `0..=pos+i`;
    /// `None` for a single query, which may see everything cached.
    fn causal_mask(&self, len: usize, pos: usize) -> Result<Option<Tensor>> {
        if len == 1 {
            return Ok(None);
        }
        let total = pos + len;
        let group = self.cfg.group_size();
        let mut m = vec![0f32; group * len * total];
        for g in 0..group {
            for i in 0..len {
                let row = &mut m[(g * len + i) * total..(g * len + i + 1) * total];
                for v in row.iter_mut().skip(pos + i + 1) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (group * len, total), &self.device)?))
    }

    /// Dimension of the last axis of the logits.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
