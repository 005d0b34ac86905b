//! Per-sequence key/value cache, preallocated once for the sequence's whole budget.
//!
//! On the CPU the cache is plain host memory, `[n_kv_heads][capacity][head_dim]` per layer, read and
//! written by the fused attention kernel (`model::attention`); on other devices it is a pair of
//! tensors of the same layout written in place with `slice_set`, used by the tensor-op attention
//! (`model::device_attention`; [`SeqKvCache::new_tensors`] makes one on the CPU too, so that path
//! is tested without a GPU). Never grown by concatenation. Sliding-window layers keep every
//! position like the others (the window is applied by the attention, not by the cache).
//! Invariant: positions `0..len` are filled in every layer; `len <= capacity`.
use candle_core::{DType, Device, Result, Tensor};

use super::config::LlamaConfig;

enum Store {
    Host { keys: Vec<Vec<f32>>, values: Vec<Vec<f32>> },
    Device { keys: Vec<Tensor>, values: Vec<Tensor> },
}

/// Keys and values of one sequence across all layers.
pub struct SeqKvCache {
    store: Store,
    len: usize,
    capacity: usize,
    head_dim: usize,
}

impl SeqKvCache {
    /// Allocates room for `capacity` positions in every layer.
    pub fn new(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<Self> {
        Self::with_store(cfg, capacity, device, device.is_cpu())
    }

    /// A cache held as device tensors even on the CPU: the model then runs this sequence's attention
    /// with tensor ops, as on a GPU.
    pub fn new_tensors(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<Self> {
        Self::with_store(cfg, capacity, device, false)
    }

    /// Whether the cache is host memory (the fused CPU kernel's layout).
    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Host { .. })
    }

    fn with_store(cfg: &LlamaConfig, capacity: usize, device: &Device, host: bool) -> Result<Self> {
        let per_layer = cfg.num_key_value_heads * capacity * cfg.head_dim;
        let store = if host {
            Store::Host {
                keys: (0..cfg.num_hidden_layers).map(|_| vec![0f32; per_layer]).collect(),
                values: (0..cfg.num_hidden_layers).map(|_| vec![0f32; per_layer]).collect(),
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
        Ok(Self { store, len: 0, capacity, head_dim: cfg.head_dim })
    }

    /// Bytes held by a cache of `capacity` positions (for memory accounting).
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
            Store::Host { .. } => candle_core::bail!("append() is the device path; host caches use host_layer_mut()"),
        }
    }

    /// Host path: the key and value buffers of `layer` (`[n_kv][capacity][head_dim]`).
    pub fn host_layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        match &mut self.store {
            Store::Host { keys, values } => Some((&mut keys[layer], &mut values[layer])),
            Store::Device { .. } => None,
        }
    }

    /// Host path, read-only.
    pub fn host_layer(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        match &self.store {
            Store::Host { keys, values } => Some((&keys[layer], &values[layer])),
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

    /// Forgets positions from `len` on (e.g. to reuse a cache); the memory stays allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
