//! Every composition of the reference kit (tests/fixtures/parity, from HF transformers + PEFT)
//! reproduced through the adapter store and the batch step: next-token logits, top-5 ids and
//! log-probs, and 16 greedy tokens per prompt; then all cases together in ONE mixed batch must give
//! the same tokens as each case alone.
mod common;

use std::sync::Arc;

use candle_core::Device;
use modserve::adapters::batch::BatchDeltas;
use modserve::adapters::composition::{Composition, CompositionSpec, DeltaRef};
use modserve::adapters::formats::poly::Routing;
use modserve::adapters::module_deltas::MatrixDelta;
use modserve::adapters::registry::{AdapterRoot, Registry};
use modserve::adapters::store::AdapterStore;
use modserve::engine::sequence::{GenerateSpec, Sequence};
use modserve::engine::step::run_to_completion;
use modserve::model::kv_cache::SeqKvCache;
use modserve::model::linear::WeightMode;
use modserve::model::llama::SeqChunk;
use modserve::model::load::{load, LoadOptions};
use modserve::model::sampling::{log_softmax, top_k_logprobs, SamplingParams};

fn d(id: &str, scale: f32) -> DeltaRef {
    DeltaRef { id: id.into(), scale }
}

/// The kit's compositions, as this server expresses them.
fn composition(case: &str) -> CompositionSpec {
    let deltas = |v: Vec<DeltaRef>| CompositionSpec { deltas: v, route: None };
    match case {
        "base" => CompositionSpec::default(),
        "lora_qv_r4" | "lora_all_r8" | "lora_all_r4_rslora" => deltas(vec![d(case, 1.0)]),
        "compose_qv1_all05" => deltas(vec![d("lora_qv_r4", 1.0), d("lora_all_r8", 0.5)]),
        "poly_task0" | "poly_task1" | "poly_task2" => {
            let t: i64 = case[case.len() - 1..].parse().unwrap();
            CompositionSpec { deltas: vec![], route: Some(("poly_qvup".into(), Routing::Task(t))) }
        }
        "sft_lang" => deltas(vec![d("sft_lang", 1.0)]),
        "sft_lang_task" => deltas(vec![d("sft_lang", 1.0), d("sft_task", 1.0)]),
        "sft_lang_task_lora_qv" => deltas(vec![d("sft_lang", 1.0), d("sft_task", 1.0), d("lora_qv_r4", 1.0)]),
        "ewr" => deltas(vec![d("ewr", 1.0)]),
        "task_arithmetic" => deltas(vec![d("ewr/expert_task_vector.safetensors", 1.0), d("ewr/anti_expert_task_vector.safetensors", -1.0)]),
        other => panic!("case {other} has no composition mapping"),
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The reference model loaded in `weights` mode, an adapter store over the kit's modules, and the
/// kit's prompts and case names.
struct Kit {
    cases: serde_json::Value,
    model: modserve::model::load::LoadedModel,
    store: AdapterStore,
    prompts: Vec<Vec<u32>>,
    names: Vec<String>,
}

impl Kit {
    fn load(weights: WeightMode) -> Self {
        let cases = common::cases();
        let model = load(&common::reference_model(), &LoadOptions { weights, device: common::test_device() }).unwrap();
        let registry = Registry::new(AdapterRoot::new(&common::fixture("parity")).unwrap(), true);
        let store = AdapterStore::for_model(registry, 1 << 30, model.llama.clone());
        let prompts: Vec<Vec<u32>> = cases["prompt_token_ids"].as_array().unwrap().iter().map(ids_of).collect();
        let names: Vec<String> = cases["cases"].as_object().unwrap().keys().cloned().collect();
        Kit { cases, model, store, prompts, names }
    }

    /// The kit's resolved composition of case `name`.
    fn composition(&self, name: &str) -> Arc<Composition> {
        Arc::new(self.store.resolve(&composition(name)).unwrap_or_else(|e| panic!("{name}: {e}")))
    }

    /// The kit's (transformers + PEFT) next-token logits of case `name`, one row per prompt.
    fn reference_logits(&self, name: &str) -> Vec<Vec<f32>> {
        let file = self.cases["cases"][name]["logits_file"].as_str().unwrap();
        let t = candle_core::safetensors::load(common::fixture(&format!("parity/{file}")), &Device::Cpu).unwrap();
        (0..self.prompts.len()).map(|p| t["logits"].get(p).unwrap().to_vec1().unwrap()).collect()
    }

    /// Our next-token logits after the whole prompt `ids`, with `comp` applied.
    fn logits(&self, comp: Option<&Composition>, ids: &[u32]) -> Vec<f32> {
        let llama = &self.model.llama;
        let mut cache = SeqKvCache::new(&llama.cfg, ids.len(), llama.device()).unwrap();
        let deltas = BatchDeltas::new([(ids.len(), comp)], llama.cfg.tie_word_embeddings);
        let out = llama.forward(&mut [SeqChunk { tokens: ids, cache: &mut cache, want_logits: true }], &deltas).unwrap();
        out.get(0).unwrap().to_vec1().unwrap()
    }

    /// A greedy sequence over `ids` that generates exactly `new` tokens with `comp`.
    fn sequence(&self, ids: &[u32], new: usize, comp: &Arc<Composition>) -> Sequence {
        let spec = GenerateSpec {
            prompt_ids: ids.to_vec(),
            max_new_tokens: new,
            min_new_tokens: new,
            stop: vec![],
            sampling: SamplingParams::default(),
        };
        let cache = SeqKvCache::new(&self.model.llama.cfg, ids.len() + new, self.model.llama.device()).unwrap();
        let tok = self.model.tokenizer.clone().map(Arc::new);
        let mut s = Sequence::new(spec, cache, tok, self.model.eos_token_ids.clone().into()).unwrap();
        s.composition = Some(comp.clone());
        s
    }
}

#[test]
fn every_kit_case_matches_transformers_alone_and_in_one_mixed_batch() {
    let kit = Kit::load(WeightMode::F32);
    assert_eq!(kit.names.len(), 13, "the kit has 13 cases");
    let mut batch: Vec<(String, usize, Sequence)> = Vec::new();
    for name in &kit.names {
        let case = &kit.cases["cases"][name];
        let comp = kit.composition(name);
        let reference = kit.reference_logits(name);
        for (p, ids) in kit.prompts.iter().enumerate() {
            // Logits after the full prompt.
            let ours = kit.logits(Some(comp.as_ref()), ids);
            let theirs = &reference[p];
            let scale = theirs.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            let diff = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 2e-3 * scale, "{name} prompt {p}: max |logit diff| {diff} > 2e-3 * {scale}");
            let top = top_k_logprobs(&log_softmax(&ours).unwrap(), 5);
            assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), ids_of(&case["top5_ids"][p]), "{name} prompt {p}: top-5");
            for (t, want) in top.iter().zip(case["top5_logprobs"][p].as_array().unwrap()) {
                let want = want.as_f64().unwrap() as f32;
                assert!((t.logprob - want).abs() <= 0.01, "{name} prompt {p}: logprob {} vs {want}", t.logprob);
            }
            // Greedy, alone.
            let mut solo = kit.sequence(ids, 16, &comp);
            run_to_completion(&kit.model.llama, &mut [&mut solo], 512).unwrap();
            assert_eq!(solo.generated, ids_of(&case["greedy"][p]), "{name} prompt {p}: greedy tokens");
            batch.push((name.clone(), p, kit.sequence(ids, 16, &comp)));
        }
    }
    // All 39 (case, prompt) sequences in one batch of mixed compositions, prefill chunked by 8.
    let mut refs: Vec<&mut Sequence> = batch.iter_mut().map(|(_, _, s)| s).collect();
    run_to_completion(&kit.model.llama, &mut refs, 8).unwrap();
    for (name, p, s) in &batch {
        assert_eq!(s.generated, ids_of(&kit.cases["cases"][name]["greedy"][*p]), "{name} prompt {p}: greedy tokens in the mixed batch");
    }
}

#[test]
fn ewr_merged_delta_equals_the_kit_expectation() {
    let model = load(&common::reference_model(), &LoadOptions { weights: WeightMode::F32, device: common::test_device() }).unwrap();
    let registry = Registry::new(AdapterRoot::new(&common::fixture("parity")).unwrap(), true);
    let store = AdapterStore::for_model(registry, 1 << 30, model.llama.clone());
    let m = store.module("ewr").unwrap();
    let deltas = m.deltas().unwrap();
    let expected = candle_core::safetensors::load(common::fixture("parity/ewr/expected_merged_delta.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(deltas.targets.len(), expected.len());
    for (name, want) in &expected {
        let t = modserve::adapters::target::Target::from_hf_name(name).unwrap();
        let got = deltas.targets[&t].to_dense().unwrap();
        let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let scale = w.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        let diff = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: max diff {diff} vs scale {scale}");
    }
}

#[test]
fn generate_cli_applies_deltas_and_routes() {
    let cases = common::cases();
    let ids: Vec<String> = ids_of(&cases["prompt_token_ids"][2]).iter().map(|i| i.to_string()).collect();
    let root = common::fixture("parity");
    for (flags, case) in [
        (vec!["--delta", "lora_qv_r4", "--delta", "lora_all_r8@0.5"], "compose_qv1_all05"),
        (vec!["--route", "poly_qvup:2"], "poly_task2"),
        (
            vec!["--delta", "ewr/expert_task_vector.safetensors@1", "--delta", "ewr/anti_expert_task_vector.safetensors@-1"],
            "task_arithmetic",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
            .args(["generate", "--weights", "f32", "--threads", "2", "--max-new-tokens", "16", "--min-new-tokens", "16", "--json"])
            .args(["--device", &common::test_device_flag(), "--model"])
            .arg(common::reference_model())
            .arg("--adapter-root")
            .arg(&root)
            .args(["--prompt-ids", &ids.join(",")])
            .args(&flags)
            .output()
            .unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids_of(&v["token_ids"]), ids_of(&cases["cases"][case]["greedy"][2]), "{case}");
    }
    // A path outside the root is refused with a clear message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
        .args(["generate", "--max-new-tokens", "2", "--prompt-ids", "1,2", "--delta", "../parity/lora_qv_r4", "--model"])
        .arg(common::reference_model())
        .arg("--adapter-root")
        .arg(&root)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`..` is not allowed"));
}

/// The default serving mode (8-bit base: Q8_0 weights, or the file's Q4_1 blocks on AVX2 CPUs
/// without VNNI; 8-bit activations; the int8 GEMM where the CPU has AVX2, deltas added into the
/// kernel's host output, compact 8-bit LoRA factors) on the kit's compositions. The 8-bit base
/// alone moves the logits by an L2 norm of 45-150 from the kit's float32 reference (measured), more
/// than the whole effect of the small adapters, so the logits themselves are not compared. What is
/// compared, for every case and prompt: the composition's *effect* (its logits minus the base's
/// logits, ours in quantized mode vs the kit's in float32). The weights' error cancels in that
/// difference; the activations' 8-bit rounding does not: a small delta flips roundings all through
/// the network, and the two runs differ by an L2 of 30-230 whatever the delta (measured,
/// 2026-12-03: Poly effects of L2 7-20 came out as 28-235, with f32 or 8-bit factors alike). So in
/// this mode the effect is compared only where it stands above that floor (the kit's effect L2 >
/// 500: the sparse and merge cases), against that prompt's floor as this run measures it: `f = 2 n /
/// effect L2`, `n` the L2 distance of our base logits from the kit's on the prompt (the effect's
/// error is the difference of two such rounding errors, with and without the delta). Relative L2
/// error within `f` clamped to 0.35-0.5, gain along the kit's (`<ours, theirs> / |theirs|^2`)
/// within 1 +- `f` clamped to 0.2-0.5. Why measured, not fixed: `ewr` prompt 1 (effect L2 827) on
/// an AVX2 CPU with the file's Q4_1 weights (the kit's own weights, so `n` is the activations'
/// rounding alone: 51/147/38 on the three prompts, 138/66/43 with Q8_0 weights, 2026-12-05) gave
/// gain 1.253, then 1.320 once the RMSNorm summed its squares in another order (`kernels::norm`;
/// `n` 45/193/29), with no change to any delta. A delta not applied (gain 0) or applied twice (2)
/// stays far outside, as the bound is at most 0.5. Every case's effect, small ones included, is
/// checked through the same compact adapter kernels on the f32 base by
/// `compact_adapter_kernels_reproduce_every_kit_effect`. Also: the kit's top-1 is in our top-5 for
/// every case; and all cases in one mixed batch generate exactly what each generates alone with the
/// same prefill chunking. On an H100 (`MODSERVE_TEST_DEVICE=cuda:0`, 2026-11-27) candle's CUDA
/// kernels, which also quantize the activations (to Q8_1 blocks), gave 36.1% on
/// `sft_lang_task_lora_qv` prompt 2 with the former single 35% bound; see docs/BENCHMARKS.md.
/// `<ours, theirs> / |theirs|^2`: how much of the kit's effect ours carries along its direction (0
/// for a delta not applied, 2 for one applied twice).
fn gain(ours: &[f32], theirs: &[f32]) -> f64 {
    let dot: f64 = ours.iter().zip(theirs).map(|(a, b)| *a as f64 * *b as f64).sum();
    dot / theirs.iter().map(|t| (*t as f64) * (*t as f64)).sum::<f64>()
}

/// The kind of a kit case and the bound on the relative L2 error of its effect through the
/// compact (8-bit) adapter kernels, and on `|gain - 1|`. Calibrated on AMD EPYC (AVX-512 VNNI),
/// 2026-12-03 (the test prints every value): 8-bit LoRA/Poly factors and rows err by about 1%
/// of a delta; the sparse and dense kinds are not quantized at all.
fn effect_tolerance(case: &str) -> (&'static str, f64, f64) {
    match case {
        c if c.starts_with("poly") => ("poly", 0.05, 0.03),
        c if c.starts_with("lora") || c.starts_with("compose") => ("lora", 0.05, 0.03),
        "sft_lang_task_lora_qv" => ("sft+lora", 0.05, 0.03),
        c if c.starts_with("sft") => ("sft", 0.01, 0.01),
        _ => ("merge", 0.01, 0.01),
    }
}

/// The adapter path of the default serving mode (compact 8-bit LoRA and Poly factors, rows
/// quantized per 32 inputs as the base kernel quantizes activations) on the float32 base, where
/// nothing else rounds: every kit case's effect on the logits (its logits minus the base's)
/// against the kit's, within the bounds of the case's kind ([`effect_tolerance`]). A delta
/// silently not applied, or applied twice, fails every bound.
#[test]
fn compact_adapter_kernels_reproduce_every_kit_effect() {
    let kit = Kit::load(WeightMode::F32);
    let registry = Registry::new(AdapterRoot::new(&common::fixture("parity")).unwrap(), true);
    let store = AdapterStore::for_model(registry, 1 << 30, kit.model.llama.clone()).with_compact_factors(true);
    let l2 = |v: &[f32]| v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    let base_logits: Vec<Vec<f32>> = kit.prompts.iter().map(|ids| kit.logits(None, ids)).collect();
    let ref_base = kit.reference_logits("base");
    let (mut measured, mut failures, mut checked) = (Vec::new(), Vec::new(), 0);
    for name in kit.names.iter().filter(|n| *n != "base") {
        let comp = store.resolve(&composition(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let compact = comp.parts.iter().any(|(d, _)| d.targets.values().any(|m| matches!(m, MatrixDelta::Packed(h) if h.is_compact())));
        let reference = kit.reference_logits(name);
        let (kind, bound, gain_bound) = effect_tolerance(name);
        for (p, ids) in kit.prompts.iter().enumerate() {
            let ours = kit.logits(Some(&comp), ids);
            let theirs: Vec<f32> = reference[p].iter().zip(&ref_base[p]).map(|(a, b)| a - b).collect();
            let ours: Vec<f32> = ours.iter().zip(&base_logits[p]).map(|(a, b)| a - b).collect();
            let diff: Vec<f32> = ours.iter().zip(&theirs).map(|(a, b)| a - b).collect();
            let (rel, g) = (l2(&diff) / l2(&theirs), gain(&ours, &theirs));
            measured.push(format!(
                "{name} ({kind}, compact factors: {compact}) prompt {p}: effect L2 {:.1}, relative L2 error {rel:.4}, gain {g:.4}",
                l2(&theirs)
            ));
            if rel > bound || (g - 1.0).abs() > gain_bound {
                failures.push(format!(
                    "{name} prompt {p}: effect off by {rel:.4} (bound {bound}), gain {g:.4} (bound 1 +- {gain_bound}) for {kind}"
                ));
            }
            checked += 1;
        }
        if kind == "lora" || kind == "poly" {
            assert!(compact, "{name}: the composition holds no compact factors, so the 8-bit path was not tested");
        }
    }
    println!("{}", measured.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, 36);
}

#[test]
fn quantized_mode_applies_every_kit_case_and_is_batch_independent() {
    let kit = Kit::load(WeightMode::Quantized);
    let l2 = |v: &[f32]| v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    let base_logits: Vec<Vec<f32>> = kit.prompts.iter().map(|ids| kit.logits(None, ids)).collect();
    let ref_base = kit.reference_logits("base");
    let noise: Vec<f64> =
        base_logits.iter().zip(&ref_base).map(|(a, b)| l2(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f32>>())).collect();
    println!("base logits' L2 distance from the kit's, per prompt: {noise:.0?}");
    const CHUNK: usize = 8;
    let mut checked_effects = 0;
    let mut measured: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut batch: Vec<(String, usize, Vec<u32>, Sequence)> = Vec::new();
    for name in &kit.names {
        let case = &kit.cases["cases"][name];
        let comp = kit.composition(name);
        let reference = kit.reference_logits(name);
        for (p, ids) in kit.prompts.iter().enumerate() {
            let ours = kit.logits(Some(comp.as_ref()), ids);
            // The composition's effect on the logits (its logits minus the base's), ours vs the kit's.
            let effect_theirs: Vec<f32> = reference[p].iter().zip(&ref_base[p]).map(|(a, b)| a - b).collect();
            let effect_ours: Vec<f32> = ours.iter().zip(&base_logits[p]).map(|(a, b)| a - b).collect();
            let diff: Vec<f32> = effect_ours.iter().zip(&effect_theirs).map(|(a, b)| a - b).collect();
            let size = l2(&effect_theirs);
            let (rel, gain) = (l2(&diff) / size, gain(&effect_ours, &effect_theirs));
            if name != "base" {
                measured.push(format!(
                    "{name} prompt {p}: kit effect L2 {size:.0}, ours {:.0}, gain {gain:.3}, relative L2 error {rel:.3}",
                    l2(&effect_ours)
                ));
            }
            if size > 500.0 {
                // This prompt's rounding floor, measured: our base's distance from the kit's.
                let floor = 2.0 * noise[p] / size;
                let (rel_bound, gain_bound) = (floor.clamp(0.35, 0.5), floor.clamp(0.2, 0.5));
                if rel > rel_bound || (gain - 1.0).abs() > gain_bound {
                    failures.push(format!(
                        "{name} prompt {p}: effect off by {rel:.3} (rel. L2; bound {rel_bound:.2}), gain {gain:.3} (1 +- {gain_bound:.2}; effect L2 {size:.0}, base off by {:.0})",
                        noise[p]
                    ));
                }
                checked_effects += 1;
            }
            let top: Vec<u32> = top_k_logprobs(&log_softmax(&ours).unwrap(), 5).iter().map(|t| t.id).collect();
            assert!(top.contains(&ids_of(&case["top5_ids"][p])[0]), "{name} prompt {p}: kit top-1 not in our top-5 {top:?}");
            let mut solo = kit.sequence(ids, 12, &comp);
            run_to_completion(&kit.model.llama, &mut [&mut solo], CHUNK).unwrap();
            batch.push((name.clone(), p, solo.generated.clone(), kit.sequence(ids, 12, &comp)));
        }
    }
    println!("{}", measured.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked_effects >= 11, "only {checked_effects} large effects checked");
    let mut refs: Vec<&mut Sequence> = batch.iter_mut().map(|(_, _, _, s)| s).collect();
    run_to_completion(&kit.model.llama, &mut refs, CHUNK).unwrap();
    for (name, p, solo, s) in &batch {
        assert_eq!(&s.generated, solo, "{name} prompt {p}: mixed batch differs from alone");
    }
}
