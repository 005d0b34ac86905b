//! KV-memory admission (`--max-kv-bytes`): sixteen requests of 400 prompt + 48 new tokens (20 MB
//! of KV each in f32, 10 in f16) against a budget that holds four of them. None fails that could wait, all finish,
//! the KV memory of the running set never exceeds the budget, the server's resident memory stays
//! under its warmed-up level + the budget + a fixed overhead (without admission the sixteen would
//! need 330 MB), and a request that alone needs more than the budget is RESOURCE_EXHAUSTED naming
//! the limit.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::server::{metric, proc_kib, scrape, spawn, wait_serving};
use modserve::pb;
use modserve::pb::generate_request::Prompt;
use modserve::pb::inference_client::InferenceClient;
use tonic::Code;

/// KV bytes per position of the reference model (SmolLM2-135M: 30 layers, 3 KV heads of 64, keys
/// and values), as the server holds them: f16 for its int8 base where the CPU runs the int8
/// kernels (`Llama::half_kv`), else f32.
fn bytes_per_position() -> usize {
    2 * 30 * 3 * 64 * if modserve::kernels::int8_available() { 2 } else { 4 }
}
const PROMPT: usize = 400;
const NEW: u32 = 48;
/// Resident memory allowed above the warmed-up level beyond the KV budget: prefill scratch of
/// four sequences, allocator slack, thread stacks.
const FIXED_OVERHEAD_KIB: u64 = 64 * 1024;

/// A prompt of `PROMPT` ordinary token ids, different per request.
fn prompt(i: u32) -> Vec<u32> {
    (0..PROMPT as u32).map(|k| 300 + (k * 37 + i * 101) % 40_000).collect()
}

fn req(ids: Vec<u32>, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids })), max_new_tokens: n, min_new_tokens: n, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_wait_for_kv_memory_and_all_finish_within_the_budget() {
    let per_request = (PROMPT + NEW as usize) * bytes_per_position();
    let budget = 4 * per_request;
    let server = spawn(&["--max-kv-bytes", &budget.to_string(), "--max-running", "64"]);
    wait_serving(&server.url, Duration::from_secs(60)).await;
    let mut c = InferenceClient::connect(server.url.clone()).await.unwrap();
    // Warm up with one request of the same size, so lazily built state (scratch, thread pools)
    // is in the baseline.
    c.generate(req(prompt(99), NEW)).await.expect("warm-up");
    let pid = server.child.id();
    let rss_warm = proc_kib(pid, "VmRSS");

    // Watch the engine's KV gauge and running count while the load runs.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, addr) = (stop.clone(), server.metrics_addr.clone());
        let mut max_rss = rss_warm;
        std::thread::spawn(move || {
            let (mut max_kv, mut max_running, mut samples) = (0f64, 0f64, 0);
            while !stop.load(Ordering::Relaxed) {
                let text = scrape(&addr);
                max_rss = max_rss.max(proc_kib(pid, "VmRSS"));
                max_kv = max_kv.max(metric(&text, "modserve_kv_cache_bytes", "").unwrap_or(0.0));
                max_running = max_running.max(metric(&text, "modserve_running_sequences", "").unwrap_or(0.0));
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (max_kv, max_running, samples, max_rss)
        })
    };
    let mut joins = Vec::new();
    for i in 0..16u32 {
        let mut c = c.clone();
        joins.push(tokio::spawn(async move { c.generate(req(prompt(i), NEW)).await }));
    }
    for (i, j) in joins.into_iter().enumerate() {
        let r = j.await.unwrap().unwrap_or_else(|e| panic!("request {i} failed instead of waiting for KV memory: {e}")).into_inner();
        assert_eq!((r.token_ids.len(), r.finish_reason.as_str()), (NEW as usize, "length"), "request {i}");
    }
    stop.store(true, Ordering::Relaxed);
    let (max_kv, max_running, samples, max_rss) = watcher.join().unwrap();
    let rss_bound = rss_warm + budget as u64 / 1024 + FIXED_OVERHEAD_KIB;
    println!(
        "KV budget {budget} bytes: peak KV gauge {max_kv}, peak running {max_running} ({samples} samples); \
         RSS warmed up {rss_warm} KiB, peak {max_rss} KiB (+{} KiB), bound {rss_bound} KiB",
        max_rss.saturating_sub(rss_warm)
    );
    assert!(samples > 10, "too few metric samples ({samples})");
    assert!(max_kv <= budget as f64, "the KV memory of the running set reached {max_kv} > budget {budget}");
    assert!(max_running <= 4.0, "{max_running} sequences ran at once; the budget holds 4");
    assert!(max_running >= 2.0, "the budget holds 4 sequences; only {max_running} ran at once");
    assert!(max_rss <= rss_bound, "resident memory peaked at {max_rss} KiB > warmed-up {rss_warm} + budget + {FIXED_OVERHEAD_KIB} KiB");

    // One request needing more than the whole budget is refused at once, naming the limit.
    let mut c2 = c.clone();
    let e = c2.generate(req(vec![504, 2365], 2000)).await.expect_err("a request larger than the budget");
    let code = e.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!((e.code(), code.as_str()), (Code::ResourceExhausted, "kv_budget_exceeded"), "{e}");
    assert!(e.message().contains("--max-kv-bytes"), "{}", e.message());
    // ...and the server still serves.
    let r = c2.generate(req(vec![504, 2365], 8)).await.expect("after the refusal").into_inner();
    assert_eq!(r.token_ids.len(), 8);
}
