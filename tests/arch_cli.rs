//! The command line and the server on every family of the architecture kit: `modserve generate
//! --model DIR|FILE.gguf` (base and the kit LoRA, float32) reproduces the kit's greedy tokens, the
//! default (quantized) mode and the chat template run, and `modserve serve` answers Generate over
//! gRPC with the same tokens for an HF folder and a GGUF file.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::arch::{cases, dir, ids_of, prompts, FAMILIES, GGUF_FAMILIES};
use modserve::pb;
use modserve::pb::inference_client::InferenceClient;

fn generate(model: &Path, family: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
        .args(["generate", "--threads", "2", "--device", &common::test_device_flag(), "--model"])
        .arg(model)
        .arg("--adapter-root")
        .arg(dir(family))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_reproduces_the_kit_on_every_family_from_folders_and_gguf() {
    let cases = cases();
    let prompts = prompts(&cases);
    let ids: String = prompts[1].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut models: Vec<(&str, std::path::PathBuf)> = FAMILIES.iter().map(|f| (*f, dir(f).join("model"))).collect();
    models.extend(GGUF_FAMILIES.iter().map(|f| (*f, dir(f).join("model.gguf"))));
    for (family, model) in models {
        for (case, extra) in [("base", vec![]), ("lora", vec!["--delta", "lora"])] {
            let mut args = vec!["--weights", "f32", "--json", "--max-new-tokens", "16", "--min-new-tokens", "16", "--prompt-ids", &ids];
            args.extend(extra);
            let out = generate(&model, family, &args);
            let what = format!("{} {case}", model.display());
            assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(ids_of(&v["token_ids"]), ids_of(&cases["archs"][family]["cases"][case]["greedy"][1]), "{what}");
        }
        // Default weights (quantized), text in through the model's chat template and tokenizer.
        let out = generate(&model, family, &["--chat", "Hello there", "--max-new-tokens", "6", "--min-new-tokens", "6", "--json"]);
        assert!(out.status.success(), "{} chat: {}", model.display(), String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["token_ids"].as_array().unwrap().len(), 6, "{} chat", model.display());
        // The chat template put SmolLM2's role markers around the message.
        let prompt_ids = ids_of(&v["prompt_ids"]);
        assert!(
            prompt_ids.len() > 10 && prompt_ids.contains(&1) && prompt_ids.contains(&2),
            "{} chat prompt {prompt_ids:?}",
            model.display()
        );
    }
}

#[test]
fn unsupported_families_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type":"gpt_neox","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
        .args(["generate", "--prompt-ids", "1", "--model"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpt_neox") && err.contains("gemma3") && err.contains("phi3"), "{err}");
}

#[tokio::test]
async fn serve_answers_on_an_hf_folder_and_a_gguf_file() {
    let cases = cases();
    let prompts = prompts(&cases);
    for (family, model) in [("gemma2", dir("gemma2").join("model")), ("phi3", dir("phi3").join("model.gguf"))] {
        let root = dir(family);
        let server =
            common::server::spawn_model(&model, &["--weights", "f32", "--adapter-root", root.to_str().unwrap()], &[], Stdio::null());
        common::server::wait_serving(&server.url, Duration::from_secs(60)).await;
        let mut client = InferenceClient::connect(server.url.clone()).await.unwrap();
        for (case, deltas) in [("base", vec![]), ("lora", vec![pb::DeltaRef { module_id: "lora".into(), scale: 1.0, scale_is_set: true }])]
        {
            for (p, ids) in prompts.iter().enumerate() {
                let r = client
                    .generate(pb::GenerateRequest {
                        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() })),
                        max_new_tokens: 16,
                        min_new_tokens: 16,
                        deltas: deltas.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{family} {case} prompt {p}: {e}"))
                    .into_inner();
                assert_eq!(r.token_ids, ids_of(&cases["archs"][family]["cases"][case]["greedy"][p]), "{family} {case} prompt {p}");
            }
        }
    }
}
