//! Fault tests against a real `modserve serve`: cancellation under load, modules unregistered,
//! evicted, deleted or corrupted while requests use them, a client that stops reading, SIGTERM
//! with streams in flight, and one request's failure in a shared batch step.
//!
//! The tests run one at a time (a file-wide lock): each starts its own server, several measure
//! time or memory, and the machine may have only 2 cores.
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{metric, scrape, spawn, wait_serving, TestServer};
use modserve::pb;
use modserve::pb::adapters_client::AdaptersClient;
use modserve::pb::generate_request::Prompt;
use modserve::pb::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn code_of(s: &tonic::Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn delta(id: &str) -> pb::DeltaRef {
    pb::DeltaRef { module_id: id.into(), scale: 1.0, scale_is_set: true }
}

fn task(t: i64) -> Option<pb::PolyRoute> {
    Some(pb::PolyRoute { inventory_id: "poly_qvup".into(), routing: Some(pb::poly_route::Routing::TaskId(t)) })
}

/// A greedy request of exactly `n` tokens.
fn req(ids: Vec<u32>, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids })), max_new_tokens: n, min_new_tokens: n, ..Default::default() }
}

fn text(t: &str, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: Some(Prompt::Text(t.into())), max_new_tokens: n, min_new_tokens: n, ..Default::default() }
}

/// What a finished stream delivered.
#[derive(Debug)]
struct Done {
    tokens: Vec<u32>,
    finish: String,
    generated: u32,
}

/// Reads a stream to its end; the first error ends it.
async fn drain(mut s: tonic::Streaming<pb::GenerateChunk>, mut tokens: Vec<u32>) -> Result<Done, tonic::Status> {
    let (mut finish, mut generated) = (String::new(), 0);
    while let Some(c) = s.next().await {
        let c = c?;
        tokens.extend(c.token_ids);
        if !c.finish_reason.is_empty() {
            finish = c.finish_reason;
            generated = c.usage.map(|u| u.generated_tokens).unwrap_or(0);
        }
    }
    Ok(Done { tokens, finish, generated })
}

/// Opens a stream and reads its first `k` chunks.
async fn open(c: &mut InferenceClient<Channel>, r: pb::GenerateRequest, k: usize) -> (tonic::Streaming<pb::GenerateChunk>, Vec<u32>) {
    let mut s = c.generate_stream(r).await.expect("stream starts").into_inner();
    let mut got = Vec::new();
    for _ in 0..k {
        let chunk = s.next().await.expect("a chunk").expect("no error");
        got.extend(chunk.token_ids);
    }
    (s, got)
}

/// Polls the metrics endpoint until `name` satisfies `ok` (returns the last value seen).
async fn wait_metric(server: &TestServer, name: &str, ok: impl Fn(f64) -> bool, timeout: Duration) -> Option<f64> {
    let t0 = Instant::now();
    loop {
        let v = metric(&scrape(&server.metrics_addr), name, "");
        if v.is_some_and(&ok) || t0.elapsed() > timeout {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident set of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    common::server::proc_kib(pid, "VmRSS")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A temp adapter root with copies of the named parity fixtures (`(fixture, id)` pairs).
fn temp_root(mods: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, id) in mods {
        copy_dir(&common::fixture("parity").join(fixture), &dir.path().join(id));
    }
    dir
}

async fn clients(server: &TestServer) -> (InferenceClient<Channel>, AdaptersClient<Channel>) {
    wait_serving(&server.url, Duration::from_secs(60)).await;
    (InferenceClient::connect(server.url.clone()).await.unwrap(), AdaptersClient::connect(server.url.clone()).await.unwrap())
}

/// a) 24 concurrent streams over mixed compositions, 7 of them dropped after a few chunks: the
/// other 17 complete with the reference kit's greedy tokens, and the engine ends empty (no
/// running sequence, no KV memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_with_cancellation_frees_everything() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let root = common::fixture("parity");
    let server = spawn(&["--weights", "f32", "--adapter-root", root.to_str().unwrap(), "--max-running", "32"]);
    let (client, _) = clients(&server).await;
    let kit = common::cases();
    let prompts: Vec<Vec<u32>> = kit["prompt_token_ids"].as_array().unwrap().iter().map(ids_of).collect();
    let comps: [(&str, Vec<pb::DeltaRef>, Option<pb::PolyRoute>); 6] = [
        ("base", vec![], None),
        ("lora_qv_r4", vec![delta("lora_qv_r4")], None),
        ("poly_task0", vec![], task(0)),
        ("poly_task1", vec![], task(1)),
        ("poly_task2", vec![], task(2)),
        ("sft_lang", vec![delta("sft_lang")], None),
    ];
    let mut handles = Vec::new();
    for i in 0..24usize {
        let (name, deltas, route) = comps[i % 6].clone();
        let p = (i / 6) % 3;
        let drop_early = matches!(i % 10, 2 | 5 | 8);
        let n = if drop_early { 400 } else { 16 };
        let r = pb::GenerateRequest { deltas, route, request_id: format!("a{i}"), ..req(prompts[p].clone(), n) };
        let want = ids_of(&kit["cases"][name]["greedy"][p]);
        let mut c = client.clone();
        handles.push(tokio::spawn(async move {
            if drop_early {
                let (s, got) = open(&mut c, r, 3).await;
                assert_eq!(got.len(), 3, "{name}/{i}");
                drop(s);
                return None;
            }
            let s = c.generate_stream(r).await.unwrap_or_else(|e| panic!("{name}/{i}: {e}")).into_inner();
            let d = drain(s, vec![]).await.unwrap_or_else(|e| panic!("{name}/{i}: {e}"));
            assert_eq!((d.finish.as_str(), d.generated), ("length", 16), "{name}/{i}");
            assert_eq!(d.tokens, want, "{name} prompt {p} (stream {i}): greedy tokens under load with cancellations");
            Some(i)
        }));
    }
    let mut completed = 0;
    for h in handles {
        completed += h.await.unwrap().is_some() as usize;
    }
    assert_eq!(completed, 17);
    let running = wait_metric(&server, "modserve_running_sequences", |v| v == 0.0, Duration::from_secs(5)).await;
    assert_eq!(running, Some(0.0), "running sequences after the load");
    let kv = wait_metric(&server, "modserve_kv_cache_bytes", |v| v == 0.0, Duration::from_secs(5)).await;
    assert_eq!(kv, Some(0.0), "KV memory after the load");
    let cancelled = metric(&scrape(&server.metrics_addr), "modserve_cancelled_total", "").unwrap_or(0.0);
    assert!(cancelled >= 7.0, "7 streams were dropped, {cancelled} cancellations counted");
    println!("a) {:.1} s", t0.elapsed().as_secs_f64());
}

/// b) One module unregistered and another evicted while long streams use them: the streams
/// finish with every token, equal to solo runs made before (their versions are pinned); new
/// requests for the unregistered id are NOT_FOUND; the evicted one reloads and still agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unregister_and_evict_during_streams_keep_pinned_versions() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let root = temp_root(&[("lora_qv_r4", "lora_qv_r4"), ("sft_lang", "sft_lang")]);
    let server = spawn(&["--weights", "f32", "--adapter-root", root.path().to_str().unwrap()]);
    let (mut c, mut a) = clients(&server).await;
    let prompt = vec![504, 2365, 6354, 16438];
    let r1 = pb::GenerateRequest { deltas: vec![delta("lora_qv_r4")], ..req(prompt.clone(), 48) };
    let r2 = pb::GenerateRequest { deltas: vec![delta("sft_lang")], ..req(prompt.clone(), 48) };
    let solo1 = c.generate(r1.clone()).await.unwrap().into_inner().token_ids;
    let solo2 = c.generate(r2.clone()).await.unwrap().into_inner().token_ids;
    assert_eq!((solo1.len(), solo2.len()), (48, 48));

    let (s1, got1) = open(&mut c, r1.clone(), 1).await;
    let (s2, got2) = open(&mut c, r2.clone(), 1).await;
    a.unregister(pb::ModuleRef { module_id: "lora_qv_r4".into() }).await.unwrap();
    let ev = a.evict(pb::ModuleRef { module_id: "sft_lang".into() }).await.unwrap().into_inner();
    assert_eq!(ev.evicted, 0, "the version in use is pinned: Evict leaves it");
    let e = c.generate(r1.clone()).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::NotFound, "unknown_module"), "{e}");
    let e = c.generate_stream(r1.clone()).await.map(|_| ()).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    let d1 = drain(s1, got1).await.expect("the stream on the unregistered module completes");
    let d2 = drain(s2, got2).await.expect("the stream on the evicted module completes");
    assert_eq!((d1.finish.as_str(), d1.generated), ("length", 48));
    assert_eq!((d2.finish.as_str(), d2.generated), ("length", 48));
    assert_eq!(d1.tokens, solo1, "unregistered mid-stream: tokens equal the solo run");
    assert_eq!(d2.tokens, solo2, "evicted mid-stream: tokens equal the solo run");
    // The evicted module still serves (reloaded) and agrees; the unregistered one stays gone.
    assert_eq!(c.generate(r2).await.unwrap().into_inner().token_ids, solo2);
    assert_eq!(c.generate(r1).await.unwrap_err().code(), Code::NotFound);
    println!("b) {:.1} s", t0.elapsed().as_secs_f64());
}

/// c) A module file deleted and another corrupted after load. What the adapter store (src/adapters/store.rs)
/// guarantees: in-flight requests keep their pinned version and finish; every new lookup
/// re-fingerprints the files, so the next request loads the changed files and gets a clear
/// error (deleted weights: NOT_FOUND adapter_io; garbage: FAILED_PRECONDITION adapter_malformed);
/// other modules keep serving; restoring the file makes the module work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_and_corrupted_files_after_load() {
    let _g = SERIAL.lock().await;
    let t0 = Instant::now();
    let root = temp_root(&[("lora_qv_r4", "del_me"), ("sft_lang", "corrupt_me"), ("lora_qv_r4", "other")]);
    let server = spawn(&["--weights", "f32", "--adapter-root", root.path().to_str().unwrap()]);
    let (mut c, _a) = clients(&server).await;
    let prompt = vec![504, 2365, 6354, 16438];
    let r_del = pb::GenerateRequest { deltas: vec![delta("del_me")], ..req(prompt.clone(), 40) };
    let r_cor = pb::GenerateRequest { deltas: vec![delta("corrupt_me")], ..req(prompt.clone(), 40) };
    let r_other = pb::GenerateRequest { deltas: vec![delta("other")], ..req(prompt.clone(), 8) };
    let solo_del = c.generate(r_del.clone()).await.unwrap().into_inner().token_ids;
    let solo_cor = c.generate(r_cor.clone()).await.unwrap().into_inner().token_ids;

    let (s_del, g_del) = open(&mut c, r_del.clone(), 1).await;
    let (s_cor, g_cor) = open(&mut c, r_cor.clone(), 1).await;
    let weights = root.path().join("del_me/adapter_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let diff = root.path().join("corrupt_me/pytorch_diff.bin");
    let original = std::fs::read(&diff).unwrap();
    std::fs::write(&diff, vec![0x5au8; 4096]).unwrap();

    let e = c.generate(r_del.clone()).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::NotFound, "adapter_io"), "deleted weights: {e}");
    let e = c.generate(r_cor.clone()).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::FailedPrecondition, "adapter_malformed"), "corrupted file: {e}");
    // Other modules and the base keep serving meanwhile.
    assert_eq!(c.generate(r_other.clone()).await.unwrap().into_inner().token_ids.len(), 8);
    assert_eq!(c.generate(req(prompt.clone(), 4)).await.unwrap().into_inner().token_ids.len(), 4);

    let d = drain(s_del, g_del).await.expect("in-flight stream on the deleted module completes");
    assert_eq!(d.tokens, solo_del, "pinned version of the deleted module");
    let d = drain(s_cor, g_cor).await.expect("in-flight stream on the corrupted module completes");
    assert_eq!(d.tokens, solo_cor, "pinned version of the corrupted module");
    // Still refused while broken (nothing half-loaded was cached), then recovers once restored.
    let e = c.generate(r_cor.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    std::fs::write(&diff, &original).unwrap();
    assert_eq!(c.generate(r_cor).await.unwrap().into_inner().token_ids, solo_cor, "restored file serves again");
    // Whole module folder deleted: NOT_FOUND, no crash.
    std::fs::remove_dir_all(root.path().join("del_me")).unwrap();
    let e = c.generate(r_del).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert_eq!(c.generate(r_other).await.unwrap().into_inner().token_ids.len(), 8);
    println!("c) {:.1} s", t0.elapsed().as_secs_f64());
}

/// A channel whose HTTP/2 stream window is 64 bytes: a stream that is not polled stops the
/// server's writes after a few chunks (the default 2 MiB window would let a whole 1500-token
/// answer pile up client-side, and the server would never see a slow reader).
async fn tiny_window_client(url: &str) -> InferenceClient<Channel> {
    let ch =
        tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().initial_stream_window_size(Some(64)).connect().await.unwrap();
    InferenceClient::new(ch)
}

/// Starts the slow-client server, warms the allocator with a stream of the same size, and
/// returns (server, normal client, RSS baseline in KiB).
async fn slow_client_server() -> (TestServer, InferenceClient<Channel>, u64) {
    let server = spawn(&["--stream-buffer", "4", "--slow-client-timeout", "2"]);
    let (mut c, _) = clients(&server).await;
    // Same KV capacity as the slow stream, read a little then cancelled.
    let (s, _) = open(&mut c, text("Tell me a very long story about the sea.", 1500), 5).await;
    drop(s);
    assert_eq!(wait_metric(&server, "modserve_running_sequences", |v| v == 0.0, Duration::from_secs(5)).await, Some(0.0));
    let rss0 = rss_kib(server.child.id());
    (server, c, rss0)
}

/// d) A client that never reads a 1500-token stream: after the 2 s slow-client timeout the
/// server drops it (counter, running 0, KV 0), and its memory did not grow meanwhile beyond the
/// sequence's KV cache, which is allocated whole at admission (measured from there on).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_client_is_dropped_without_growing_memory() {
    let _g = SERIAL.lock().await;
    let (server, mut c, rss_idle) = slow_client_server().await;
    let mut slow_client = tiny_window_client(&server.url).await;
    let t0 = Instant::now();
    let slow = slow_client.generate_stream(text("Tell me a very long story about the sea.", 1500)).await.unwrap().into_inner();
    // Baseline once the sequence is admitted (its KV cache allocated).
    let admitted = wait_metric(&server, "modserve_kv_cache_bytes", |v| v > 0.0, Duration::from_secs(10)).await;
    assert!(admitted.unwrap_or(0.0) > 0.0, "the slow stream was never admitted");
    let rss0 = rss_kib(server.child.id());
    let mut rss_max = rss0;
    let mut drops = 0.0;
    while t0.elapsed() < Duration::from_secs(30) {
        rss_max = rss_max.max(rss_kib(server.child.id()));
        drops = metric(&scrape(&server.metrics_addr), "modserve_slow_client_drops_total", "").unwrap_or(0.0);
        if drops >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = t0.elapsed();
    let generated = metric(&scrape(&server.metrics_addr), "modserve_generated_tokens_total", "").unwrap_or(0.0);
    println!(
        "d) dropped after {after:?} ({generated} tokens generated in all); RSS idle {rss_idle} KiB, admitted {rss0} KiB, max {rss_max} KiB (KV {:.0} KiB)",
        admitted.unwrap_or(0.0) / 1024.0
    );
    assert!(drops >= 1.0, "the unread stream was not dropped within 30 s");
    assert!(after >= Duration::from_secs(2), "dropped before the 2 s timeout ({after:?})");
    let running = wait_metric(&server, "modserve_running_sequences", |v| v == 0.0, Duration::from_secs(3)).await;
    assert_eq!(running, Some(0.0), "running sequences after the drop");
    let kv = wait_metric(&server, "modserve_kv_cache_bytes", |v| v == 0.0, Duration::from_secs(3)).await;
    assert_eq!(kv, Some(0.0), "KV memory after the drop");
    assert!(rss_max <= rss0 + 8 * 1024, "RSS grew by {} KiB while the client did not read", rss_max - rss0);
    // The server keeps serving others.
    assert_eq!(c.generate(text("Hello", 4)).await.unwrap().into_inner().token_ids.len(), 4);
    drop(slow);
}

/// d') The dropped slow client, when it finally reads, must learn that its answer was cut:
/// the stream ends with ABORTED / `slow_client` (EngineError::SlowClient), not with a status OK
/// after a truncated answer that has no finish_reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_slow_client_sees_aborted_when_it_reads() {
    let _g = SERIAL.lock().await;
    let (server, _c, _) = slow_client_server().await;
    let mut slow_client = tiny_window_client(&server.url).await;
    let slow = slow_client.generate_stream(text("Tell me a very long story about the sea.", 1500)).await.unwrap().into_inner();
    let drops = wait_metric(&server, "modserve_slow_client_drops_total", |v| v >= 1.0, Duration::from_secs(30)).await;
    assert!(drops.unwrap_or(0.0) >= 1.0, "the unread stream was not dropped");
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(10), drain(slow, vec![])).await.expect("the stream ends");
    println!("d') read after the drop in {:?}: {:?}", t0.elapsed(), out.as_ref().map(|d| (d.tokens.len(), d.finish.clone())));
    match out {
        Err(e) => assert_eq!((e.code(), code_of(&e).as_str()), (Code::Aborted, "slow_client"), "{e}"),
        Ok(d) => panic!(
            "the dropped stream ended with status OK after {} tokens and finish_reason {:?}: the client cannot tell it was cut",
            d.tokens.len(),
            d.finish
        ),
    }
}

/// d'') A terminal error reaches a stream whose buffer is full: a client that does not read
/// (64-byte window, 4-chunk buffer, no slow-client drop for 60 s) past its request's deadline
/// (grpc-timeout 3 s, which tonic's client only sends, never enforces) reads, afterwards, the
/// buffered tokens and then the server's DEADLINE_EXCEEDED with its stable code, not ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminal_error_reaches_a_full_stream_buffer() {
    let _g = SERIAL.lock().await;
    let server = spawn(&["--stream-buffer", "4", "--slow-client-timeout", "60"]);
    let _ = clients(&server).await;
    let mut slow_client = tiny_window_client(&server.url).await;
    let mut r = tonic::Request::new(text("Tell me a very long story about the sea.", 1500));
    r.set_timeout(Duration::from_secs(3));
    let slow = slow_client.generate_stream(r).await.unwrap().into_inner();
    // The deadline passes while the buffer is full: the sequence stops and frees its KV memory
    // (it stays only to deliver its error).
    let admitted = wait_metric(&server, "modserve_kv_cache_bytes", |v| v > 0.0, Duration::from_secs(10)).await;
    assert!(admitted.unwrap_or(0.0) > 0.0, "the stream was never admitted");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kv = wait_metric(&server, "modserve_kv_cache_bytes", |v| v == 0.0, Duration::from_secs(5)).await;
    assert_eq!(kv, Some(0.0), "the sequence kept its KV memory past its deadline");
    let expired = metric(&scrape(&server.metrics_addr), "modserve_deadline_exceeded_total", "").unwrap_or(0.0);
    assert!(expired >= 1.0, "no deadline counted");
    let out = tokio::time::timeout(Duration::from_secs(10), drain(slow, vec![])).await.expect("the stream ends");
    match out {
        Err(e) => {
            assert_eq!((e.code(), code_of(&e).as_str()), (Code::DeadlineExceeded, "deadline_exceeded"), "{e}");
        }
        Ok(d) => panic!("the stream ended OK after {} tokens ({:?}) past its deadline", d.tokens.len(), d.finish),
    }
}

/// g) A burst of requests that each need a different cold module, against one load slot and no
/// room to wait: the server never loads more than that at once, and the requests it cannot take
/// get RESOURCE_EXHAUSTED `adapter_load_busy` at once, while the others complete; once the burst
/// is over every module loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_cold_loads_is_bounded_by_the_load_gate() {
    let _g = SERIAL.lock().await;
    let ids: Vec<String> = (0..24).map(|i| format!("lora_{i:02}")).collect();
    let mods: Vec<(&str, &str)> = ids.iter().map(|id| ("lora_all_r8", id.as_str())).collect();
    let root = temp_root(&mods);
    let server = spawn(&["--adapter-root", root.path().to_str().unwrap(), "--max-concurrent-loads", "1", "--max-waiting-loads", "0"]);
    let (c, _) = clients(&server).await;
    let mut tasks = Vec::new();
    for id in &ids {
        let mut c = c.clone();
        let r = pb::GenerateRequest { deltas: vec![delta(id)], ..text("Hello", 2) };
        tasks.push(tokio::spawn(async move { c.generate(r).await.map(|_| ()) }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!((e.code(), code_of(&e).as_str()), (Code::ResourceExhausted, "adapter_load_busy"), "{e}");
                busy += 1;
            }
        }
    }
    println!("g) 24 cold modules at once, 1 load slot, no waiting room: {ok} served, {busy} busy");
    assert!(ok >= 1 && busy >= 1, "{ok} served, {busy} busy: the gate did not act");
    // Afterwards, one at a time, every module loads.
    let mut c = c.clone();
    for id in &ids {
        let r = pb::GenerateRequest { deltas: vec![delta(id)], ..text("Hello", 2) };
        c.generate(r).await.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

/// e) SIGTERM with 8 streams in flight: all 8 finish completely, new requests are UNAVAILABLE,
/// and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_drains_all_streams() {
    let _g = SERIAL.lock().await;
    let mut server = spawn(&["--drain-timeout", "60"]);
    let (c, _) = clients(&server).await;
    let mut streams = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        streams.push(open(&mut c, text(&format!("Story number {i}: once upon a time"), 60), 1).await);
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c.clone().generate(text("Hello", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "new work while draining: {e}");
    let handles: Vec<_> = streams.into_iter().map(|(s, got)| tokio::spawn(drain(s, got))).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let d = h.await.unwrap().unwrap_or_else(|e| panic!("stream {i} during drain: {e}"));
        assert_eq!((d.tokens.len(), d.finish.as_str(), d.generated), (60, "length", 60), "stream {i}");
    }
    let status = common::server::wait_exit(&mut server, Duration::from_secs(30), "no exit after draining").await;
    assert_eq!(status.code(), Some(0));
}

/// f) One request that fails inside a shared batch step (the debug-build fault hook makes the
/// sequences whose prompt holds token 9999 fail after their step, as a sampling failure would)
/// must fail alone, with INTERNAL: its batch neighbour, already streaming, completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_failing_request_does_not_abort_its_batch_neighbours() {
    let _g = SERIAL.lock().await;
    let server = common::server::spawn_with_env(&[], &[("MODSERVE_FAULT_INJECT", "seq_fail:9999")], std::process::Stdio::inherit());
    let (mut c, _) = clients(&server).await;
    let (s, got) = open(&mut c, text("Once upon a time", 80), 1).await;
    let poisoned = c.generate(req(vec![9999, 504], 8)).await;
    let neighbour = drain(s, got).await;
    let d = neighbour.unwrap_or_else(|e| panic!("the neighbour stream was aborted by another request's failure: {e}"));
    assert_eq!((d.tokens.len(), d.finish.as_str()), (80, "length"));
    let e = poisoned.expect_err("the poisoned request must fail");
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::Internal, "internal"), "{e}");
}

/// g) Cache bookkeeping around evictions: the cache gauges follow an explicit Evict, and a
/// module evicted (or unregistered) while pinned leaves the cache once its requests finish
/// (proto: "versions pinned by in-flight requests stay until they finish").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evictions_update_metrics_and_pinned_evictions_complete_later() {
    let _g = SERIAL.lock().await;
    let root = temp_root(&[("lora_qv_r4", "lora_qv_r4"), ("sft_lang", "sft_lang")]);
    let server = spawn(&["--adapter-root", root.path().to_str().unwrap()]);
    let (mut c, mut a) = clients(&server).await;
    let m = |id: &str| pb::ModuleRef { module_id: id.into() };
    a.preload(m("lora_qv_r4")).await.unwrap();
    let e0 = metric(&scrape(&server.metrics_addr), "modserve_adapter_cache_entries", "");
    assert_eq!(e0, Some(1.0));
    assert_eq!(a.evict(m("lora_qv_r4")).await.unwrap().into_inner().evicted, 1);
    let listed = a.list(pb::ListRequest {}).await.unwrap().into_inner().modules;
    assert!(listed.iter().all(|x| !x.resident), "nothing is resident after the eviction: {listed:?}");
    let mut problems = Vec::new();
    let text = scrape(&server.metrics_addr);
    let entries = metric(&text, "modserve_adapter_cache_entries", "");
    let bytes = metric(&text, "modserve_adapter_cache_bytes", "");
    println!("g) after evicting the only resident module: entries {entries:?}, bytes {bytes:?}");
    if (entries, bytes) != (Some(0.0), Some(0.0)) {
        problems.push(format!("cache gauges after evicting the only resident module: entries {entries:?}, bytes {bytes:?} (want 0, 0)"));
    }

    // Evict / unregister while pinned: once the streams finish, nothing of theirs stays resident.
    let prompt = vec![504, 2365, 6354, 16438];
    let (s1, g1) = open(&mut c, pb::GenerateRequest { deltas: vec![delta("sft_lang")], ..req(prompt.clone(), 24) }, 1).await;
    let (s2, g2) = open(&mut c, pb::GenerateRequest { deltas: vec![delta("lora_qv_r4")], ..req(prompt.clone(), 24) }, 1).await;
    assert_eq!(a.evict(m("sft_lang")).await.unwrap().into_inner().evicted, 0, "pinned");
    a.unregister(m("lora_qv_r4")).await.unwrap();
    drain(s1, g1).await.unwrap();
    drain(s2, g2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = a.list(pb::ListRequest {}).await.unwrap().into_inner().modules;
    let sft = listed.iter().find(|x| x.module_id == "sft_lang").unwrap();
    if sft.resident {
        problems.push("sft_lang was evicted while pinned and is still resident after its request finished".to_string());
    }
    // A fresh insert (a new id, so no cache hit) publishes the true entry count, and gives the
    // cache every chance to sweep what is no longer pinned.
    a.register(pb::RegisterRequest { module_id: "probe".into(), path: "lora_qv_r4".into() }).await.unwrap();
    a.preload(m("probe")).await.unwrap();
    let entries = metric(&scrape(&server.metrics_addr), "modserve_adapter_cache_entries", "");
    println!("g) cache entries after the pinned streams finished and a fresh preload: {entries:?} (want 1)");
    if entries != Some(1.0) {
        problems.push(format!(
            "after the pinned streams finished, a fresh preload shows {entries:?} cache entries (want 1: the evicted sft_lang and the unregistered lora_qv_r4 versions must be gone)"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
