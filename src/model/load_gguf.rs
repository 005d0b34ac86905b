//! Loading a GGUF file of any supported family (`general.architecture`: llama, qwen2, qwen3,
//! gemma2, gemma3, phi3) into the shared decoder.
//!
//! Invariants: q/k rows (and biases), which llama.cpp's `llama` converter stores permuted for its
//! interleaved RoPE, are un-permuted to Hugging Face order on the raw rows (so quantized weights
//! stay quantized); the other families keep Hugging Face row order and are read as stored; Phi-3's
//! fused `attn_qkv` and `ffn_up` (`[gate | up]`) stay fused, as `qkv_proj` / `gate_up_proj`;
//! norm weights are used as stored (Gemma's converter already stores `1 + w`).
use std::borrow::Cow;
use std::path::Path;

use candle_core::quantized::{gguf_file, QStorage, QTensor};
use candle_core::Device;

use super::assemble::{assemble_block, norm_multiplier, NormSlot};
use super::chat::ChatTemplate;
use super::config::LlamaConfig;
use super::family::Family;
use super::linear::{BaseWeight, DenseWeight, Linear, LinearId, Proj, QuantWeight, WeightMode};
use super::llama::Llama;
use super::loaded::{LoadError, LoadOptions, LoadedModel};
use super::tokenizer;

/// Maps row `r` of a Hugging Face q/k weight to the GGUF row holding it. llama.cpp's converter
/// reshapes `[heads, 2, head_dim/2, in]` to `[heads, head_dim/2, 2, in]`.
pub fn gguf_row_of_hf_row(r: usize, head_dim: usize) -> usize {
    let (h, rest) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    let (t, j) = (rest / half, rest % half);
    h * head_dim + 2 * j + t
}

fn unpermute_rows(q: QTensor, head_dim: usize, device: &Device) -> candle_core::Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        let src = gguf_row_of_hf_row(r, head_dim);
        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let dtype = q.dtype();
    let shape = q.shape().clone();
    QTensor::new(QStorage::from_data(Cow::Owned(out), device, dtype)?, shape)
}

/// In quantized mode, block types for which candle has no SIMD dot product on CPU (Q4_1, Q5_0,
/// Q5_1 run a scalar loop) are re-blocked as Q8_0 at load: 8-bit blocks hold the 4/5-bit values to
/// within Q8 rounding, and the Q8_0 kernel is several times faster. Unquantized matrices (F32,
/// F16, BF16: candle would multiply them as dense float32) are quantized to Q8_0 the same way when
/// their rows are whole blocks, so quantized mode means the int8 kernels for every file. Other
/// types are kept as stored, and so is Q4_1 on a CPU that multiplies it at 4 bits
/// ([`crate::kernels::CpuFeatures::q4_1`]: 41% fewer bytes per decode step).
/// A GPU model gets the same Q8_0 blocks, so that `--weights quantized` runs the same base weights
/// on every device (with the stored 4-bit blocks, the CUDA path's logits moved further from the
/// float32 reference: one kit case's adapter effect was off by 41% against at most 26% on the CPU).
/// The blocks are made on the host and uploaded with `QStorage::from_data`: candle 0.11's
/// `QTensor::quantize` of a CUDA tensor leaves the row padding of its buffer uninitialised, and
/// the CUDA matmul kernels read that padding (seen: every logit NaN).
fn reblock_for_speed(q: QTensor, mode: WeightMode) -> candle_core::Result<QTensor> {
    use candle_core::quantized::GgmlDType as G;
    let cols = q.shape().dims().last().copied().unwrap_or(0);
    let float = matches!(q.dtype(), G::F32 | G::F16 | G::BF16) && q.shape().rank() == 2 && cols % 32 == 0;
    let native_q4 = q.dtype() == G::Q4_1 && crate::kernels::int8_gemm::PackedWeight::packs(&q);
    let slow = (matches!(q.dtype(), G::Q4_1 | G::Q5_0 | G::Q5_1) && !native_q4) || float;
    if mode == WeightMode::F32 || !slow {
        return Ok(q);
    }
    let device = q.device();
    let q8 = QTensor::quantize(&q.dequantize(&Device::Cpu)?, G::Q8_0)?;
    if device.is_cpu() {
        return Ok(q8);
    }
    let shape = q8.shape().clone();
    QTensor::new(QStorage::from_data(Cow::Owned(q8.data()?.into_owned()), &device, G::Q8_0)?, shape)
}

/// Un-permutes a q/k bias vector like [`unpermute_rows`].
fn unpermute_vec(v: candle_core::Tensor, head_dim: usize) -> candle_core::Result<candle_core::Tensor> {
    let data: Vec<f32> = v.to_vec1()?;
    let out: Vec<f32> = (0..data.len()).map(|r| data[gguf_row_of_hf_row(r, head_dim)]).collect();
    candle_core::Tensor::from_vec(out, data.len(), v.device())
}

/// The GGUF tensor name stem of a projection (`attn_q`, ...; Phi-3's fused gate/up is `ffn_up`).
fn gguf_stem(proj: Proj) -> &'static str {
    match proj {
        Proj::Q => "attn_q",
        Proj::K => "attn_k",
        Proj::V => "attn_v",
        Proj::O => "attn_output",
        Proj::Gate => "ffn_gate",
        Proj::Up | Proj::GateUp => "ffn_up",
        Proj::Down => "ffn_down",
        Proj::Qkv => "attn_qkv",
    }
}

/// The tokenizer of a GGUF file: built from its metadata (byte-level BPE); where the file has
/// none, or one of a kind not built here (e.g. SentencePiece `llama` vocabularies), a
/// `tokenizer.json` beside the file; else none (token-id prompts only), with a warning.
fn gguf_tokenizer(path: &Path, content: &gguf_file::Content) -> Result<Option<tokenizers::Tokenizer>, LoadError> {
    let sidecar = path.with_file_name("tokenizer.json");
    let from_sidecar = || -> Result<Option<tokenizers::Tokenizer>, LoadError> {
        if sidecar.is_file() {
            let t = tokenizer::tokenizer_from_file(&sidecar)
                .map_err(|e| LoadError::Tokenizer { path: sidecar.clone(), reason: e.to_string() })?;
            Ok(Some(t))
        } else {
            Ok(None)
        }
    };
    if !content.metadata.contains_key("tokenizer.ggml.tokens") {
        return from_sidecar();
    }
    match tokenizer::tokenizer_from_gguf(content) {
        Ok(t) => Ok(Some(t)),
        Err(e @ (tokenizer::TokenizerError::UnsupportedModel(_) | tokenizer::TokenizerError::UnsupportedPre(_))) => {
            let t = from_sidecar()?;
            if t.is_none() {
                tracing::warn!(path = %path.display(), "{e}; no tokenizer.json beside the file: only token-id prompts will work");
            }
            Ok(t)
        }
        Err(e) => Err(LoadError::Tokenizer { path: path.into(), reason: e.to_string() }),
    }
}

/// Loads a GGUF file.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let cd = |source| LoadError::Candle { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| LoadError::Format { path: path.into(), reason: format!("not a readable GGUF file: {e}") })?;
    let cfg = LlamaConfig::from_gguf(&content).map_err(|source| LoadError::Config { path: path.into(), source })?;
    let dev = &opts.device;
    let file = std::cell::RefCell::new(f);
    let read = |name: &str, expected: &[usize]| -> Result<QTensor, LoadError> {
        if !content.tensor_infos.contains_key(name) {
            return Err(LoadError::MissingTensor { path: path.into(), name: name.into() });
        }
        let t = content.tensor(&mut *file.borrow_mut(), name, dev).map_err(cd)?;
        if t.shape().dims() != expected {
            return Err(LoadError::Shape {
                path: path.into(),
                name: name.into(),
                expected: expected.to_vec(),
                got: t.shape().dims().to_vec(),
            });
        }
        Ok(t)
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let permuted_qk = cfg.arch.family == Family::Llama;
    let offset = cfg.arch.norm_weight_offset;
    let embed_q = read("token_embd.weight", &[cfg.vocab_size, h])?;
    let embed = embed_q.dequantize(dev).map_err(cd)?;
    let final_norm = norm_multiplier(read("output_norm.weight", &[h])?.dequantize(dev).map_err(cd)?, offset).map_err(cd)?;
    let lm_head = if cfg.tie_word_embeddings {
        match opts.weights {
            WeightMode::F32 => BaseWeight::Dense(DenseWeight::new(&embed).map_err(cd)?),
            WeightMode::Quantized => {
                BaseWeight::from_qtensor(reblock_for_speed(embed_q, WeightMode::Quantized).map_err(cd)?, WeightMode::Quantized)
                    .map_err(cd)?
            }
            WeightMode::Auto => BaseWeight::Both {
                q: QuantWeight::new(reblock_for_speed(embed_q, WeightMode::Auto).map_err(cd)?).map_err(cd)?,
                dense: DenseWeight::new(&embed).map_err(cd)?,
            },
        }
    } else {
        let q = read("output.weight", &[cfg.vocab_size, h])?;
        match opts.weights {
            WeightMode::Auto => {
                let dense = DenseWeight::new(&q.dequantize(dev).map_err(cd)?).map_err(cd)?;
                BaseWeight::Both { q: QuantWeight::new(reblock_for_speed(q, WeightMode::Auto).map_err(cd)?).map_err(cd)?, dense }
            }
            mode => BaseWeight::from_qtensor(reblock_for_speed(q, mode).map_err(cd)?, mode).map_err(cd)?,
        }
    };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let mut lin = |proj: Proj, out: usize, inp: usize, bias: bool| {
            let stem = gguf_stem(proj);
            let permute = permuted_qk && matches!(proj, Proj::Q | Proj::K);
            let q = read(&format!("blk.{l}.{stem}.weight"), &[out, inp])?;
            let q = if permute { unpermute_rows(q, hd, dev).map_err(cd)? } else { q };
            let w = match opts.weights {
                // The float32 copy comes from the stored blocks, not the re-blocked ones.
                WeightMode::Auto => {
                    let dense = DenseWeight::new(&q.dequantize(dev).map_err(cd)?).map_err(cd)?;
                    let q = reblock_for_speed(q, opts.weights).map_err(cd)?;
                    BaseWeight::Both { q: QuantWeight::new(q).map_err(cd)?, dense }
                }
                mode => BaseWeight::from_qtensor(reblock_for_speed(q, mode).map_err(cd)?, mode).map_err(cd)?,
            };
            let b = if bias {
                let b = read(&format!("blk.{l}.{stem}.bias"), &[out])?.dequantize(dev).map_err(cd)?;
                Some(if permute { unpermute_vec(b, hd).map_err(cd)? } else { b })
            } else {
                None
            };
            Ok::<_, LoadError>(Linear::new(LinearId { layer: l, proj }, w, out, inp).with_bias(b))
        };
        let mut norm = |slot: NormSlot, len: usize| {
            let name = match slot {
                NormSlot::Input => "attn_norm",
                NormSlot::PostAttn => "post_attention_norm",
                NormSlot::PreMlp => "ffn_norm",
                NormSlot::PostMlp => "post_ffw_norm",
                NormSlot::Q => "attn_q_norm",
                NormSlot::K => "attn_k_norm",
            };
            let t = read(&format!("blk.{l}.{name}.weight"), &[len])?.dequantize(dev).map_err(cd)?;
            norm_multiplier(t, offset).map_err(cd)
        };
        blocks.push(assemble_block(&cfg, &mut lin, &mut norm)?);
    }
    let tok = gguf_tokenizer(path, &content)?;
    let chat_template = ChatTemplate::from_gguf(&content).map_err(|e| LoadError::Tokenizer { path: path.into(), reason: e.to_string() })?;
    let eos_token_ids = cfg.eos_token_ids.clone();
    let llama = Llama::new(cfg, embed, blocks, final_norm, lm_head, dev.clone()).map_err(cd)?;
    Ok(LoadedModel {
        llama: std::sync::Arc::new(llama),
        tokenizer: tok,
        chat_template: chat_template.map(std::sync::Arc::new),
        eos_token_ids,
        source: path.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::gguf_row_of_hf_row;

    #[test]
    fn qk_permutation_matches_llama_cpp_converter() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in), hd = 4, 2 heads.
        // HF rows [h0: a0 a1 b0 b1 | h1: ...] become GGUF [a0 b0 a1 b1 | ...].
        let hd = 4;
        let gguf_order: Vec<usize> = vec![0, 2, 1, 3, 4, 6, 5, 7]; // gguf row i holds hf row gguf_order[i]
        for (g, &hf) in gguf_order.iter().enumerate() {
            assert_eq!(gguf_row_of_hf_row(hf, hd), g);
        }
    }
}
