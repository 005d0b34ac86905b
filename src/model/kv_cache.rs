//! Per-sequence key/value cache, preallocated once for the sequence's whole budget.
//!
//! On the CPU the cache is plain host memory, `[n_kv_heads][capacity][head_dim]` per layer, read and
//! written by the fused attention kernel (`model::attention`); on other devices it is a pair of
//! tensors of the same layout written in place with `slice_set`, used by the tensor-op attention
//! (`model::device_attention`; [`SeqKvCache::new_tensors`] makes one on the CPU too, so that path
//! is tested without a GPU). Never grown by concatenation. On the host, a sliding-window layer of
//! window `W` keeps only a ring of `W - 1 + WINDOW_ROUND_ROWS` positions (position `p` in slot
//! `p % ring`), enough for a round of up to [`WINDOW_ROUND_ROWS`] new rows to see its whole window
//! (`model::attention` writes and attends long chunks in rounds); tensor caches keep every
//! position (the window is then applied by the mask).
//! A host cache holds f32, or f16 ([`SeqKvCache::new_half`]: half the bytes attention reads per
//! step; the serving engine makes these for an int8 base, whose own error is far larger).
//! Invariant: positions `0..len` are written in every layer, and each layer still holds the last
//! `min(len, ring)` of them; `len <= capacity`.
use candle_core::{DType, Device, Result, Tensor};

use super::config::LlamaConfig;

use half::f16;

enum Store {
    Host { keys: Vec<Vec<f32>>, values: Vec<Vec<f32>> },
    HostHalf { keys: Vec<Vec<f16>>, values: Vec<Vec<f16>> },
    Device { keys: Vec<Tensor>, values: Vec<Tensor> },
}

/// One layer's host keys and values (`[n_kv][capacity][head_dim]` each), in the cache's element type.
pub enum HostLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

/// [`HostLayer`], writable.
pub enum HostLayerMut<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// Keys and values of one sequence across all layers.
pub struct SeqKvCache {
    store: Store,
    len: usize,
    capacity: usize,
    /// Positions held per layer (the ring size of a host sliding-window layer, else `capacity`).
    layer_caps: Vec<usize>,
    head_dim: usize,
}

/// Rows of one sequence a host sliding-window layer writes and attends per round: its ring holds
/// `window - 1 + WINDOW_ROUND_ROWS` positions.
pub const WINDOW_ROUND_ROWS: usize = 256;

/// Positions layer `layer` keeps for a sequence of `capacity` positions; `round_rows`: the rows per
/// round of a host cache's sliding-window rings (None: no rings).
fn layer_capacity(cfg: &LlamaConfig, layer: usize, capacity: usize, round_rows: Option<usize>) -> usize {
    match (cfg.layer_attn(layer).window, round_rows) {
        (Some(w), Some(r)) => capacity.min(w - 1 + r.max(1)),
        _ => capacity,
    }
}

impl SeqKvCache {
    /// Allocates room for `capacity` positions in every layer.
    pub fn new(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<Self> {
        Self::with_store(cfg, capacity, device, device.is_cpu().then_some(WINDOW_ROUND_ROWS), false)
    }

    /// [`SeqKvCache::new`] with `half`: on the CPU, keys and values held as f16 (elsewhere `half`
    /// is ignored: device caches are f32 tensors).
    pub fn new_half(cfg: &LlamaConfig, capacity: usize, device: &Device, half: bool) -> Result<Self> {
        Self::with_store(cfg, capacity, device, device.is_cpu().then_some(WINDOW_ROUND_ROWS), half && device.is_cpu())
    }

    /// A host cache whose sliding-window rings take rounds of `round_rows` rows (instead of
    /// [`WINDOW_ROUND_ROWS`]): smaller rings, more rounds per long chunk. Tests use it to make
    /// rings wrap within short prompts.
    pub fn with_window_round_rows(cfg: &LlamaConfig, capacity: usize, round_rows: usize) -> Result<Self> {
        Self::with_store(cfg, capacity, &Device::Cpu, Some(round_rows), false)
    }

    /// A cache held as device tensors even on the CPU: the model then runs this sequence's attention
    /// with tensor ops, as on a GPU.
    pub fn new_tensors(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<Self> {
        Self::with_store(cfg, capacity, device, None, false)
    }

    /// Whether the cache is host memory (the fused CPU kernel's layout).
    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Host { .. } | Store::HostHalf { .. })
    }

    /// `round_rows`: Some for a host cache (with that round size), None for tensors.
    fn with_store(cfg: &LlamaConfig, capacity: usize, device: &Device, round_rows: Option<usize>, half: bool) -> Result<Self> {
        let host = round_rows.is_some();
        let layer_caps: Vec<usize> = (0..cfg.num_hidden_layers).map(|l| layer_capacity(cfg, l, capacity, round_rows)).collect();
        let per_layer = |l: usize| cfg.num_key_value_heads * layer_caps[l] * cfg.head_dim;
        let store = if host && half {
            Store::HostHalf {
                keys: (0..cfg.num_hidden_layers).map(|l| vec![f16::ZERO; per_layer(l)]).collect(),
                values: (0..cfg.num_hidden_layers).map(|l| vec![f16::ZERO; per_layer(l)]).collect(),
            }
        } else if host {
            Store::Host {
                keys: (0..cfg.num_hidden_layers).map(|l| vec![0f32; per_layer(l)]).collect(),
                values: (0..cfg.num_hidden_layers).map(|l| vec![0f32; per_layer(l)]).collect(),
            }
        } else {
            let shape = (cfg.num_key_value_heads, capacity, cfg.head_dim);
            let mut keys = Vec::with_capacity(cfg.num_hidden_layers);
            let mut values = Vec::with_capacity(cfg.num_hidden_layers);
            for _ in 0..cfg.num_hidden_layers {
                keys.push(Tensor::zeros(shape, DType::F32, device)?);
                values.push(Tensor::zeros(shape, DType::F32, device)?);
            }
            Store::Device { keys, values }
        };
        Ok(Self { store, len: 0, capacity, layer_caps, head_dim: cfg.head_dim })
    }

    /// Bytes held by a cache of `capacity` positions made by [`SeqKvCache::new`] on `device` (for
    /// memory accounting; sliding-window layers hold their ring on the CPU).
    pub fn bytes(cfg: &LlamaConfig, capacity: usize, device: &Device) -> usize {
        Self::bytes_half(cfg, capacity, device, false)
    }

    /// Bytes held by a cache made by [`SeqKvCache::new_half`] with the same arguments.
    pub fn bytes_half(cfg: &LlamaConfig, capacity: usize, device: &Device, half: bool) -> usize {
        let elem = if half && device.is_cpu() { 2 } else { 4 };
        (0..cfg.num_hidden_layers)
            .map(|l| {
                2 * cfg.num_key_value_heads
                    * layer_capacity(cfg, l, capacity, device.is_cpu().then_some(WINDOW_ROUND_ROWS))
                    * cfg.head_dim
                    * elem
            })
            .sum()
    }

    /// Positions `layer` holds (slot of position `p`: `p % layer_capacity`).
    pub fn layer_capacity(&self, layer: usize) -> usize {
        self.layer_caps[layer]
    }

    /// Number of positions already stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Device path: writes `k`, `v` (`[n_kv_heads, n, head_dim]`, contiguous) at positions
    /// `len..len+n` of `layer` and returns views of positions `0..len+n`. The length only advances
    /// with [`SeqKvCache::advance`], once every layer has been written.
    pub fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.len + n > self.capacity {
            candle_core::bail!("kv cache overflow: {} + {} > capacity {}", self.len, n, self.capacity)
        }
        match &self.store {
            Store::Device { keys, values } => {
                keys[layer].slice_set(k, 1, self.len)?;
                values[layer].slice_set(v, 1, self.len)?;
                let total = self.len + n;
                Ok((keys[layer].narrow(1, 0, total)?, values[layer].narrow(1, 0, total)?))
            }
            Store::Host { .. } | Store::HostHalf { .. } => {
                candle_core::bail!("append() is the device path; host caches use host_layer_mut()")
            }
        }
    }

    /// Host path: the key and value buffers of `layer` (`[n_kv][capacity][head_dim]`).
    pub fn host_layer_mut(&mut self, layer: usize) -> Option<HostLayerMut<'_>> {
        match &mut self.store {
            Store::Host { keys, values } => Some(HostLayerMut::F32(&mut keys[layer], &mut values[layer])),
            Store::HostHalf { keys, values } => Some(HostLayerMut::F16(&mut keys[layer], &mut values[layer])),
            Store::Device { .. } => None,
        }
    }

    /// Host path, read-only.
    pub fn host_layer(&self, layer: usize) -> Option<HostLayer<'_>> {
        match &self.store {
            Store::Host { keys, values } => Some(HostLayer::F32(&keys[layer], &values[layer])),
            Store::HostHalf { keys, values } => Some(HostLayer::F16(&keys[layer], &values[layer])),
            Store::Device { .. } => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Commits `n` new positions after a forward pass wrote them in every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }

    /// Forgets positions from `len` on (e.g. to reuse a cache); the memory stays allocated. A
    /// sliding-window ring that has wrapped cannot go back (its older slots were overwritten).
    pub fn truncate(&mut self, len: usize) {
        let min_ring = self.layer_caps.iter().copied().min().unwrap_or(self.capacity);
        assert!(len >= self.len || self.len <= min_ring, "cannot truncate a cache whose sliding-window ring has wrapped");
        self.len = self.len.min(len);
    }
}
