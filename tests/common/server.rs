//! Starts `modserve serve` as a child process on 127.0.0.1:0 and waits for it to be ready.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A running server; killed on drop.
pub struct TestServer {
    pub child: Child,
    pub url: String,
    pub metrics_addr: String,
    /// The OpenAI HTTP API's address, when started with `--http-listen`.
    pub http_addr: Option<String>,
    /// The state folder this helper made (removed on drop).
    state_dir: Option<std::path::PathBuf>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.state_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Spawns the server with `extra` flags; returns once the gRPC port is bound (not yet ready).
pub fn spawn(extra: &[&str]) -> TestServer {
    spawn_logging(extra, None, Stdio::inherit())
}

/// [`spawn`] with the server's stderr (its log) sent to `stderr`, at `RUST_LOG` = `filter` if
/// given.
pub fn spawn_logging(extra: &[&str], filter: Option<&str>, stderr: impl Into<Stdio>) -> TestServer {
    spawn_with_env(extra, filter.map(|f| ("RUST_LOG", f)).as_slice(), stderr)
}

/// [`spawn`] with extra environment variables for the server process.
pub fn spawn_with_env(extra: &[&str], env: &[(&str, &str)], stderr: impl Into<Stdio>) -> TestServer {
    spawn_model(&super::reference_model(), extra, env, stderr)
}

/// [`spawn_with_env`] serving the model at `model` (a GGUF file or a Hugging Face folder).
pub fn spawn_model(model: &std::path::Path, extra: &[&str], env: &[(&str, &str)], stderr: impl Into<Stdio>) -> TestServer {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // Each server gets its own state folder (saved compositions) unless the test names one.
    let state = (!extra.contains(&"--state-dir")).then(|| {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("modserve-test-state-{}-{n}", std::process::id()))
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_modserve"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", &metrics_addr, "--threads", "2", "--model"])
        .arg(model)
        .args(state.iter().flat_map(|p| [std::ffi::OsStr::new("--state-dir"), p.as_os_str()]))
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn modserve serve");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("modserve listening on ") {
            break format!("http://{addr}");
        }
    };
    let http_addr = extra.contains(&"--http-listen").then(|| loop {
        let line = lines.next().expect("server exited before its HTTP listener").unwrap();
        if let Some(addr) = line.strip_prefix("modserve http listening on ") {
            break addr.to_string();
        }
    });
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    TestServer { child, url, metrics_addr, http_addr, state_dir: state }
}

/// Polls the health service until `modserve.v1.Inference` is SERVING (or panics after `timeout`).
/// Returns the statuses seen, in order (deduplicated).
pub async fn wait_serving(url: &str, timeout: Duration) -> Vec<i32> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let channel = tonic::transport::Channel::from_shared(url.to_string()).expect("url").connect().await;
        if let Ok(mut h) = channel.map(HealthClient::new) {
            if let Ok(r) = h.check(HealthCheckRequest { service: "modserve.v1.Inference".into() }).await {
                let s = r.into_inner().status;
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
                if s == ServingStatus::Serving as i32 {
                    return seen;
                }
            }
        }
        assert!(t0.elapsed() < timeout, "server not SERVING after {timeout:?} (saw {seen:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A field of `/proc/<pid>/status` in KiB: `VmRSS` (resident now) or `VmHWM` (peak resident).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = s
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// GETs `/metrics` over plain HTTP/1.0.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Value of the first sample line of `name` (optionally with a label fragment) in an exposition.
pub fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(label))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Reads a stream until its first error (returned), or its end (None).
pub async fn first_error<T>(s: &mut tonic::Streaming<T>) -> Option<tonic::Status> {
    use tokio_stream::StreamExt;
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            return Some(e);
        }
    }
    None
}

/// Waits for the server process to exit, panicking with `what` after `timeout`.
pub async fn wait_exit(server: &mut TestServer, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < timeout, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
