//! Loading a Llama-family model from a GGUF file or a Hugging Face directory
//! (`config.json` + `*.safetensors` + `tokenizer.json`).
//!
//! Invariants: every tensor's shape is checked against the config before use; GGUF q/k rows,
//! which llama.cpp stores permuted for its interleaved RoPE, are un-permuted to Hugging Face order
//! (on the raw quantized rows, so quantized weights stay quantized); the result is immutable.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::chat::ChatTemplate;
use super::config::{ConfigError, LlamaConfig};
use super::linear::{BaseWeight, DenseWeight, Linear, LinearId, Proj, QuantWeight, WeightMode};
use super::llama::{Block, Llama};
use super::tokenizer;

/// Errors raised while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

impl LoadError {
    /// Stable code string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "model_io",
            Self::Format { .. } | Self::MissingTensor { .. } | Self::Shape { .. } => "model_format",
            Self::Config { source, .. } => source.code(),
            Self::Tokenizer { .. } => "model_tokenizer",
            Self::Candle { .. } => "model_tensor",
        }
    }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub weights: WeightMode,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { weights: WeightMode::Quantized, device: Device::Cpu }
    }
}

/// A loaded model with its text front end.
pub struct LoadedModel {
    pub llama: std::sync::Arc<Llama>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<std::sync::Arc<ChatTemplate>>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    pub source: PathBuf,
}

/// Loads a `.gguf` file or a Hugging Face model directory.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        load_hf_dir(path, opts)
    } else {
        load_gguf(path, opts)
    }
}

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
/// within Q8 rounding, and the Q8_0 kernel is several times faster. Other types are kept as stored.
/// A GPU model gets the same Q8_0 blocks, so that `--weights quantized` runs the same base weights
/// on every device (with the stored 4-bit blocks, the CUDA path's logits moved further from the
/// float32 reference: one kit case's adapter effect was off by 41% against at most 26% on the CPU).
/// The blocks are made on the host and uploaded with `QStorage::from_data`: candle 0.11's
/// `QTensor::quantize` of a CUDA tensor leaves the row padding of its buffer uninitialised, and
/// the CUDA matmul kernels read that padding (seen: every logit NaN).
fn reblock_for_speed(q: QTensor, mode: WeightMode) -> candle_core::Result<QTensor> {
    use candle_core::quantized::GgmlDType as G;
    let slow = matches!(q.dtype(), G::Q4_1 | G::Q5_0 | G::Q5_1);
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

/// Loads a GGUF file (llama architecture).
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let cd = |source| LoadError::Candle { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| LoadError::Format { path: path.into(), reason: format!("not a readable GGUF file: {e}") })?;
    let cfg = LlamaConfig::from_gguf(&content).map_err(|source| LoadError::Config { path: path.into(), source })?;
    let dev = &opts.device;
    let mut read = |name: &str, expected: &[usize]| -> Result<QTensor, LoadError> {
        if !content.tensor_infos.contains_key(name) {
            return Err(LoadError::MissingTensor { path: path.into(), name: name.into() });
        }
        let t = content.tensor(&mut file, name, dev).map_err(cd)?;
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
    let embed_q = read("token_embd.weight", &[cfg.vocab_size, h])?;
    let embed = embed_q.dequantize(dev).map_err(cd)?;
    let final_norm = read("output_norm.weight", &[h])?.dequantize(dev).map_err(cd)?;
    let lm_head = if cfg.tie_word_embeddings {
        match opts.weights {
            WeightMode::F32 => BaseWeight::Dense(DenseWeight::new(&embed).map_err(cd)?),
            WeightMode::Quantized => BaseWeight::from_qtensor(embed_q, WeightMode::Quantized).map_err(cd)?,
            WeightMode::Auto => {
                BaseWeight::Both { q: QuantWeight::new(embed_q).map_err(cd)?, dense: DenseWeight::new(&embed).map_err(cd)? }
            }
        }
    } else {
        BaseWeight::from_qtensor(read("output.weight", &[cfg.vocab_size, h])?, opts.weights).map_err(cd)?
    };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let mut lin = |proj: Proj, gguf: &str, out: usize, inp: usize, permute_heads: Option<usize>| {
            let q = read(&format!("blk.{l}.{gguf}.weight"), &[out, inp])?;
            let q = match permute_heads {
                Some(_) => unpermute_rows(q, hd, dev).map_err(cd)?,
                None => q,
            };
            let w = match opts.weights {
                // The float32 copy comes from the stored blocks, not the re-blocked ones.
                WeightMode::Auto => {
                    let dense = DenseWeight::new(&q.dequantize(dev).map_err(cd)?).map_err(cd)?;
                    let q = reblock_for_speed(q, opts.weights).map_err(cd)?;
                    BaseWeight::Both { q: QuantWeight::new(q).map_err(cd)?, dense }
                }
                mode => BaseWeight::from_qtensor(reblock_for_speed(q, mode).map_err(cd)?, mode).map_err(cd)?,
            };
            Ok::<_, LoadError>(Linear::new(LinearId { layer: l, proj }, w, out, inp))
        };
        let (qd, kvd, ff) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size);
        let q = lin(Proj::Q, "attn_q", qd, h, Some(cfg.num_attention_heads))?;
        let k = lin(Proj::K, "attn_k", kvd, h, Some(cfg.num_key_value_heads))?;
        let v = lin(Proj::V, "attn_v", kvd, h, None)?;
        let o = lin(Proj::O, "attn_output", h, qd, None)?;
        let gate = lin(Proj::Gate, "ffn_gate", ff, h, None)?;
        let up = lin(Proj::Up, "ffn_up", ff, h, None)?;
        let down = lin(Proj::Down, "ffn_down", h, ff, None)?;
        let attn_norm = read(&format!("blk.{l}.attn_norm.weight"), &[h])?.dequantize(dev).map_err(cd)?;
        let mlp_norm = read(&format!("blk.{l}.ffn_norm.weight"), &[h])?.dequantize(dev).map_err(cd)?;
        blocks.push(Block { attn_norm, q, k, v, o, mlp_norm, gate, up, down });
    }
    let tok = if content.metadata.contains_key("tokenizer.ggml.tokens") {
        Some(tokenizer::tokenizer_from_gguf(&content).map_err(|e| LoadError::Tokenizer { path: path.into(), reason: e.to_string() })?)
    } else {
        None
    };
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

/// Loads a Hugging Face directory: `config.json`, `model.safetensors` or shards, and optionally
/// `tokenizer.json` / `tokenizer_config.json` (for the chat template).
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| LoadError::Io { path: cfg_path.clone(), source })?;
    let cfg = LlamaConfig::from_hf_json(&text).map_err(|source| LoadError::Config { path: cfg_path.clone(), source })?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| LoadError::Io { path: dir.into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Format { path: dir.into(), reason: "no *.safetensors file".into() });
    }
    let dev = &opts.device;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, dev)
            .map_err(|e| LoadError::Format { path: f.clone(), reason: format!("unreadable safetensors: {e}") })?;
        tensors.extend(loaded);
    }
    let get = |name: &str, expected: &[usize]| -> Result<Tensor, LoadError> {
        let t = tensors.get(name).ok_or_else(|| LoadError::MissingTensor { path: dir.into(), name: name.into() })?;
        if t.dims() != expected {
            return Err(LoadError::Shape { path: dir.into(), name: name.into(), expected: expected.to_vec(), got: t.dims().to_vec() });
        }
        t.to_dtype(DType::F32).map_err(|source| LoadError::Candle { path: dir.into(), source })
    };
    let cd = |source| LoadError::Candle { path: dir.to_path_buf(), source };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let final_norm = get("model.norm.weight", &[h])?;
    let head = if tensors.contains_key("lm_head.weight") && !cfg.tie_word_embeddings {
        get("lm_head.weight", &[cfg.vocab_size, h])?
    } else {
        embed.clone()
    };
    let lm_head = BaseWeight::from_dense(head, opts.weights).map_err(cd)?;
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let (qd, kvd, ff) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size);
        let lin = |proj: Proj, out: usize, inp: usize| {
            let id = LinearId { layer: l, proj };
            let w = BaseWeight::from_dense(get(&id.hf_weight_name(), &[out, inp])?, opts.weights).map_err(cd)?;
            Ok::<_, LoadError>(Linear::new(id, w, out, inp))
        };
        blocks.push(Block {
            attn_norm: get(&format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
            q: lin(Proj::Q, qd, h)?,
            k: lin(Proj::K, kvd, h)?,
            v: lin(Proj::V, kvd, h)?,
            o: lin(Proj::O, h, qd)?,
            mlp_norm: get(&format!("model.layers.{l}.post_attention_layernorm.weight"), &[h])?,
            gate: lin(Proj::Gate, ff, h)?,
            up: lin(Proj::Up, ff, h)?,
            down: lin(Proj::Down, h, ff)?,
        });
    }
    let tok_path = dir.join("tokenizer.json");
    let tok = if tok_path.exists() {
        Some(
            tokenizer::tokenizer_from_file(&tok_path)
                .map_err(|e| LoadError::Tokenizer { path: tok_path.clone(), reason: e.to_string() })?,
        )
    } else {
        None
    };
    let chat_template = read_hf_chat_template(dir)?;
    let eos_token_ids = cfg.eos_token_ids.clone();
    let llama = Llama::new(cfg, embed, blocks, final_norm, lm_head, dev.clone()).map_err(cd)?;
    Ok(LoadedModel {
        llama: std::sync::Arc::new(llama),
        tokenizer: tok,
        chat_template: chat_template.map(std::sync::Arc::new),
        eos_token_ids,
        source: dir.into(),
    })
}

fn read_hf_chat_template(dir: &Path) -> Result<Option<ChatTemplate>, LoadError> {
    let p = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Format { path: p.clone(), reason: e.to_string() })?;
    match v.get("chat_template").and_then(|t| t.as_str()) {
        Some(t) => ChatTemplate::new(t).map(Some).map_err(|e| LoadError::Tokenizer { path: p.clone(), reason: e.to_string() }),
        None => Ok(None),
    }
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
