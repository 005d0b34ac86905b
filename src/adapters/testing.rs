//! Builders shared by the adapters' in-file tests: a tiny base model's shapes and safetensors
//! files written from f32 values.
use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use super::target::BaseShapes;
use crate::model::config::LlamaConfig;

/// q_proj 8x8, k/v 4x8, gate/up 12x8, down 8x12, embeddings 16x8, two layers.
pub(crate) fn tiny_base() -> BaseShapes {
    BaseShapes::new(LlamaConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![2],
        arch: Default::default(),
    })
}

/// Writes f32 tensors `(name, shape, values)` to a safetensors file.
pub(crate) fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, s, v)| (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        bufs.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}
