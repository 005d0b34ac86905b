//! The OpenAI-compatible HTTP API against `modserve serve --http-listen 127.0.0.1:0`, with a plain
//! HTTP/1.0 client: the same tokens as gRPC for the same request (base, a LoRA, a saved
//! composition, an inline expression, a Poly route; whole, streamed and chat), OpenAI's error
//! shape and codes, named compositions saved over gRPC and kept across a restart, bearer tokens,
//! health, and per-module metrics.
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::server::{metric, scrape, spawn, wait_serving};
use modserve::pb;
use modserve::pb::adapters_client::AdaptersClient;
use modserve::pb::inference_client::InferenceClient;
use serde_json::{json, Value};
use tonic::Code;

/// One HTTP/1.0 exchange: (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("HTTP API");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, Some(&body), None);
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
}

/// The `data:` payloads of a server-sent-event body.
fn sse(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

const PROMPT: [u32; 8] = [504, 2365, 6354, 16438, 314, 253, 1345, 28];

async fn grpc_text(url: &str, model: &str, prompt: pb::generate_request::Prompt, max_new: u32) -> String {
    let mut c = InferenceClient::connect(url.to_string()).await.unwrap();
    let r = pb::GenerateRequest { prompt: Some(prompt), max_new_tokens: max_new, model: model.into(), ..Default::default() };
    c.generate(r).await.unwrap_or_else(|e| panic!("gRPC {model}: {e}")).into_inner().text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_http_api_matches_grpc_for_every_kind_of_model() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let mut server = spawn(&["--adapter-root", "tests/fixtures/parity", "--http-listen", "127.0.0.1:0", "--state-dir", state_dir]);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let addr = server.http_addr.clone().unwrap();

    let (status, body) = http(&addr, "GET", "/health", None, None);
    assert_eq!((status, body.contains("SERVING")), (200, true), "{body}");

    // A named composition, saved over gRPC.
    let mut admin = AdaptersClient::connect(server.url.clone()).await.unwrap();
    let saved = admin
        .save_composition(pb::SaveCompositionRequest {
            name: "lang_task".into(),
            expression: "sft_lang+sft_task@0.5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((saved.expression.as_str(), saved.missing_modules.len()), ("sft_lang+sft_task@0.5", 0));
    let e = admin
        .save_composition(pb::SaveCompositionRequest { name: "lora_all_r8".into(), expression: "sft_lang".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "a composition may not shadow a module");
    let dangling = admin
        .save_composition(pb::SaveCompositionRequest {
            name: "dangling".into(),
            expression: "lora_all_r8+not_there".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dangling.missing_modules, vec!["not_there".to_string()]);

    // /v1/models lists the base (by name and as `base`), the modules and the compositions.
    let (status, models) = http(&addr, "GET", "/v1/models", None, None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for want in ["SmolLM2-135M-Instruct.Q4_1", "base", "lora_all_r8", "poly_qvup", "lang_task", "dangling"] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    let dangling_entry = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "dangling").unwrap();
    assert_eq!(dangling_entry["modserve"]["missing_modules"], json!(["not_there"]));
    let listed = admin.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(listed.len(), ids.len(), "gRPC ListModels lists what /v1/models lists");

    // The same tokens over HTTP (whole, streamed, chat) as over gRPC, for every kind of model.
    let mut texts = Vec::new();
    for model in ["base", "lora_all_r8", "lang_task", "lora_qv_r4+poly_qvup#task=1", "poly_qvup#task=2"] {
        let want = grpc_text(&server.url, model, pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: PROMPT.to_vec() }), 12).await;
        let (status, body) =
            post(&addr, "/v1/completions", json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2}));
        assert_eq!(status, 200, "{model}: {body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["text"].as_str().unwrap(), want, "{model}: completion text differs from gRPC");
        let lp = &choice["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 12, "{model}: one logprob per token");
        assert_eq!(lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(), want);
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
        assert_eq!(body["usage"]["completion_tokens"], 12);
        assert_eq!(body["usage"]["prompt_tokens"], PROMPT.len());

        let (status, stream) = http(
            &addr,
            "POST",
            "/v1/completions",
            Some(
                &json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
            ),
            None,
        );
        assert_eq!(status, 200);
        let events = sse(&stream);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{model}: {stream}");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(streamed, want, "{model}: streamed text differs from gRPC");
        let usage = chunks.last().unwrap();
        assert_eq!((usage["choices"].as_array().unwrap().len(), usage["usage"]["completion_tokens"].as_u64()), (0, Some(12)));
        assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");

        let question = "What is the capital of France?";
        let want_chat = grpc_text(&server.url, model, pb::generate_request::Prompt::ChatUser(question.into()), 10).await;
        let (status, body) = post(
            &addr,
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 1}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), want_chat, "{model}: chat text differs");
        let n = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(body["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), n, "one logprob per token");
        let lps: Vec<f64> = lp["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        texts.push((want, lps));
    }
    // Every adapter moves the logprobs: a composition silently dropped would fail here (the
    // kit's small adapters rarely change greedy tokens within 12 steps).
    for (i, (_, lps)) in texts.iter().enumerate().skip(1) {
        let moved = lps.iter().zip(&texts[0].1).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-3, "model #{i} gave the base model's logprobs (max difference {moved})");
    }

    // Errors in OpenAI's shape, with the stable code and the HTTP code of the one table.
    for (body, status, code) in [
        (json!({"model": "nope", "prompt": "x"}), 404, "model_not_found"),
        (json!({"model": "dangling", "prompt": "x"}), 404, "unknown_module"),
        (json!({"model": "base", "prompt": "x", "n": 2}), 400, "unsupported_field"),
        (json!({"model": "base", "prompt": "x", "tools": [{"type": "function"}]}), 400, "unsupported_field"),
        (json!({"model": "lora_all_r8+", "prompt": "x"}), 400, "invalid_composition"),
        (json!({"model": "poly_qvup", "prompt": "x"}), 400, "invalid_composition"),
        (json!({"model": "base", "prompt": "x", "max_tokens": 1_000_000}), 400, "limit_exceeded"),
        (json!({"prompt": "x"}), 400, "invalid_argument"),
    ] {
        let (got, err) = post(&addr, "/v1/completions", body.clone());
        assert_eq!(got, status, "{body}: {err}");
        assert_eq!(err["error"]["code"], code, "{body}: {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Per-module and per-composition metrics.
    let text = scrape(&server.metrics_addr);
    assert!(metric(&text, "modserve_module_requests_total", "module=\"lora_all_r8\"").unwrap_or(0.0) >= 3.0, "{text}");
    assert!(metric(&text, "modserve_composition_requests_total", "composition=\"lang_task\"").unwrap_or(0.0) >= 3.0);
    assert!(metric(&text, "modserve_module_generated_tokens_total", "module=\"sft_task\"").unwrap_or(0.0) >= 30.0);

    // Saved compositions survive a restart.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let again = spawn(&["--adapter-root", "tests/fixtures/parity", "--state-dir", state_dir]);
    wait_serving(&again.url, Duration::from_secs(120)).await;
    let mut admin = AdaptersClient::connect(again.url.clone()).await.unwrap();
    let names: Vec<String> = admin
        .list_compositions(pb::ListCompositionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .compositions
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["dangling".to_string(), "lang_task".to_string()]);
    let after = grpc_text(&again.url, "lang_task", pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: PROMPT.to_vec() }), 12).await;
    assert_eq!(after, texts[2].0);
    admin.delete_composition(pb::CompositionRef { name: "dangling".into() }).await.unwrap();
    let e = admin.delete_composition(pb::CompositionRef { name: "dangling".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_needs_the_same_tokens_as_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "inference-token-0001 inference\n").unwrap();
    let server = spawn(&["--http-listen", "127.0.0.1:0", "--auth-tokens-file", tokens.to_str().unwrap()]);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let addr = server.http_addr.clone().unwrap();
    // Probes need no token.
    assert_eq!(http(&addr, "GET", "/health", None, None).0, 200);
    let (status, body) = http(&addr, "GET", "/v1/models", None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":\"unauthenticated\""), "{body}");
    assert_eq!(http(&addr, "GET", "/v1/models", None, Some("wrong-token-wrong-token")).0, 401);
    assert_eq!(http(&addr, "GET", "/v1/models", None, Some("inference-token-0001")).0, 200);
    let req = json!({"model": "base", "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    assert_eq!(http(&addr, "POST", "/v1/completions", Some(&req), Some("inference-token-0001")).0, 200);
    assert_eq!(http(&addr, "POST", "/v1/completions", Some(&req), None).0, 401);
}
