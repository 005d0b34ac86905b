//! Model families against the architecture parity kit (tests/fixtures/arch, transformers + PEFT in
//! float32 from bf16 weights): Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 and Phi-3, from their
//! Hugging Face folders and, where the kit has one, their GGUF files; the base model and the kit's
//! LoRA (on Phi-3, on the fused `qkv_proj` / `gate_up_proj`). Per prompt: next-token logits within
//! 2e-3 x max|logit|, the same top-5 ids, log-probs within 0.01, and the same 16 greedy tokens
//! (prefill in chunks of 5, so chunks straddle the sliding windows); then per family one mixed
//! batch of requests with and without the adapter equals each alone. The logits are checked with
//! both attention paths: the fused CPU kernel and the tensor-op one GPUs run.
mod common;

use common::arch::{assert_logits_match, cases, ids_of, prompts, reference_logits, Family, FAMILIES, GGUF_FAMILIES};
use modserve::engine::sequence::Sequence;
use modserve::engine::step::run_to_completion;
use modserve::model::linear::WeightMode;

/// Base and LoRA cases of one loaded family: logits, top-5, log-probs, greedy alone, then all six
/// (case, prompt) sequences in one mixed batch.
fn check_family(fam: &Family) {
    let cases = cases();
    let arch = &cases["archs"][fam.name.as_str()];
    let prompts = prompts(&cases);
    let lora = fam.composition(&[("lora", 1.0)]);
    let mut batch: Vec<(String, usize, Sequence)> = Vec::new();
    for case in ["base", "lora"] {
        let c = &arch["cases"][case];
        let comp = (case == "lora").then_some(&lora);
        let reference = reference_logits(&cases, &fam.name, case);
        for (p, ids) in prompts.iter().enumerate() {
            let what = format!("{} {case} prompt {p}", fam.name);
            let ours = fam.logits(comp.map(|c| c.as_ref()), ids);
            assert_logits_match(&what, &ours, &reference[p], &c["top5_ids"][p], &c["top5_logprobs"][p]);
            // The tensor-op attention (the GPU path), run on the CPU.
            let tensors = fam.logits_with(comp.map(|c| c.as_ref()), ids, true);
            assert_logits_match(&format!("{what} (tensor attention)"), &tensors, &reference[p], &c["top5_ids"][p], &c["top5_logprobs"][p]);
            let mut solo = fam.sequence(ids, 16, comp);
            run_to_completion(&fam.model.llama, &mut [&mut solo], 5).unwrap();
            assert_eq!(solo.generated, ids_of(&c["greedy"][p]), "{what}: greedy tokens");
            batch.push((case.into(), p, fam.sequence(ids, 16, comp)));
        }
    }
    let mut refs: Vec<&mut Sequence> = batch.iter_mut().map(|(_, _, s)| s).collect();
    run_to_completion(&fam.model.llama, &mut refs, 7).unwrap();
    for (case, p, s) in &batch {
        assert_eq!(
            s.generated,
            ids_of(&arch["cases"][case.as_str()]["greedy"][*p]),
            "{} {case} prompt {p}: greedy in the mixed batch",
            fam.name
        );
    }
}

#[test]
fn hf_folders_match_transformers_base_and_lora() {
    for name in FAMILIES {
        check_family(&Family::hf(name, WeightMode::F32));
    }
}

#[test]
fn gguf_files_match_transformers_base_and_lora() {
    for name in GGUF_FAMILIES {
        check_family(&Family::gguf(name, WeightMode::F32));
    }
}

/// Sliding-window layers on the CPU keep a ring of `window - 1 + round rows` positions. With
/// rounds of 3 rows the rings of the kit's windowed families (mistral 16, gemma2 8, gemma3 12)
/// wrap many times within the 40- and 120-token prompts, chunks are taken in rounds, and the
/// results must still be the kit's; the rings really are that small.
#[test]
fn wrapped_sliding_window_rings_still_match_transformers() {
    use modserve::model::kv_cache::SeqKvCache;
    use modserve::model::linear::NoDeltas;
    use modserve::model::llama::SeqChunk;
    let cases = cases();
    let prompts = prompts(&cases);
    for name in ["mistral", "gemma2", "gemma3"] {
        let fam = Family::hf(name, WeightMode::F32);
        let cfg = &fam.model.llama.cfg;
        let c = &cases["archs"][name]["cases"]["base"];
        let reference = common::arch::reference_logits(&cases, name, "base");
        for (p, ids) in prompts.iter().enumerate() {
            let cap = ids.len() + 16;
            let mut cache = SeqKvCache::with_window_round_rows(cfg, cap, 3).unwrap();
            for l in 0..cfg.num_hidden_layers {
                let want = cfg.layer_attn(l).window.map_or(cap, |w| cap.min(w + 2));
                assert_eq!(cache.layer_capacity(l), want, "{name} layer {l}");
            }
            let out = fam.model.llama.forward(&mut [SeqChunk { tokens: ids, cache: &mut cache, want_logits: true }], &NoDeltas).unwrap();
            let ours: Vec<f32> = out.get(0).unwrap().to_vec1().unwrap();
            assert_logits_match(&format!("{name} ring prompt {p}"), &ours, &reference[p], &c["top5_ids"][p], &c["top5_logprobs"][p]);
            let cache = SeqKvCache::with_window_round_rows(cfg, cap, 3).unwrap();
            let mut s = fam.sequence_with(ids, 16, None, cache);
            run_to_completion(&fam.model.llama, &mut [&mut s], 11).unwrap();
            assert_eq!(s.generated, ids_of(&c["greedy"][p]), "{name} ring prompt {p}: greedy");
        }
    }
}

/// A float16 checkpoint (the kit's bf16 values, exactly representable in f16 at these magnitudes)
/// and a float32 one load like the bf16 original: the kit's base logits for every prompt.
#[test]
fn f16_and_f32_checkpoints_load_like_bf16() {
    use candle_core::DType;
    let cases = cases();
    for (name, dtype) in [("qwen3", DType::F16), ("phi3", DType::F16), ("gemma3", DType::F32)] {
        let tmp = tempfile::tempdir().unwrap();
        let src = common::arch::dir(name).join("model");
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let w = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let w: std::collections::HashMap<String, candle_core::Tensor> =
            w.into_iter().map(|(k, v)| (k, v.to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
        let fam = Family::load_from(name, tmp.path().to_path_buf(), WeightMode::F32);
        let c = &cases["archs"][name]["cases"]["base"];
        let reference = common::arch::reference_logits(&cases, name, "base");
        for (p, ids) in prompts(&cases).iter().enumerate() {
            assert_logits_match(
                &format!("{name} {dtype:?} prompt {p}"),
                &fam.logits(None, ids),
                &reference[p],
                &c["top5_ids"][p],
                &c["top5_logprobs"][p],
            );
        }
    }
}

/// An untied model (Phi-3) whose checkpoint lacks `lm_head.weight` is refused, naming the tensor,
/// instead of silently using the embeddings as its head.
#[test]
fn untied_checkpoint_without_a_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::arch::dir("phi3").join("model");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.remove("lm_head.weight").is_some());
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    let opts = modserve::model::load::LoadOptions { weights: WeightMode::F32, device: candle_core::Device::Cpu };
    let e = modserve::model::load::load(tmp.path(), &opts).err().expect("refused").to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
}

/// Phi-3 with `partial_rotary_factor` 0.5 (rotary dims 4 of head_dim 8; no kit reference exists):
/// the fused CPU attention and the tensor-op path agree, and the setting changes the logits.
#[test]
fn phi3_partial_rotary_runs_the_same_on_both_attention_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::arch::dir("phi3").join("model");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.5);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let fam = Family::load_from("phi3", tmp.path().to_path_buf(), WeightMode::F32);
    assert_eq!(fam.model.llama.cfg.rotary_dim(), 4);
    let full = Family::hf("phi3", WeightMode::F32);
    let ids = &prompts(&cases())[1];
    let (host, tensors) = (fam.logits_with(None, ids, false), fam.logits_with(None, ids, true));
    let diff = host.iter().zip(&tensors).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "paths differ by {diff}");
    let moved = host.iter().zip(&full.logits(None, ids)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 0.05, "partial rotary made no difference ({moved})");
}

/// `generation_config.json`'s end-of-turn ids join `config.json`'s, and a chat template given as
/// a list of named templates uses `default`.
#[test]
fn folder_eos_ids_and_named_chat_templates() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::arch::dir("gemma3").join("model");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("generation_config.json"), r#"{"eos_token_id": [2, 7]}"#).unwrap();
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}"}]});
    std::fs::write(tmp.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    let opts = modserve::model::load::LoadOptions { weights: WeightMode::F32, device: candle_core::Device::Cpu };
    let m = modserve::model::load::load(tmp.path(), &opts).unwrap();
    assert_eq!(m.eos_token_ids, vec![2, 7]);
    let msgs = [modserve::model::chat::ChatMessage::new("user", "hi")];
    assert_eq!(m.chat_template.unwrap().render(&msgs, false).unwrap(), "[hi]<|im_end|>");
}
