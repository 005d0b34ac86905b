//! Per-sequence key/value cache, preallocated once for the sequence's whole budget.
//!
//! Layout per layer: `[n_kv_heads, capacity, head_dim]`, so the attention of a sequence reads a
//! narrowed view without copying and new positions are written in place (`slice_set`), never by
//! concatenation. Invariant: positions `0..len` are filled; `len <= capacity`.
use candle_core::{DType, Device, Result, Tensor};

use super::config::LlamaConfig;

/// Keys and values of one sequence across all layers.
pub struct SeqKvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl SeqKvCache {
    /// Allocates room for `capacity` positions in every layer.
    pub fn new(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<Self> {
        let shape = (cfg.num_key_value_heads, capacity, cfg.head_dim);
        let mut keys = Vec::with_capacity(cfg.num_hidden_layers);
        let mut values = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            keys.push(Tensor::zeros(shape, DType::F32, device)?);
            values.push(Tensor::zeros(shape, DType::F32, device)?);
        }
        Ok(Self { keys, values, len: 0, capacity })
    }

    /// Bytes held by this cache (for memory accounting).
    pub fn bytes(cfg: &LlamaConfig, capacity: usize) -> usize {
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * capacity * cfg.head_dim * 4
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

    /// Writes `k`, `v` (`[n_kv_heads, n, head_dim]`, contiguous) at positions `len..len+n` of
    /// `layer` and returns views of positions `0..len+n`. The length only advances with
    /// [`SeqKvCache::advance`], once every layer has been written.
    pub fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.len + n > self.capacity {
            candle_core::bail!("kv cache overflow: {} + {} > capacity {}", self.len, n, self.capacity)
        }
        self.keys[layer].slice_set(k, 1, self.len)?;
        self.values[layer].slice_set(v, 1, self.len)?;
        let total = self.len + n;
        Ok((self.keys[layer].narrow(1, 0, total)?, self.values[layer].narrow(1, 0, total)?))
    }

    /// Commits `n` new positions after a forward pass wrote them in every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }

    /// Forgets positions from `len` on (e.g. to reuse a cache); the memory stays allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
