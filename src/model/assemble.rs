//! Assembling a decoder block from a loader's tensors: the projections, biases and norms the
//! config's family switches ([`Arch`](super::family::Arch)) call for, nothing else, whatever the
//! file format.
//!
//! Invariant: norm weights handed to the block are the multipliers used in compute (`w + offset`,
//! Gemma's `1 + w`), in float32.
use candle_core::{DType, Tensor};

use super::config::LlamaConfig;
use super::linear::{Linear, Proj};
use super::llama::{Block, GateUpProj, QkvProj};
use super::loaded::LoadError;

/// The norms of a block, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSlot {
    /// Before attention (`input_layernorm`).
    Input,
    /// Gemma: on the attention output (`post_attention_layernorm`).
    PostAttn,
    /// Before the MLP (Llama `post_attention_layernorm`, Gemma `pre_feedforward_layernorm`).
    PreMlp,
    /// Gemma: on the MLP output (`post_feedforward_layernorm`).
    PostMlp,
    /// Per-head query / key norms `[head_dim]`.
    Q,
    K,
}

/// Builds block `l` from a source of linear layers (`lin(proj, out, in, has_bias)`) and of norm
/// weights (`norm(slot, len)`, already the multipliers used in compute): the projections, biases
/// and norms the config's family switches call for, nothing else.
pub fn assemble_block(
    cfg: &LlamaConfig,
    lin: &mut dyn FnMut(Proj, usize, usize, bool) -> Result<Linear, LoadError>,
    norm: &mut dyn FnMut(NormSlot, usize) -> Result<Tensor, LoadError>,
) -> Result<Block, LoadError> {
    let a = &cfg.arch;
    let (h, qd, kvd, ff, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.head_dim);
    let qkv = if a.fused_qkv {
        QkvProj::Fused(lin(Proj::Qkv, qd + 2 * kvd, h, a.qkv_bias)?)
    } else {
        QkvProj::Split { q: lin(Proj::Q, qd, h, a.qkv_bias)?, k: lin(Proj::K, kvd, h, a.qkv_bias)?, v: lin(Proj::V, kvd, h, a.qkv_bias)? }
    };
    let gate_up = if a.fused_gate_up {
        GateUpProj::Fused(lin(Proj::GateUp, 2 * ff, h, a.mlp_bias)?)
    } else {
        GateUpProj::Split { gate: lin(Proj::Gate, ff, h, a.mlp_bias)?, up: lin(Proj::Up, ff, h, a.mlp_bias)? }
    };
    let (q_norm, k_norm) = if a.qk_norm { (Some(norm(NormSlot::Q, hd)?), Some(norm(NormSlot::K, hd)?)) } else { (None, None) };
    Ok(Block {
        attn_norm: norm(NormSlot::Input, h)?,
        qkv,
        q_norm,
        k_norm,
        o: lin(Proj::O, h, qd, a.o_bias)?,
        post_attn_norm: if a.sandwich_norms { Some(norm(NormSlot::PostAttn, h)?) } else { None },
        mlp_norm: norm(NormSlot::PreMlp, h)?,
        gate_up,
        down: lin(Proj::Down, h, ff, a.mlp_bias)?,
        post_mlp_norm: if a.sandwich_norms { Some(norm(NormSlot::PostMlp, h)?) } else { None },
    })
}

/// `w + offset` (the family's norm convention), float32.
pub fn norm_multiplier(w: Tensor, offset: f32) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(DType::F32)?;
    if offset == 0.0 {
        Ok(w)
    } else {
        w + offset as f64
    }
}
