//! Fused CPU attention over a batch of sequences at independent positions.
//!
//! One call per layer: rotary embedding of every row's queries and keys at its own position,
//! the new keys/values written into each sequence's host KV cache, then causal attention of every
//! (sequence, query head) in parallel (rayon) against that sequence's cache. With many sequences
//! (batched decode) one task per sequence does all of that sequence's work, RoPE and cache writes
//! included, and writes straight into its rows; with few, the writes run first and then one task
//! per (sequence, head), so that even one sequence keeps every thread busy. It replaces a dozen
//! small tensor ops per sequence and layer, which dominate batched decode otherwise. Every family
//! runs here: the layer's [`AttnParams`] carry its RoPE table (base, linear scaling, rotated
//! dimensions), score scale, sliding window and soft-cap.
//! Invariants: the math is exactly Hugging Face's (rotate-half RoPE over the first `rotary_dim`
//! dims, soft-cap before the mask, softmax in f32 with the max subtracted, GQA head `h` reading kv
//! head `h / group`, window `W` showing positions `i - W < j <= i`); a sequence only ever reads
//! its own cache, so results do not depend on the batch. The inner loop of one (sequence, head) is
//! [`HeadAttention`] in `kernels::attention`. The caches of one call hold f32 or f16 (all the
//! same; new keys and values are rounded to f16 as they are written), read as f32.
use rayon::prelude::*;

use super::kv_cache::{HostLayer, HostLayerMut, SeqKvCache};
use crate::kernels::attention::{HeadAttention, KvElem};
use half::f16;

/// A host cache's element type, as this module reads and writes it.
trait CacheElem: KvElem {
    fn layer(c: &SeqKvCache, layer: usize) -> (&[Self], &[Self]);
    fn layer_mut(c: &mut SeqKvCache, layer: usize) -> (&mut [Self], &mut [Self]);
    /// Writes one head vector into the cache.
    fn store(dst: &mut [Self], src: &[f32]);
}

/// The cache accessors of one element type: its [`HostLayer`] variant, and how a head vector is
/// written (`$store(dst, src)`).
macro_rules! cache_elem {
    ($t:ty, $variant:ident, $store:expr) => {
        impl CacheElem for $t {
            fn layer(c: &SeqKvCache, layer: usize) -> (&[$t], &[$t]) {
                match c.host_layer(layer) {
                    Some(HostLayer::$variant(k, v)) => (k, v),
                    _ => panic!("a batch step mixes f32 and f16 (or device) KV caches"),
                }
            }
            fn layer_mut(c: &mut SeqKvCache, layer: usize) -> (&mut [$t], &mut [$t]) {
                match c.host_layer_mut(layer) {
                    Some(HostLayerMut::$variant(k, v)) => (k, v),
                    _ => panic!("a batch step mixes f32 and f16 (or device) KV caches"),
                }
            }
            fn store(dst: &mut [$t], src: &[f32]) {
                $store(dst, src)
            }
        }
    };
}

cache_elem!(f32, F32, <[f32]>::copy_from_slice);
// F16C where the CPU has it (the `half` crate's runtime check).
cache_elem!(f16, F16, half::slice::HalfFloatSliceExt::convert_from_f32_slice);

/// Precomputed rotary tables, `[max_positions][rotary_dim / 2]`.
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTables {
    /// Tables for `rotary_dim` rotated dimensions, base `theta`, positions divided by
    /// `linear_factor` (transformers: `inv_freq / factor`).
    pub fn new(rotary_dim: usize, theta: f32, linear_factor: f32, max_positions: usize) -> Self {
        let half = rotary_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f32 / rotary_dim as f32) / linear_factor).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates the first `2 * half` values of one head vector to position `pos`.
    #[inline]
    pub(crate) fn rotate(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h]);
        let (x1, x2) = x.split_at_mut(h);
        for j in 0..h {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * c[j] - b * s[j];
            x2[j] = b * c[j] + a * s[j];
        }
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's attention settings.
pub struct AttnParams<'a> {
    pub rope: &'a RopeTables,
    /// Score scale (`head_dim^-0.5`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f32,
    /// Sliding window: `W` positions visible, the query's own included.
    pub window: Option<usize>,
    /// `cap * tanh(score / cap)` before the mask.
    pub softcap: Option<f32>,
}

/// `q` `[rows, n_heads*hd]`, `k`/`v` `[rows, n_kv*hd]` (host, row-major; q and k are rotated in
/// place); `spans[i] = (first row, rows, position)` of `caches[i]`. Returns `[rows, n_heads*hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: usize,
    shape: AttnShape,
    params: &AttnParams<'_>,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    spans: &[(usize, usize, usize)],
    caches: &mut [&mut SeqKvCache],
) -> Vec<f32> {
    // Every cache of a step has the element type the engine chose for the model.
    if caches.first().is_some_and(|c| matches!(c.host_layer(layer), Some(HostLayer::F16(..)))) {
        attention_in::<f16>(layer, shape, params, q, k, v, spans, caches)
    } else {
        attention_in::<f32>(layer, shape, params, q, k, v, spans, caches)
    }
}

/// [`attention`] over caches of element type `K`.
#[allow(clippy::too_many_arguments)]
fn attention_in<K: CacheElem>(
    layer: usize,
    shape: AttnShape,
    params: &AttnParams<'_>,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    spans: &[(usize, usize, usize)],
    caches: &mut [&mut SeqKvCache],
) -> Vec<f32> {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
    let (rope, window) = (params.rope, params.window);
    let (qw, kw) = (n_heads * hd, n_kv_heads * hd);
    let group = n_heads / n_kv_heads;
    let rows: usize = spans.iter().map(|s| s.1).sum::<usize>().max(spans.iter().map(|s| s.0 + s.1).max().unwrap_or(0));
    let mut out = vec![0f32; rows * qw];
    // A sliding-window layer whose ring is shorter than the sequence takes a chunk in rounds of
    // at most `ring - window + 1` rows: each round's keys are written, then attended, before the
    // next round's overwrite the oldest slots. Other layers take each chunk in one round.
    let round_rows: Vec<usize> = spans
        .iter()
        .zip(caches.iter())
        .map(|(&(_, len, pos), c)| match window {
            Some(w) if c.layer_capacity(layer) < pos + len => c.layer_capacity(layer) + 1 - w,
            _ => len.max(1),
        })
        .collect();
    let rounds = spans.iter().zip(&round_rows).map(|(s, &b)| s.1.div_ceil(b)).max().unwrap_or(0);
    for round in 0..rounds {
        // This round's rows of each sequence: (first row, rows, position), possibly empty.
        let part: Vec<(usize, usize, usize)> = spans
            .iter()
            .zip(&round_rows)
            .map(|(&(start, len, pos), &b)| {
                let a = (round * b).min(len);
                (start + a, (len - a).min(b), pos + a)
            })
            .collect();
        let live: Vec<usize> = (0..part.len()).filter(|&s| part[s].1 > 0).collect();
        let rows_in_order = live.windows(2).all(|w| part[w[0]].0 + part[w[0]].1 <= part[w[1]].0);
        if live.len() >= 4 * rayon::current_num_threads() && rows_in_order {
            // Many sequences (batched decode): one task per sequence does all of its work, RoPE
            // and cache writes included (no serial pass), and writes every head straight into
            // the sequence's own rows of `out` (no buffer or copy per head); the heads of one kv
            // head run one after the other, its cache in cache.
            let mut tasks = Vec::with_capacity(live.len());
            let (mut qr, mut kr, mut or, mut at) = (&mut q[..], &mut k[..], &mut out[..], 0);
            for (s, cache) in caches.iter_mut().enumerate().filter(|(s, _)| part[*s].1 > 0) {
                let (start, len, pos) = part[s];
                let (qs, qt) = std::mem::take(&mut qr).split_at_mut((start - at) * qw).1.split_at_mut(len * qw);
                let (ks, kt) = std::mem::take(&mut kr).split_at_mut((start - at) * kw).1.split_at_mut(len * kw);
                let (os, ot) = std::mem::take(&mut or).split_at_mut((start - at) * qw).1.split_at_mut(len * qw);
                (qr, kr, or, at) = (qt, kt, ot, start + len);
                tasks.push((qs, ks, &v[start * kw..(start + len) * kw], os, &mut **cache, pos, len));
            }
            tasks.into_par_iter().for_each_init(Vec::new, |scores, (qs, ks, vs, os, cache, pos, len)| {
                write_rows::<K>(rope, shape, layer, qs, ks, vs, cache, pos);
                let cache: &SeqKvCache = cache;
                // The first head of each kv head's group reads its cache with look-ahead.
                let head_of = |h: usize| head_attention::<K>(shape, params, layer, cache, qs, h, (0, len, pos), h.is_multiple_of(group));
                head_of(0).prefetch();
                for h in 0..n_heads {
                    // While a kv head's group computes, the next kv head's cache is on its way.
                    if h.is_multiple_of(group) && h + group < n_heads {
                        head_of(h + group).prefetch();
                    }
                    head_of(h).run_into(&mut os[h * hd..], qw, scores);
                }
            });
            continue;
        }
        // Few sequences (single-stream decode, a prefill): RoPE and cache writes per sequence,
        // then one task per (sequence, head), so both threads share even one sequence; each
        // task's rows are copied in after.
        for &s in &live {
            let (start, len, pos) = part[s];
            let rows = start * qw..(start + len) * qw;
            let krows = start * kw..(start + len) * kw;
            write_rows::<K>(rope, shape, layer, &mut q[rows], &mut k[krows.clone()], &v[krows], caches[s], pos);
        }
        let q: &[f32] = q;
        let caches: Vec<&SeqKvCache> = caches.iter().map(|c| &**c).collect();
        let head_of = |s: usize, h: usize| head_attention::<K>(shape, params, layer, caches[s], q, h, part[s], true);
        let tasks: Vec<(usize, usize)> = live.iter().flat_map(|&s| (0..n_heads).map(move |h| (s, h))).collect();
        let results: Vec<(usize, usize, Vec<f32>)> = tasks.par_iter().map(|&(s, h)| (s, h, head_of(s, h).run())).collect();
        for (s, h, o) in results {
            let (start, len, _) = part[s];
            for i in 0..len {
                let r = start + i;
                out[r * qw + h * hd..r * qw + (h + 1) * hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            }
        }
    }
    out
}

/// RoPE of one sequence's rows of `q` and `k` (`[len, n_heads * hd]` and `[len, n_kv_heads *
/// hd]`, rotated in place) at positions `pos..`, and their keys and values (`v`, as `k`) written
/// into `cache`'s `layer` at those positions' ring slots.
#[allow(clippy::too_many_arguments)]
fn write_rows<K: CacheElem>(
    rope: &RopeTables,
    shape: AttnShape,
    layer: usize,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    cache: &mut SeqKvCache,
    pos: usize,
) {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
    let cap = cache.layer_capacity(layer);
    let (kc, vc) = K::layer_mut(cache, layer);
    let rows = q.chunks_exact_mut(n_heads * hd).zip(k.chunks_exact_mut(n_kv_heads * hd)).zip(v.chunks_exact(n_kv_heads * hd));
    for (i, ((qr, kr), vr)) in rows.enumerate() {
        let p = pos + i;
        for qh in qr.chunks_exact_mut(hd) {
            rope.rotate(qh, p);
        }
        for (h, (kh, vh)) in kr.chunks_exact_mut(hd).zip(vr.chunks_exact(hd)).enumerate() {
            rope.rotate(kh, p);
            let at = (h * cap + p % cap) * hd;
            K::store(&mut kc[at..at + hd], kh);
            K::store(&mut vc[at..at + hd], vh);
        }
    }
}

/// Query head `h`'s attention over one sequence's cache of `layer`: `rows` = (first row in `q`,
/// rows, position of the first); `look_ahead`: see [`HeadAttention::look_ahead`].
#[allow(clippy::too_many_arguments)]
fn head_attention<'a, K: CacheElem>(
    shape: AttnShape,
    params: &AttnParams<'_>,
    layer: usize,
    cache: &'a SeqKvCache,
    q: &'a [f32],
    h: usize,
    (start, len, pos): (usize, usize, usize),
    look_ahead: bool,
) -> HeadAttention<'a, K> {
    let hd = shape.head_dim;
    let cap = cache.layer_capacity(layer);
    let (kc, vc) = K::layer(cache, layer);
    let kvh = h / (shape.n_heads / shape.n_kv_heads);
    HeadAttention {
        q,
        q_stride: shape.n_heads * hd,
        q_off: h * hd,
        keys: &kc[kvh * cap * hd..(kvh + 1) * cap * hd],
        values: &vc[kvh * cap * hd..(kvh + 1) * cap * hd],
        ring: cap,
        hd,
        start,
        len,
        pos,
        scale: params.scale,
        window: params.window,
        softcap: params.softcap,
        look_ahead,
    }
}
