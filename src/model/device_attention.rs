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

#[cfg(test)]
mod tests {
    use super::*;

    /// Partial rotary embedding (Phi-3 `partial_rotary_factor`): of a head of 8 values with 4
    /// rotated, pairs (0, 2) and (1, 3) turn by `pos * base^(-2i/4)`, values 4..8 pass through; the
    /// host tables and the device tensors agree with that formula.
    #[test]
    fn partial_rotary_turns_only_the_rotated_dims() {
        let (base, pos, rot, hd) = (100.0f32, 5usize, 4usize, 8usize);
        let x: Vec<f32> = (0..hd).map(|i| 0.3 + i as f32).collect();
        let mut want = x.clone();
        for i in 0..rot / 2 {
            let a = pos as f32 * (1.0 / base.powf(2.0 * i as f32 / rot as f32));
            let (u, v) = (x[i], x[i + rot / 2]);
            want[i] = u * a.cos() - v * a.sin();
            want[i + rot / 2] = v * a.cos() + u * a.sin();
        }
        let tables = RopeTables::new(rot, base, 1.0, 16);
        let mut host = x.clone();
        tables.rotate(&mut host, pos);
        let dev = DeviceRope::new(&tables, 16, &Device::Cpu).unwrap();
        let t = Tensor::from_vec(x.clone(), (1, 1, 1, hd), &Device::Cpu).unwrap();
        let on_device: Vec<f32> = dev.apply(&t, pos, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (name, got) in [("host", &host), ("device", &on_device)] {
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "{name} dim {i}: {g} vs {w}");
            }
        }
        // A linear factor divides the positions.
        let scaled = RopeTables::new(rot, base, 5.0, 16);
        let (mut a, mut b) = (x.clone(), x.clone());
        scaled.rotate(&mut a, pos);
        tables.rotate(&mut b, 1);
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-5));
    }
}
