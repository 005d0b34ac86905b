//! A tiny random Llama built in code, saved both as GGUF (q/k rows permuted the llama.cpp way) and
//! as a Hugging Face safetensors directory: both loaders must give the same logits, and both must
//! agree with candle-transformers' stock `quantized_llama` (an independent implementation that runs
//! GGUF weights with interleaved RoPE). Also checks the KV cache: chunked prefill, token-by-token
//! decode and mixed batches give the same logits as one full pass.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use modserve::model::kv_cache::SeqKvCache;
use modserve::model::linear::{NoDeltas, WeightMode};
use modserve::model::llama::{Llama, SeqChunk};
use modserve::model::load::{gguf_row_of_hf_row, load, LoadOptions};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FF: usize = 128;
const LAYERS: usize = 2;

fn rand_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// HF-named random weights.
fn random_weights(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), rand_tensor(&mut rng, &[VOCAB, HIDDEN], 1.0));
    w.insert("model.norm.weight".to_string(), (rand_tensor(&mut rng, &[HIDDEN], 0.1) + 1.0).unwrap());
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let s = 1.0 / (HIDDEN as f32).sqrt();
        for (name, shape) in [
            ("self_attn.q_proj", [HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.k_proj", [KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.v_proj", [KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HEADS * HEAD_DIM]),
            ("mlp.gate_proj", [FF, HIDDEN]),
            ("mlp.up_proj", [FF, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, FF]),
        ] {
            w.insert(format!("{p}.{name}.weight"), rand_tensor(&mut rng, &shape, s * 2.0));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{n}.weight"), (rand_tensor(&mut rng, &[HIDDEN], 0.1) + 1.0).unwrap());
        }
    }
    w
}

fn save_hf(dir: &Path, w: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FF,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": true, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();
}

/// Reorders q/k rows from HF order to GGUF order, as llama.cpp's converter does.
fn permute_to_gguf(t: &Tensor) -> Tensor {
    let rows = t.dim(0).unwrap();
    let mut idx = vec![0u32; rows];
    for r in 0..rows {
        idx[gguf_row_of_hf_row(r, HEAD_DIM)] = r as u32;
    }
    t.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0).unwrap()
}

fn save_gguf(path: &Path, w: &HashMap<String, Tensor>) {
    save_gguf_as(path, w, candle_core::quantized::GgmlDType::F32)
}

fn save_gguf_as(path: &Path, w: &HashMap<String, Tensor>, dtype: candle_core::quantized::GgmlDType) {
    use gguf_file::Value as V;
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.context_length", V::U32(128)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FF as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.rope.dimension_count", V::U32(HEAD_DIM as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.vocab_size", V::U32(VOCAB as u32)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ];
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q = |t: &Tensor| {
        let dt = if t.rank() == 2 { dtype } else { candle_core::quantized::GgmlDType::F32 };
        QTensor::quantize(t, dt).unwrap()
    };
    tensors.push(("token_embd.weight".into(), q(&w["model.embed_tokens.weight"])));
    tensors.push(("output_norm.weight".into(), q(&w["model.norm.weight"])));
    for l in 0..LAYERS {
        let g = |n: &str| &w[&format!("model.layers.{l}.{n}.weight")];
        for (gg, hf, perm) in [
            ("attn_q", "self_attn.q_proj", true),
            ("attn_k", "self_attn.k_proj", true),
            ("attn_v", "self_attn.v_proj", false),
            ("attn_output", "self_attn.o_proj", false),
            ("ffn_gate", "mlp.gate_proj", false),
            ("ffn_up", "mlp.up_proj", false),
            ("ffn_down", "mlp.down_proj", false),
            ("attn_norm", "input_layernorm", false),
            ("ffn_norm", "post_attention_layernorm", false),
        ] {
            let t = if perm { permute_to_gguf(g(hf)) } else { g(hf).clone() };
            tensors.push((format!("blk.{l}.{gg}.weight"), q(&t)));
        }
    }
    let mut f = std::fs::File::create(path).unwrap();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// Logits after every prefix of `ids` by a single full pass per prefix length (no cache reuse).
fn logits_last(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = SeqKvCache::new(&model.cfg, ids.len(), model.device()).unwrap();
    let out = model.forward(&mut [SeqChunk { tokens: ids, cache: &mut cache, want_logits: true }], &NoDeltas).unwrap();
    out.get(0).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const PROMPT: [u32; 9] = [5, 17, 3, 88, 42, 42, 7, 60, 1];

fn models() -> (tempfile::TempDir, std::sync::Arc<Llama>, std::sync::Arc<Llama>) {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(7);
    save_hf(&dir.path().join("hf"), &w);
    save_gguf(&dir.path().join("tiny.gguf"), &w);
    let opts = LoadOptions { weights: WeightMode::F32, device: Device::Cpu };
    let hf = load(&dir.path().join("hf"), &opts).unwrap().llama;
    let gg = load(&dir.path().join("tiny.gguf"), &opts).unwrap().llama;
    (dir, hf, gg)
}

#[test]
fn gguf_and_hf_loaders_give_the_same_logits() {
    let (_d, hf, gg) = models();
    assert_eq!(hf.cfg.num_key_value_heads, gg.cfg.num_key_value_heads);
    let a = logits_last(&hf, &PROMPT);
    let b = logits_last(&gg, &PROMPT);
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(scale > 0.1, "logits should not be degenerate");
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5 * scale.max(1.0), "HF vs GGUF logits differ by {d}");
}

#[test]
fn matches_candle_transformers_quantized_llama() {
    let (dir, _hf, gg) = models();
    let path = dir.path().join("tiny.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut stock = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let x = Tensor::new(&PROMPT[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let reference: Vec<f32> = stock.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let ours = logits_last(&gg, &PROMPT);
    let d = max_abs_diff(&ours, &reference);
    assert!(d < 1e-3, "ours vs quantized_llama differ by {d}");
}

#[test]
fn kv_cache_chunked_prefill_decode_and_batching_agree() {
    let (_d, hf, _gg) = models();
    let full = logits_last(&hf, &PROMPT);
    // Chunked prefill 4 + 3 then token-by-token for the last 2, in one cache.
    let mut cache = SeqKvCache::new(&hf.cfg, PROMPT.len(), hf.device()).unwrap();
    let mut last = Vec::new();
    for part in [&PROMPT[0..4], &PROMPT[4..7], &PROMPT[7..8], &PROMPT[8..9]] {
        let out = hf.forward(&mut [SeqChunk { tokens: part, cache: &mut cache, want_logits: true }], &NoDeltas).unwrap();
        last = out.get(0).unwrap().to_vec1().unwrap();
    }
    assert_eq!(cache.len(), PROMPT.len());
    let d = max_abs_diff(&full, &last);
    assert!(d < 1e-4, "incremental vs full logits differ by {d}");

    // The same sequence inside a batch with another sequence at a different position.
    let other = [9u32, 8, 7, 6, 5, 4, 3];
    let mut c1 = SeqKvCache::new(&hf.cfg, PROMPT.len(), hf.device()).unwrap();
    let mut c2 = SeqKvCache::new(&hf.cfg, other.len(), hf.device()).unwrap();
    hf.forward(&mut [SeqChunk { tokens: &PROMPT[..6], cache: &mut c1, want_logits: false }], &NoDeltas).unwrap();
    let out = hf
        .forward(
            &mut [
                SeqChunk { tokens: &other, cache: &mut c2, want_logits: true },
                SeqChunk { tokens: &PROMPT[6..], cache: &mut c1, want_logits: true },
            ],
            &NoDeltas,
        )
        .unwrap();
    assert_eq!(out.dims(), &[2, VOCAB]);
    let batched: Vec<f32> = out.get(1).unwrap().to_vec1().unwrap();
    let d = max_abs_diff(&full, &batched);
    assert!(d < 1e-4, "batched vs solo logits differ by {d}");
    let other_solo = logits_last(&hf, &other);
    let d = max_abs_diff(&other_solo, &out.get(0).unwrap().to_vec1::<f32>().unwrap());
    assert!(d < 1e-4, "batched vs solo logits of the second sequence differ by {d}");
}

/// Many sequences in one step take the attention's one-task-per-sequence path (at least four
/// per pool thread: five on one thread here); each must get what it gets alone (one task per
/// head), at its own position, prefill chunks and decode rows mixed.
#[test]
fn many_sequences_in_one_step_agree_with_each_alone() {
    let (_d, hf, _gg) = models();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        let prompts: Vec<Vec<u32>> =
            (0..5u32).map(|s| (0..3 + 2 * s as usize).map(|i| (7 * s + 3 * i as u32 + 1) % VOCAB as u32).collect()).collect();
        // Every sequence but the last is already cached up to its last 1 or 2 tokens.
        let split = |p: &Vec<u32>, s: usize| p.len() - 1 - (s % 2);
        let mut caches: Vec<SeqKvCache> = prompts.iter().map(|p| SeqKvCache::new(&hf.cfg, p.len(), hf.device()).unwrap()).collect();
        for (s, (p, c)) in prompts.iter().zip(caches.iter_mut()).enumerate().take(4) {
            hf.forward(&mut [SeqChunk { tokens: &p[..split(p, s)], cache: c, want_logits: false }], &NoDeltas).unwrap();
        }
        let mut chunks: Vec<SeqChunk> = prompts
            .iter()
            .zip(caches.iter_mut())
            .enumerate()
            .map(|(s, (p, c))| SeqChunk { tokens: if s < 4 { &p[split(p, s)..] } else { &p[..] }, cache: c, want_logits: true })
            .collect();
        let out = hf.forward(&mut chunks, &NoDeltas).unwrap();
        for (s, p) in prompts.iter().enumerate() {
            let alone = logits_last(&hf, p);
            let d = max_abs_diff(&alone, &out.get(s).unwrap().to_vec1::<f32>().unwrap());
            assert!(d < 1e-4, "sequence {s}: batched vs solo logits differ by {d}");
        }
    });
}

#[test]
fn cache_overflow_and_bad_tokens_are_errors_not_panics() {
    let (_d, hf, _gg) = models();
    let mut cache = SeqKvCache::new(&hf.cfg, 3, hf.device()).unwrap();
    let err = hf.forward(&mut [SeqChunk { tokens: &PROMPT[..4], cache: &mut cache, want_logits: true }], &NoDeltas);
    assert!(err.is_err());
    let mut cache = SeqKvCache::new(&hf.cfg, 3, hf.device()).unwrap();
    let err = hf.forward(&mut [SeqChunk { tokens: &[VOCAB as u32], cache: &mut cache, want_logits: true }], &NoDeltas);
    assert!(err.unwrap_err().to_string().contains("outside the vocabulary"));
}

#[test]
fn quantized_weights_match_quantized_llama_on_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(11);
    let path = dir.path().join("q8.gguf");
    save_gguf_as(&path, &w, candle_core::quantized::GgmlDType::Q8_0);
    let ours = load(&path, &LoadOptions { weights: WeightMode::Quantized, device: Device::Cpu }).unwrap().llama;
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut stock = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let x = Tensor::new(&PROMPT[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let reference: Vec<f32> = stock.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let got = logits_last(&ours, &PROMPT);
    let d = max_abs_diff(&got, &reference);
    assert!(d < 1e-3, "quantized: ours vs quantized_llama differ by {d}");
}

#[test]
fn auto_weights_use_dense_for_large_steps_and_quantized_for_small() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(13);
    let path = dir.path().join("q8.gguf");
    save_gguf_as(&path, &w, candle_core::quantized::GgmlDType::Q8_0);
    let load_as = |m| load(&path, &LoadOptions { weights: m, device: Device::Cpu }).unwrap().llama;
    let (auto, f32m, quant) = (load_as(WeightMode::Auto), load_as(WeightMode::F32), load_as(WeightMode::Quantized));
    // 9 rows: the float32 copy; the single-row output head: quantized (both as their own modes do).
    let mut c1 = SeqKvCache::new(&auto.cfg, 10, auto.device()).unwrap();
    let mut c2 = SeqKvCache::new(&f32m.cfg, 10, f32m.device()).unwrap();
    let mut c3 = SeqKvCache::new(&quant.cfg, 10, quant.device()).unwrap();
    let run = |m: &Llama, c: &mut SeqKvCache, t: &[u32]| -> Vec<f32> {
        m.forward(&mut [SeqChunk { tokens: t, cache: c, want_logits: true }], &NoDeltas).unwrap().get(0).unwrap().to_vec1().unwrap()
    };
    let a = run(&auto, &mut c1, &PROMPT);
    let f = run(&f32m, &mut c2, &PROMPT);
    let q = run(&quant, &mut c3, &PROMPT);
    // Only the one-row output head differs from f32 mode (8-bit activations): within 2% of the range.
    let scale = f.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(max_abs_diff(&a, &f) < 0.02 * scale, "auto vs f32: {} (scale {scale})", max_abs_diff(&a, &f));
    assert!(max_abs_diff(&a, &q) < 0.02 * scale, "auto vs quantized: {}", max_abs_diff(&a, &q));
    // A one-row decode step runs the quantized kernels: identical to quantized mode given the same cache.
    let mut c4 = SeqKvCache::new(&quant.cfg, 10, quant.device()).unwrap();
    let mut c5 = SeqKvCache::new(&auto.cfg, 10, auto.device()).unwrap();
    for t in PROMPT {
        let x = run(&quant, &mut c4, &[t]);
        let y = run(&auto, &mut c5, &[t]);
        assert!(max_abs_diff(&x, &y) < 1e-5, "single-row steps must take the quantized path");
    }
}
