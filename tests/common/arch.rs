//! The architecture parity kit copied into tests/fixtures/arch (one folder per family: `model/`
//! HF folder, `model.gguf` where the kit has one, `lora/`, reference logits), and the harness the
//! family tests share: load a family, resolve the kit's LoRA, compute next-token logits, run greedy
//! sequences.
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use modserve::adapters::batch::BatchDeltas;
use modserve::adapters::composition::{Composition, CompositionSpec, DeltaRef};
use modserve::adapters::registry::{AdapterRoot, Registry};
use modserve::adapters::store::AdapterStore;
use modserve::engine::sequence::{GenerateSpec, Sequence};
use modserve::model::kv_cache::SeqKvCache;
use modserve::model::linear::WeightMode;
use modserve::model::llama::SeqChunk;
use modserve::model::load::{load, LoadOptions, LoadedModel};
use modserve::model::sampling::{log_softmax, top_k_logprobs, SamplingParams};

/// Every family of the kit.
pub const FAMILIES: [&str; 6] = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"];
/// The families whose kit ships a GGUF.
pub const GGUF_FAMILIES: [&str; 3] = ["qwen3", "gemma3", "phi3"];

pub fn dir(family: &str) -> PathBuf {
    super::fixture(&format!("arch/{family}"))
}

pub fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(super::fixture("arch/cases.json")).expect("arch cases.json fixture");
    serde_json::from_str(&text).expect("cases.json parses")
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The kit's prompts (token ids).
pub fn prompts(cases: &serde_json::Value) -> Vec<Vec<u32>> {
    cases["prompt_token_ids"].as_array().unwrap().iter().map(ids_of).collect()
}

/// A family's model (HF folder or GGUF) in `weights` mode, with an adapter store over its kit folder
/// (the LoRA is module `lora`).
pub struct Family {
    pub name: String,
    pub model: LoadedModel,
    pub store: AdapterStore,
}

impl Family {
    pub fn load_from(name: &str, path: PathBuf, weights: WeightMode) -> Self {
        let model = load(&path, &LoadOptions { weights, device: super::test_device() })
            .unwrap_or_else(|e| panic!("{name}: {} loads: {e}", path.display()));
        let registry = Registry::new(AdapterRoot::new(&dir(name)).unwrap(), true);
        let store = AdapterStore::for_model(registry, 1 << 30, model.llama.clone());
        Family { name: name.into(), model, store }
    }

    pub fn hf(name: &str, weights: WeightMode) -> Self {
        Self::load_from(name, dir(name).join("model"), weights)
    }

    pub fn gguf(name: &str, weights: WeightMode) -> Self {
        Self::load_from(name, dir(name).join("model.gguf"), weights)
    }

    /// The composition `deltas` (module id, scale), resolved.
    pub fn composition(&self, deltas: &[(&str, f32)]) -> Arc<Composition> {
        let spec = CompositionSpec { deltas: deltas.iter().map(|&(id, scale)| DeltaRef { id: id.into(), scale }).collect(), route: None };
        Arc::new(self.store.resolve(&spec).unwrap_or_else(|e| panic!("{}: {e}", self.name)))
    }

    /// Next-token logits after the whole prompt `ids` (one prefill), with `comp` applied.
    pub fn logits(&self, comp: Option<&Composition>, ids: &[u32]) -> Vec<f32> {
        self.logits_with(comp, ids, false)
    }

    /// [`Self::logits`]; `tensor_attention`: with a tensor KV cache, so attention runs the tensor-op
    /// path that GPUs use (on the CPU too).
    pub fn logits_with(&self, comp: Option<&Composition>, ids: &[u32], tensor_attention: bool) -> Vec<f32> {
        let llama = &self.model.llama;
        let mut cache = if tensor_attention {
            SeqKvCache::new_tensors(&llama.cfg, ids.len(), llama.device()).unwrap()
        } else {
            SeqKvCache::new(&llama.cfg, ids.len(), llama.device()).unwrap()
        };
        let deltas = BatchDeltas::new([(ids.len(), comp)], llama.cfg.tie_word_embeddings);
        let out = llama.forward(&mut [SeqChunk { tokens: ids, cache: &mut cache, want_logits: true }], &deltas).unwrap();
        out.get(0).unwrap().to_vec1().unwrap()
    }

    /// A greedy sequence over `ids` that generates exactly `new` tokens with `comp`.
    pub fn sequence(&self, ids: &[u32], new: usize, comp: Option<&Arc<Composition>>) -> Sequence {
        let cache = SeqKvCache::new(&self.model.llama.cfg, ids.len() + new, self.model.llama.device()).unwrap();
        self.sequence_with(ids, new, comp, cache)
    }

    /// [`Self::sequence`] over a given cache.
    pub fn sequence_with(&self, ids: &[u32], new: usize, comp: Option<&Arc<Composition>>, cache: SeqKvCache) -> Sequence {
        let spec = GenerateSpec {
            prompt_ids: ids.to_vec(),
            max_new_tokens: new,
            min_new_tokens: new,
            stop: vec![],
            sampling: SamplingParams::default(),
        };
        let mut s = Sequence::new(spec, cache, None, self.model.eos_token_ids.clone().into()).unwrap();
        s.composition = comp.cloned();
        s
    }
}

/// The kit's reference logits of `case` (`base` / `lora`) for `family`, one row per prompt.
pub fn reference_logits(cases: &serde_json::Value, family: &str, case: &str) -> Vec<Vec<f32>> {
    let file = cases["archs"][family]["cases"][case]["logits_file"].as_str().unwrap();
    let file = file.rsplit('/').next().unwrap();
    let t = candle_core::safetensors::load(dir(family).join(file), &Device::Cpu).unwrap();
    let rows = t["logits"].dim(0).unwrap();
    (0..rows).map(|p| t["logits"].get(p).unwrap().to_vec1().unwrap()).collect()
}

/// The kit's tolerance: max |logit diff| <= 2e-3 * max |ref|, same top-5 ids, log-probs within 0.01.
pub fn assert_logits_match(what: &str, ours: &[f32], theirs: &[f32], top5_ids: &serde_json::Value, top5_logprobs: &serde_json::Value) {
    let scale = theirs.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    let diff = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff <= 2e-3 * scale, "{what}: max |logit diff| {diff} > 2e-3 * {scale}");
    let top = top_k_logprobs(&log_softmax(ours).unwrap(), 5);
    assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), ids_of(top5_ids), "{what}: top-5 ids");
    for (t, want) in top.iter().zip(top5_logprobs.as_array().unwrap()) {
        let want = want.as_f64().unwrap() as f32;
        assert!((t.logprob - want).abs() <= 0.01, "{what}: logprob {} vs {want}", t.logprob);
    }
}
