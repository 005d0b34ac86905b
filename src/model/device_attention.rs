//! Attention with candle tensor ops, per sequence, for non-CPU devices (the CPU runs the fused
//! host kernel of `model::attention`). Same math and settings: rotate-half RoPE over the first
//! `rotary_dim` dims of each head, score scale, soft-cap before the mask, sliding window.
//!
//! Invariants: the caches are written in place (`SeqKvCache::append`) and read back up to the
//! chunk's last position; masks are built once per step and window size and shared by the layers
//! that use them.
use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use candle_nn::ops::softmax_last_dim;

use super::attention::{AttnParams, AttnShape, RopeTables};
use super::kv_cache::SeqKvCache;

/// A rotary table on the device: `cos` / `sin` `[max_positions, rotary_dim / 2]`.
pub struct DeviceRope {
    cos: Tensor,
    sin: Tensor,
    rot: usize,
}

impl DeviceRope {
    pub fn new(r: &RopeTables, max_positions: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            cos: Tensor::from_vec(r.cos.clone(), (max_positions, r.half), device)?,
            sin: Tensor::from_vec(r.sin.clone(), (max_positions, r.half), device)?,
            rot: 2 * r.half,
        })
    }

    /// Rotates `x` `[1, len, heads, hd]` to positions `pos..pos+len`.
    fn apply(&self, x: &Tensor, pos: usize, len: usize) -> Result<Tensor> {
        let cos = self.cos.narrow(0, pos, len)?;
        let sin = self.sin.narrow(0, pos, len)?;
        let hd = x.dim(3)?;
        if self.rot == hd {
            return candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin);
        }
        let r = candle_nn::rotary_emb::rope_thd(&x.narrow(3, 0, self.rot)?.contiguous()?, &cos, &sin)?;
        Tensor::cat(&[&r, &x.narrow(3, self.rot, hd - self.rot)?], 3)
    }
}

/// One step's attention state: its spans and the masks built so far.
pub struct DeviceAttention<'s> {
    shape: AttnShape,
    spans: &'s [(usize, usize, usize)],
    masks: HashMap<Option<usize>, Vec<Option<Tensor>>>,
    device: Device,
}

impl<'s> DeviceAttention<'s> {
    pub fn new(shape: AttnShape, spans: &'s [(usize, usize, usize)], device: &Device) -> Self {
        Self { shape, spans, masks: HashMap::new(), device: device.clone() }
    }

    /// One layer: q `[n, hq*hd]`, k/v `[n, hkv*hd]`; returns `[n, hq*hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        layer: usize,
        rope: &DeviceRope,
        params: &AttnParams<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        caches: &mut [&mut SeqKvCache],
    ) -> Result<Tensor> {
        let AttnShape { n_heads: hq, n_kv_heads: hkv, head_dim: hd } = self.shape;
        let group = hq / hkv;
        if !self.masks.contains_key(&params.window) {
            let m = self.spans.iter().map(|&(_, len, pos)| self.mask(len, pos, params.window)).collect::<Result<Vec<_>>>()?;
            self.masks.insert(params.window, m);
        }
        let masks = &self.masks[&params.window];
        let mut outs = Vec::with_capacity(self.spans.len());
        for (ci, &(start, len, pos)) in self.spans.iter().enumerate() {
            let qs = rope.apply(&q.narrow(0, start, len)?.reshape((1, len, hq, hd))?, pos, len)?;
            let ks = rope.apply(&k.narrow(0, start, len)?.reshape((1, len, hkv, hd))?, pos, len)?;
            // [len, heads, hd] -> [heads, len, hd]
            let ks = ks.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            let vs = v.narrow(0, start, len)?.reshape((len, hkv, hd))?.transpose(0, 1)?.contiguous()?;
            let (kc, vc) = caches[ci].append(layer, &ks, &vs)?;
            // Query heads h = kv * group + g share kv head `kv`: [hkv, group*len, hd].
            let qs = qs.squeeze(0)?.transpose(0, 1)?.contiguous()?.reshape((hkv, group * len, hd))?;
            let mut att = (qs.matmul(&kc.t()?)? * params.scale as f64)?;
            if let Some(c) = params.softcap {
                att = ((att / c as f64)?.tanh()? * c as f64)?;
            }
            let att = match &masks[ci] {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = softmax_last_dim(&att)?;
            let o = att.matmul(&vc)?; // [hkv, group*len, hd]
            outs.push(o.reshape((hq, len, hd))?.transpose(0, 1)?.reshape((len, hq * hd))?);
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one output"))
        } else {
            Tensor::cat(&outs, 0)
        }
    }

    /// Additive mask `[group*len, pos+len]` letting query `i` (at `pos+i`) see keys
    /// `pos+i-W < j <= pos+i`; None when every query may see every cached key.
    fn mask(&self, len: usize, pos: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let total = pos + len;
        if len == 1 && window.is_none_or(|w| w >= total) {
            return Ok(None);
        }
        let group = self.shape.n_heads / self.shape.n_kv_heads;
        let mut m = vec![0f32; group * len * total];
        for g in 0..group {
            for i in 0..len {
                let row = &mut m[(g * len + i) * total..(g * len + i + 1) * total];
                let own = pos + i;
                let first = window.map_or(0, |w| (own + 1).saturating_sub(w));
                for (j, v) in row.iter_mut().enumerate() {
                    if j > own || j < first {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (group * len, total), &self.device)?))
    }
}
