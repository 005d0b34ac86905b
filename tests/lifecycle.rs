//! Operating the server: configuration precedence (file < env < flags), invalid configuration
//! naming the key, and draining on SIGTERM (stream completes, new requests refused, exit 0).
mod common;

use std::process::Command;
use std::time::Duration;

use common::server::{spawn, wait_serving};
use modserve::pb;
use modserve::pb::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::Code;

fn print_config(file: &str, env: &[(&str, &str)], flags: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modserve.toml");
    std::fs::write(&path, file).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modserve"));
    cmd.args(["serve", "--config"]).arg(&path).args(flags).arg("--print-config");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MODSERVE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn line<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_else(|| panic!("{key} missing in {text}"))
}

#[test]
fn config_precedence_is_file_then_env_then_flags() {
    let file = "max_running = 7\nmax_queued = 9\nmax-batch-tokens = 100\nlisten = \"127.0.0.1:1234\"\n";
    let env = [("MODSERVE_MAX_QUEUED", "11"), ("MODSERVE_MAX_RUNNING", "8"), ("MODSERVE_MAX_DECODE_STALL_MS", "20")];
    let (ok, out, err) = print_config(file, &env, &["--max-running", "5"]);
    assert!(ok, "{err}");
    assert!(line(&out, "max_running").starts_with("max_running = \"5\"  # flag"), "{out}");
    assert!(line(&out, "max_queued").starts_with("max_queued = \"11\"  # env"), "{out}");
    assert!(line(&out, "max_batch_tokens").starts_with("max_batch_tokens = \"100\"  # file"), "{out}");
    assert!(line(&out, "listen").contains("127.0.0.1:1234"), "{out}");
    assert!(line(&out, "prefill_chunk").contains("# default"), "{out}");
    assert!(line(&out, "max_decode_stall_ms").starts_with("max_decode_stall_ms = \"20\"  # env (MODSERVE_MAX_DECODE_STALL_MS)"), "{out}");
    let (ok, out, err) = print_config("max_decode_stall_ms = 0\n", &[], &[]);
    assert!(ok, "{err}");
    assert!(line(&out, "max_decode_stall_ms").starts_with("max_decode_stall_ms = \"0\"  # file"), "{out}");
    let (ok, out, err) = print_config("", &[], &[]);
    assert!(ok, "{err}");
    assert!(line(&out, "max_decode_stall_ms").starts_with("max_decode_stall_ms = \"30\"  # default"), "{out}");
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let (ok, _, err) = print_config("max_runing = 3\n", &[], &[]);
    assert!(!ok);
    assert!(err.contains("unknown key `max_runing`"), "{err}");
    let (ok, _, err) = print_config("max_running = \"lots\"\n", &[], &[]);
    assert!(!ok);
    assert!(err.contains("max-running"), "{err}");
    let (ok, _, err) = print_config("max_running = [1]\n", &[], &[]);
    assert!(!ok);
    assert!(err.contains("`max_running`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_refuses_new_work_and_exits_zero() {
    let mut server = spawn(&["--drain-timeout", "60"]);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let mut client = InferenceClient::connect(server.url.clone()).await.unwrap();
    let req = |n: u32| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("Tell me a long story".into())),
        max_new_tokens: n,
        min_new_tokens: n,
        ..Default::default()
    };
    let mut stream = client.generate_stream(req(120)).await.unwrap().into_inner();
    let mut tokens = stream.next().await.unwrap().unwrap().token_ids.len();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = client.generate(req(4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "new work is refused while draining: {e}");
    let mut finish = String::new();
    while let Some(c) = stream.next().await {
        let c = c.expect("the in-flight stream completes");
        tokens += c.token_ids.len();
        if !c.finish_reason.is_empty() {
            finish = c.finish_reason;
        }
    }
    assert_eq!((tokens, finish.as_str()), (120, "length"));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "server did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}
