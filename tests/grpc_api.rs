//! The gRPC API through a real tonic client against `modserve serve` on 127.0.0.1:0: health turning
//! SERVING, the reference kit reproduced over unary and streaming calls with every composition in
//! flight at once, errors and their codes, cancellation, queue overflow, deadlines, metrics.
mod common;

use std::time::Duration;

use common::server::{metric, scrape, spawn, wait_serving};
use modserve::pb;
use modserve::pb::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::Code;

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn delta(id: &str, scale: f32) -> pb::DeltaRef {
    pb::DeltaRef { module_id: id.into(), scale, scale_is_set: true }
}

/// The kit's compositions as gRPC fields.
fn composition(case: &str) -> (Vec<pb::DeltaRef>, Option<pb::PolyRoute>) {
    let route = |t: i64| Some(pb::PolyRoute { inventory_id: "poly_qvup".into(), routing: Some(pb::poly_route::Routing::TaskId(t)) });
    match case {
        "base" => (vec![], None),
        "lora_qv_r4" | "lora_all_r8" | "lora_all_r4_rslora" | "sft_lang" | "ewr" => (vec![delta(case, 1.0)], None),
        "compose_qv1_all05" => (vec![delta("lora_qv_r4", 1.0), delta("lora_all_r8", 0.5)], None),
        "poly_task0" => (vec![], route(0)),
        "poly_task1" => (vec![], route(1)),
        "poly_task2" => (vec![], route(2)),
        "sft_lang_task" => (vec![delta("sft_lang", 1.0), delta("sft_task", 1.0)], None),
        "sft_lang_task_lora_qv" => (vec![delta("sft_lang", 1.0), delta("sft_task", 1.0), delta("lora_qv_r4", 1.0)], None),
        "task_arithmetic" => (vec![delta("expert", 1.0), delta("anti_expert", -1.0)], None),
        other => panic!("no mapping for {other}"),
    }
}

fn request(ids: Vec<u32>, case: &str, max_new: u32) -> pb::GenerateRequest {
    let (deltas, route) = composition(case);
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_new_tokens: max_new,
        min_new_tokens: max_new,
        top_logprobs: 5,
        deltas,
        route,
        request_id: case.to_string(),
        ..Default::default()
    }
}

fn code_of(s: &tonic::Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kit_over_grpc_streaming_and_unary_with_all_compositions_in_flight() {
    let server = spawn(&[
        "--weights",
        "f32",
        "--adapter-root",
        common::fixture("parity").to_str().unwrap(),
        "--max-running",
        "64",
        "--max-batch-tokens",
        "256",
        "--prefill-chunk",
        "16",
    ]);
    let seen = wait_serving(&server.url, Duration::from_secs(120)).await;
    assert_eq!(*seen.last().unwrap(), 1, "SERVING");
    let mut client = InferenceClient::connect(server.url.clone()).await.unwrap();
    let mut admin = pb::adapters_client::AdaptersClient::connect(server.url.clone()).await.unwrap();
    // Folders at the root's top level are registered at start; files inside folders by request.
    let listed: Vec<String> = admin.list(pb::ListRequest {}).await.unwrap().into_inner().modules.into_iter().map(|m| m.module_id).collect();
    for id in ["lora_qv_r4", "lora_all_r8", "poly_qvup", "sft_lang", "sft_task", "ewr"] {
        assert!(listed.contains(&id.to_string()), "{id} not listed: {listed:?}");
    }
    admin.register(pb::RegisterRequest { module_id: "expert".into(), path: "ewr/expert_task_vector.safetensors".into() }).await.unwrap();
    admin
        .register(pb::RegisterRequest { module_id: "anti_expert".into(), path: "ewr/anti_expert_task_vector.safetensors".into() })
        .await
        .unwrap();
    let info = admin.describe(pb::ModuleRef { module_id: "lora_all_r8".into() }).await.unwrap().into_inner();
    assert_eq!((info.kind.as_str(), info.rank, info.targets.len()), ("lora", 8, 210));
    assert!(!info.version.is_empty() && info.bytes > 0);
    // One resident copy of the factors: no more than the f32 file's bytes.
    assert!(info.bytes <= info.file_bytes, "resident {} B > file {} B", info.bytes, info.file_bytes);

    let cases = common::cases();
    let prompts: Vec<Vec<u32>> = cases["prompt_token_ids"].as_array().unwrap().iter().map(ids_of).collect();
    let tokenizer = {
        let mut f = std::fs::File::open(common::reference_model()).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        std::sync::Arc::new(modserve::model::tokenizer::tokenizer_from_gguf(&content).unwrap())
    };
    // Every (case, prompt) as a concurrent stream: 39 sequences, 13 compositions, one engine.
    let mut tasks = Vec::new();
    for (name, case) in cases["cases"].as_object().unwrap() {
        for (p, ids) in prompts.iter().enumerate() {
            let mut c = client.clone();
            let req = request(ids.clone(), name, 16);
            let want = ids_of(&case["greedy"][p]);
            let top1 = case["top5_ids"][p][0].as_u64().unwrap() as u32;
            let name = name.clone();
            let tokenizer = tokenizer.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = c.generate_stream(req).await.unwrap_or_else(|e| panic!("{name}: {e}")).into_inner();
                let (mut got, mut text, mut finish, mut first_top) = (Vec::new(), String::new(), None, None);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.unwrap_or_else(|e| panic!("{name}: {e}"));
                    if first_top.is_none() {
                        first_top = chunk.top_logprobs.first().map(|t| t.entries[0].id);
                    }
                    got.extend(chunk.token_ids);
                    text.push_str(&chunk.text);
                    if !chunk.finish_reason.is_empty() {
                        finish = Some((chunk.finish_reason, chunk.usage.unwrap().generated_tokens));
                    }
                }
                assert_eq!(got, want, "{name} prompt {p}: streamed greedy tokens");
                assert_eq!(first_top, Some(top1), "{name} prompt {p}: top-1 of the first step");
                assert_eq!(finish, Some(("length".to_string(), 16)), "{name} prompt {p}");
                // Streamed UTF-8-safe deltas add up to the full decode of the tokens.
                assert_eq!(text, tokenizer.decode(&got, true).unwrap(), "{name} prompt {p}: streamed text");
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Unary, two compositions.
    for name in ["sft_lang_task_lora_qv", "poly_task2"] {
        let r = client.generate(request(prompts[1].clone(), name, 16)).await.unwrap().into_inner();
        assert_eq!(r.token_ids, ids_of(&cases["cases"][name]["greedy"][1]), "{name}: unary");
        assert_eq!(r.usage.unwrap().prompt_tokens as usize, prompts[1].len());
        assert_eq!(r.top_logprobs.len(), 16);
    }
    // Chat prompt through the template: the model answers about Paris.
    let r = client
        .generate(pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::ChatUser("What is the capital of France?".into())),
            max_new_tokens: 12,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.text.contains("Paris"), "{}", r.text);

    // Errors with codes.
    let mut bad = request(prompts[0].clone(), "base", 4);
    bad.deltas = vec![delta("no_such_module", 1.0)];
    let e = client.generate(bad).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::NotFound, "unknown_module"));
    let mut bad = request(prompts[0].clone(), "poly_task0", 4);
    bad.route = Some(pb::PolyRoute { inventory_id: "poly_qvup".into(), routing: Some(pb::poly_route::Routing::TaskId(7)) });
    let e = client.generate(bad).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::NotFound, "unknown_task"));
    let mut bad = request(prompts[0].clone(), "base", 4);
    bad.temperature = -1.0;
    assert_eq!(client.generate(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let mut bad = request(vec![49152], "base", 4);
    bad.min_new_tokens = 0;
    assert_eq!(client.generate(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let e = admin.register(pb::RegisterRequest { module_id: "x".into(), path: "../parity".into() }).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::InvalidArgument, "adapter_path"));

    // Metrics moved.
    let text = scrape(&server.metrics_addr);
    assert!(metric(&text, "modserve_generated_tokens_total", "").unwrap_or(0.0) >= 39.0 * 16.0, "{text}");
    assert!(metric(&text, "modserve_requests_total", "code=\"ok\"").unwrap_or(0.0) >= 41.0);
    assert!(metric(&text, "modserve_adapter_cache_misses_total", "").unwrap_or(0.0) >= 1.0);
    assert!(text.contains("modserve_ttft_seconds_bucket"), "histograms have explicit buckets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_cancellation_and_deadlines() {
    let server = spawn(&["--max-running", "1", "--max-queued", "1"]);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let mut client = InferenceClient::connect(server.url.clone()).await.unwrap();
    let long = |n: u32| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("Once upon a time".into())),
        max_new_tokens: n,
        min_new_tokens: n,
        ..Default::default()
    };
    // A occupies the only running slot, B the only queue slot: C is refused at once.
    let mut a = client.generate_stream(long(2000)).await.unwrap().into_inner();
    a.next().await.unwrap().unwrap();
    let b = client.generate_stream(long(2000)).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = client.generate(long(4)).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::ResourceExhausted, "queue_full"));
    // Cancelling both frees the slot and the queue: a new request completes.
    drop(a);
    drop(b);
    let t0 = std::time::Instant::now();
    // The engine notices the cancellations at its next step; B may still hold the queue slot for
    // that long, so a client retries RESOURCE_EXHAUSTED briefly.
    let r = loop {
        match client.generate(long(4)).await {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::ResourceExhausted && t0.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(r.token_ids.len(), 4);
    assert!(t0.elapsed() < Duration::from_secs(30));
    let text = scrape(&server.metrics_addr);
    assert!(metric(&text, "modserve_cancelled_total", "").unwrap_or(0.0) >= 1.0, "{text}");
    // The engine retires a finished sequence at its next loop turn: poll briefly.
    let t1 = std::time::Instant::now();
    while metric(&scrape(&server.metrics_addr), "modserve_running_sequences", "") != Some(0.0) {
        assert!(t1.elapsed() < Duration::from_secs(5), "running sequences did not return to 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Deadline (grpc-timeout) enforced by the engine, also for streams.
    let mut req = tonic::Request::new(long(2000));
    req.set_timeout(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let mut s = client.generate_stream(req).await.unwrap().into_inner();
    let e = common::server::first_error(&mut s).await.expect("the stream must end with an error");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let t1 = std::time::Instant::now();
    loop {
        let text = scrape(&server.metrics_addr);
        let freed =
            metric(&text, "modserve_running_sequences", "") == Some(0.0) && metric(&text, "modserve_kv_cache_bytes", "") == Some(0.0);
        if freed {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "slot and KV memory not freed after the deadline: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A storm of concurrent requests that fail fast (unknown module) against a server logging at
/// debug level: every request must end with NOT_FOUND and the server must not panic. A tracing
/// span guard held across the request's await once made tracing-subscriber panic ("tried to
/// clone a span that already closed") about once per 20,000 such requests, and the client saw
/// CANCELLED; this sends about 100,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_storm_leaves_no_panic_in_the_server_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let root = dir.path().join("adapters");
    std::fs::create_dir(&root).unwrap();
    let server = common::server::spawn_logging(&["--adapter-root", root.to_str().unwrap()], Some("debug"), log);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let mut tasks = Vec::new();
    for w in 0..32 {
        let url = server.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = InferenceClient::connect(url).await.unwrap();
            let mut codes = std::collections::BTreeMap::new();
            for i in 0..3000 {
                let req = pb::GenerateRequest {
                    prompt: Some(pb::generate_request::Prompt::Text("hi".into())),
                    max_new_tokens: 2,
                    deltas: vec![delta(&format!("missing_{w}_{i}"), 1.0)],
                    ..Default::default()
                };
                let code = match client.generate_stream(req).await {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        let mut code = Code::Ok;
                        while let Some(c) = s.next().await {
                            if let Err(e) = c {
                                code = e.code();
                            }
                        }
                        code
                    }
                    Err(e) => e.code(),
                };
                *codes.entry(format!("{code:?}")).or_insert(0usize) += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::new();
    for t in tasks {
        for (c, n) in t.await.unwrap() {
            *codes.entry(c).or_insert(0usize) += n;
        }
    }
    drop(server);
    let text = std::fs::read_to_string(&log_path).unwrap();
    if let Some(at) = text.find("panicked") {
        let tail: String = text[at..].chars().take(1500).collect();
        panic!("the server panicked (client codes {codes:?}): {tail}");
    }
    assert_eq!(codes.keys().collect::<Vec<_>>(), vec!["NotFound"], "{codes:?}");
}
