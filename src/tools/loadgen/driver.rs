//! The load generator's driver: connects to the target, runs the closed loop (one worker per
//! `--concurrency` slot) or the open loop (Poisson arrivals, dropped when every slot is busy),
//! sends each request over gRPC (streaming or unary) or the OpenAI HTTP API and measures it, prints progress and drains
//! the requests in flight at the end.
//!
//! Invariants: at most `--concurrency` requests are in flight; a request is recorded only if it
//! started in the measured window; after `--grace` the requests still running are counted as
//! cancelled (the caller drops the runtime, which drops their streams).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use super::args::{LoadMode, LoadgenArgs, Protocol};
use super::mix::{worker_seed, Mix};
use super::report::{build_report, code_name, Measured, Outcome, Report, RunInfo};
use crate::pb;
use crate::pb::inference_client::InferenceClient;

/// Exponential inter-arrival gap of a Poisson process with `rate` events per second.
pub fn exp_interarrival(rng: &mut impl Rng, rate: f64) -> Duration {
    let u: f64 = rng.random::<f64>(); // [0, 1)
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

/// Counters shared by the workers, the progress printer and the driver.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    in_flight: AtomicU64,
    /// Tokens received so far (live, as chunks arrive), warmup included.
    live_tokens: AtomicU64,
    /// `live_tokens` when the measured window started (set then).
    tokens_at_window: AtomicU64,
    /// Measured requests sent so far (for --max-requests).
    issued: AtomicU64,
    outcomes: Mutex<Vec<Outcome>>,
    max_reached: tokio::sync::Notify,
}

/// Where requests go.
enum Transport {
    Grpc(InferenceClient<Channel>),
    Http(super::http::HttpTarget),
}

struct Ctx {
    transport: Transport,
    mix: Mix,
    shared: Arc<Shared>,
    stream: bool,
    request_timeout: Duration,
    window_start: Instant,
    max_requests: Option<u64>,
}

impl Ctx {
    /// Counts a request about to start; false when --max-requests is reached (and stops the run).
    fn admit(&self, now: Instant) -> bool {
        if now < self.window_start {
            return true;
        }
        let n = self.shared.issued.fetch_add(1, Ordering::SeqCst);
        match self.max_requests {
            Some(m) if n >= m => {
                self.shared.stop.store(true, Ordering::SeqCst);
                self.shared.max_reached.notify_one();
                false
            }
            _ => true,
        }
    }

    /// Sends one request and records its outcome (if it started in the measured window).
    async fn one(&self, entry: usize, req: pb::GenerateRequest) {
        let started = Instant::now();
        let sh = &self.shared;
        sh.in_flight.fetch_add(1, Ordering::SeqCst);
        let timeout = self.request_timeout;
        let fut = async {
            match &self.transport {
                Transport::Grpc(client) if self.stream => stream_request(&mut client.clone(), req, started, timeout, &sh.live_tokens).await,
                Transport::Grpc(client) => unary_request(&mut client.clone(), req, started, timeout, &sh.live_tokens).await,
                Transport::Http(target) => super::http::http_request(target, req, self.stream, started, &sh.live_tokens).await,
            }
        };
        let (result, ttft, itl, tokens) = match tokio::time::timeout(timeout + Duration::from_millis(250), fut).await {
            Ok(r) => r,
            Err(_) => (Err(("DEADLINE_EXCEEDED".to_string(), "client-side timeout".to_string())), None, vec![], 0),
        };
        let finished = Instant::now();
        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
        if result.is_ok() {
            sh.done.fetch_add(1, Ordering::Relaxed);
        } else {
            sh.errors.fetch_add(1, Ordering::Relaxed);
        }
        if started >= self.window_start {
            sh.outcomes.lock().unwrap().push(Outcome { started, finished, entry, result, ttft, itl, output_tokens: tokens });
        }
    }
}

fn status_err(s: &tonic::Status) -> (String, String) {
    (code_name(s.code()).to_string(), s.message().to_string())
}

async fn stream_request(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    started: Instant,
    timeout: Duration,
    live: &AtomicU64,
) -> Measured {
    let mut request = tonic::Request::new(req);
    request.set_timeout(timeout);
    let mut stream = match client.generate_stream(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (Err(status_err(&s)), None, vec![], 0),
    };
    let (mut ttft, mut itl, mut tokens, mut last) = (None, Vec::new(), 0u64, None::<Instant>);
    let mut usage = None;
    let mut finish = String::new();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if !chunk.token_ids.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => ttft = Some(now - started),
                        Some(prev) => itl.push(now - prev),
                    }
                    last = Some(now);
                    tokens += chunk.token_ids.len() as u64;
                    live.fetch_add(chunk.token_ids.len() as u64, Ordering::Relaxed);
                }
                if !chunk.finish_reason.is_empty() {
                    finish = chunk.finish_reason;
                    usage = chunk.usage;
                }
            }
            Ok(None) => break,
            Err(s) => return (Err(status_err(&s)), ttft, itl, tokens),
        }
    }
    if finish.is_empty() {
        return (Err(("INCOMPLETE".into(), "stream ended without a finish_reason".into())), ttft, itl, tokens);
    }
    let tokens = usage.map(|u| u.generated_tokens as u64).filter(|n| *n > 0).unwrap_or(tokens);
    (Ok(()), ttft, itl, tokens)
}

async fn unary_request(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
    started: Instant,
    timeout: Duration,
    live: &AtomicU64,
) -> Measured {
    let mut request = tonic::Request::new(req);
    request.set_timeout(timeout);
    match client.generate(request).await {
        Ok(r) => {
            let r = r.into_inner();
            let n = r.usage.map(|u| u.generated_tokens as u64).filter(|n| *n > 0).unwrap_or(r.token_ids.len() as u64);
            live.fetch_add(n, Ordering::Relaxed);
            (Ok(()), Some(started.elapsed()), vec![], n)
        }
        Err(s) => (Err(status_err(&s)), None, vec![], 0),
    }
}

pub(super) async fn drive(args: &LoadgenArgs, mix: Mix, rate: Option<f64>) -> anyhow::Result<Report> {
    let transport = match args.protocol {
        Protocol::Grpc => {
            let endpoint = Endpoint::from_shared(args.target.clone())
                .with_context(|| format!("--target {}", args.target))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {}", args.target))?;
            Transport::Grpc(InferenceClient::new(channel).max_decoding_message_size(64 << 20))
        }
        Protocol::Http => Transport::Http(super::http::HttpTarget::new(&args.target, args.concurrency)),
    };

    let shared = Arc::new(Shared::default());
    let t0 = Instant::now();
    let window_start = t0 + args.warmup;
    let end = window_start + args.duration;
    let ctx = Arc::new(Ctx {
        transport,
        mix,
        shared: shared.clone(),
        stream: args.stream,
        request_timeout: args.request_timeout,
        window_start,
        max_requests: args.max_requests,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));

    let progress = (!args.quiet).then(|| tokio::spawn(progress_loop(shared.clone(), t0, window_start, end)));
    let window_mark = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(window_start.into()).await;
            shared.tokens_at_window.store(shared.live_tokens.load(Ordering::SeqCst), Ordering::SeqCst);
        })
    };

    // Issue load until the end, --max-requests or Ctrl-C.
    let stop_wait = async {
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => {}
            _ = shared.max_reached.notified() => {}
            _ = tokio::signal::ctrl_c() => { eprintln!("loadgen: interrupted, stopping"); }
        }
        shared.stop.store(true, Ordering::SeqCst);
    };
    match args.mode {
        LoadMode::Closed => {
            for w in 0..args.concurrency {
                let (ctx, slots) = (ctx.clone(), slots.clone());
                let mut rng = StdRng::seed_from_u64(worker_seed(args.seed, w as u64));
                tokio::spawn(async move {
                    while !ctx.shared.stop.load(Ordering::SeqCst) {
                        let Ok(_permit) = slots.clone().acquire_owned().await else { break };
                        if ctx.shared.stop.load(Ordering::SeqCst) || !ctx.admit(Instant::now()) {
                            break;
                        }
                        let (entry, req) = ctx.mix.draw(&mut rng);
                        ctx.one(entry, req).await;
                    }
                });
            }
            stop_wait.await;
        }
        LoadMode::Open => {
            let rate = rate.expect("checked");
            let arrivals = async {
                let mut rng = StdRng::seed_from_u64(worker_seed(args.seed, u64::MAX));
                let mut next = tokio::time::Instant::now();
                loop {
                    next += exp_interarrival(&mut rng, rate);
                    tokio::time::sleep_until(next).await;
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (entry, req) = ctx.mix.draw(&mut rng);
                    let now = Instant::now();
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            if !ctx.admit(now) {
                                break;
                            }
                            let ctx = ctx.clone();
                            tokio::spawn(async move {
                                ctx.one(entry, req).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            if now >= window_start {
                                shared.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = stop_wait => {}
                _ = arrivals => {}
            }
            shared.stop.store(true, Ordering::SeqCst);
        }
    }
    let stopped = Instant::now();
    // Tokens that arrived inside the window (none when it stopped before the window began).
    let window_tokens = if stopped > window_start {
        let _ = window_mark.await;
        shared.live_tokens.load(Ordering::SeqCst).saturating_sub(shared.tokens_at_window.load(Ordering::SeqCst))
    } else {
        window_mark.abort();
        0
    };

    // Drain: every slot free means nothing is in flight.
    let n = u32::try_from(args.concurrency).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(args.grace, slots.acquire_many(n)).await.is_ok();
    let cancelled = if drained { 0 } else { shared.in_flight.load(Ordering::SeqCst) };
    if !drained && !args.quiet {
        eprintln!("loadgen: {cancelled} request(s) still running after the {:?} grace period: cancelled", args.grace);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let outcomes = std::mem::take(&mut *shared.outcomes.lock().unwrap());
    let info = RunInfo {
        target: args.target.clone(),
        protocol: args.protocol,
        mode: args.mode,
        concurrency: args.concurrency,
        rate,
        stream: args.stream,
        seed: args.seed,
        warmup: args.warmup,
        entry_names: ctx.mix.entry_names(),
    };
    Ok(build_report(&info, &outcomes, (shared.dropped.load(Ordering::Relaxed), cancelled), (window_start, stopped), window_tokens))
}

async fn progress_loop(shared: Arc<Shared>, t0: Instant, window_start: Instant, end: Instant) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    let mut last_tokens = 0u64;
    let mut last_t = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let tokens = shared.live_tokens.load(Ordering::Relaxed);
        let rate = (tokens - last_tokens) as f64 / now.duration_since(last_t).as_secs_f64().max(1e-9);
        (last_tokens, last_t) = (tokens, now);
        let phase = if now < window_start {
            "warmup"
        } else if shared.stop.load(Ordering::SeqCst) || now >= end {
            "draining"
        } else {
            "running"
        };
        eprintln!(
            "[{:>6.1}s {phase}] done {} errors {} dropped {} in-flight {} | {:.1} tok/s",
            now.duration_since(t0).as_secs_f64(),
            shared.done.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed),
            shared.dropped.load(Ordering::Relaxed),
            shared.in_flight.load(Ordering::Relaxed),
            rate,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_have_the_right_mean() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 50_000;
        let total: f64 = (0..n).map(|_| exp_interarrival(&mut rng, 20.0).as_secs_f64()).sum();
        let mean = total / n as f64;
        assert!((mean - 0.05).abs() < 0.002, "{mean}");
    }
}
