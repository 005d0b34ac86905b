//! Failure containment, with the debug-build fault hook `MODSERVE_FAULT_INJECT`:
//! - a panic inside a batch step fails only that step's requests (INTERNAL, code `internal`), and
//!   the engine goes on serving;
//! - a panic that kills the engine thread ends every in-flight request with UNAVAILABLE (code
//!   `engine_stopped`), turns health NOT_SERVING and makes the process exit non-zero (70), so an
//!   orchestrator restarts it.
//!
//! The two tests run one at a time (each starts its own server; the machine may have 2 cores).
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::server::{first_error, spawn_with_env, wait_exit, wait_serving};
use modserve::pb;
use modserve::pb::generate_request::Prompt;
use modserve::pb::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A token id the fault hook watches for (a valid id of the reference vocabulary).
const POISON: u32 = 9999;

fn code_of(s: &tonic::Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn req(ids: Vec<u32>, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: Some(Prompt::TokenIds(pb::TokenIds { ids })), max_new_tokens: n, min_new_tokens: n, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_its_requests_and_the_engine_goes_on() {
    let _serial = SERIAL.lock().await;
    let server = spawn_with_env(&[], &[("MODSERVE_FAULT_INJECT", &format!("step_panic:{POISON}"))], Stdio::null());
    wait_serving(&server.url, Duration::from_secs(60)).await;
    let mut c = InferenceClient::connect(server.url.clone()).await.unwrap();

    let e = c.generate(req(vec![POISON, 504], 4)).await.expect_err("the poisoned step must fail");
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::Internal, "internal"), "{e}");
    assert!(e.message().contains("panic in the batch step"), "{}", e.message());
    // Streaming sees the same error as its terminal item.
    let mut s = c.generate_stream(req(vec![POISON, 2365], 4)).await.unwrap().into_inner();
    let e = first_error(&mut s).await.expect("the stream must end with an error");
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::Internal, "internal"));
    // The engine goes on: later requests complete, several at once.
    let mut joins = Vec::new();
    for i in 0..3u32 {
        let mut c = c.clone();
        joins.push(tokio::spawn(async move { c.generate(req(vec![504, 2365 + i], 8)).await }));
    }
    for j in joins {
        let r = j.await.unwrap().expect("a request after the contained panic").into_inner();
        assert_eq!(r.token_ids.len(), 8);
    }
    let mut h = HealthClient::new(tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap());
    let st = h.check(HealthCheckRequest { service: "modserve.v1.Inference".into() }).await.unwrap().into_inner().status;
    assert_eq!(st, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_fails_in_flight_requests_and_the_process_exits() {
    let _serial = SERIAL.lock().await;
    let mut server = spawn_with_env(&[], &[("MODSERVE_FAULT_INJECT", &format!("engine_panic:{POISON}"))], Stdio::null());
    wait_serving(&server.url, Duration::from_secs(60)).await;
    let mut c = InferenceClient::connect(server.url.clone()).await.unwrap();

    // A long stream in flight, its first token read.
    let mut s = c.generate_stream(req(vec![504, 2365], 200)).await.unwrap().into_inner();
    s.next().await.expect("first chunk").expect("first chunk is a token");
    // The poisoned request kills the engine thread.
    let poisoned = c.generate(req(vec![POISON, 504], 4)).await.expect_err("the engine died under it");
    assert_eq!((poisoned.code(), code_of(&poisoned).as_str()), (Code::Unavailable, "engine_stopped"), "{poisoned}");
    let e = first_error(&mut s).await.expect("the in-flight stream must end with an error, not silently");
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::Unavailable, "engine_stopped"), "{e}");
    // Health turns NOT_SERVING while the process is still up (it exits half a second later).
    let (t0, mut seen) = (Instant::now(), Vec::new());
    while t0.elapsed() < Duration::from_secs(3) {
        let Ok(mut h) = tonic::transport::Channel::from_shared(server.url.clone()).unwrap().connect().await.map(HealthClient::new) else {
            break;
        };
        let Ok(r) = h.check(HealthCheckRequest { service: "modserve.v1.Inference".into() }).await else { break };
        seen.push(r.into_inner().status);
        if seen.last() == Some(&(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.last(), Some(&(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)), "health seen: {seen:?}");
    let status = wait_exit(&mut server, Duration::from_secs(10), "the server did not exit after its engine died").await;
    assert_eq!(status.code(), Some(70), "exit status {status}");
}
