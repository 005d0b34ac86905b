//! Driving the in-process engine: prepared jobs submitted at once or in a closed loop, each stream
//! read on its own thread, with client-side timestamps of every token.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::context::Ctx;
use super::stats::percentile;
use crate::adapters::composition::CompositionSpec;
use crate::adapters::store::AdapterStore;
use crate::engine::actor::{EventResult, StreamEvent};
use crate::engine::error::EngineError;
use crate::engine::prepare::{EngineRequest, PromptInput};
use crate::engine::sequence::GenerateSpec;
use crate::model::sampling::SamplingParams;

/// One request of a scenario.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub new_tokens: usize,
    pub composition: CompositionSpec,
    /// Greedy by default; `base32_sampled` draws with a temperature.
    pub sampling: SamplingParams,
}

/// What one request saw.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Before preparation (composition resolution, maybe a module load) and submission.
    pub start: Instant,
    pub tokens: Vec<Instant>,
    pub done: Instant,
    pub error: Option<String>,
}

impl Trace {
    pub fn ttft_ms(&self) -> Option<f64> {
        self.tokens.first().map(|t| ms(*t - self.start))
    }

    pub fn gaps_ms(&self) -> impl Iterator<Item = f64> + '_ {
        self.tokens.windows(2).map(|w| ms(w[1] - w[0]))
    }

    /// Whether a request given `deadline` from its start outlived it: it failed with the
    /// deadline's error (the engine's `deadline_exceeded`, or a load-slot wait that gave up at
    /// it), or its stream ended after it.
    pub fn missed(&self, deadline: Duration) -> bool {
        self.error.as_deref().is_some_and(|e| e.contains("deadline")) || self.done > self.start + deadline
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Distinct prompts of 16..=32 random in-vocabulary ids (ids below 100 hold special tokens).
pub fn prompts(n: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0000);
    (0..n)
        .map(|i| {
            let len = 16 + (i * 7) % 17;
            (0..len).map(|_| rng.random_range(100..vocab as u32)).collect()
        })
        .collect()
}

/// A random prompt of exactly `len` ids.
pub fn long_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x10_0000);
    (0..len).map(|_| rng.random_range(100..vocab as u32)).collect()
}

/// The job's sampling (greedy unless set), exactly `new_tokens` tokens (end-of-sequence
/// suppressed: with a temperature, each step then copies a sequence's logits row to mask it), ending with
/// `deadline_exceeded` at `deadline` if one is given (the server's gRPC deadline path).
pub fn request(job: &Job, id: String, deadline: Option<Instant>) -> EngineRequest {
    EngineRequest {
        prompt: PromptInput::TokenIds(job.prompt.clone()),
        spec: GenerateSpec {
            prompt_ids: Vec::new(),
            max_new_tokens: job.new_tokens,
            min_new_tokens: job.new_tokens,
            stop: Vec::new(),
            sampling: job.sampling.clone(),
        },
        composition: job.composition.clone(),
        deadline,
        request_id: id,
    }
}

/// Prepares and submits one job; the receiver of its events.
pub fn submit(ctx: &Ctx, store: Option<&AdapterStore>, job: &Job, id: String) -> Result<mpsc::Receiver<EventResult>, EngineError> {
    submit_by(ctx, store, job, id, None)
}

/// [`submit`] with a deadline (preparation waits for module-load slots at most until it).
pub fn submit_by(
    ctx: &Ctx,
    store: Option<&AdapterStore>,
    job: &Job,
    id: String,
    deadline: Option<Instant>,
) -> Result<mpsc::Receiver<EventResult>, EngineError> {
    let req = ctx.front.prepare(store, request(job, id, deadline))?;
    ctx.engine.submit(req)
}

/// Reads a stream to its end on this thread, stamping every token.
pub fn read(start: Instant, mut rx: mpsc::Receiver<EventResult>) -> Trace {
    let mut t = TraceBuilder::new(start);
    while let Some(ev) = rx.blocking_recv() {
        if !t.on_event(ev) {
            break;
        }
    }
    t.finish()
}

/// [`read`] as a task.
async fn read_async(start: Instant, mut rx: mpsc::Receiver<EventResult>) -> Trace {
    let mut t = TraceBuilder::new(start);
    while let Some(ev) = rx.recv().await {
        if !t.on_event(ev) {
            break;
        }
    }
    t.finish()
}

/// A [`Trace`] as its stream's events arrive (shared by the blocking and the async reader).
struct TraceBuilder {
    trace: Trace,
    finished: bool,
}

impl TraceBuilder {
    fn new(start: Instant) -> Self {
        Self { trace: Trace { start, tokens: Vec::new(), done: start, error: None }, finished: false }
    }

    /// Records one event; false once the stream failed (stop reading).
    fn on_event(&mut self, ev: EventResult) -> bool {
        match ev {
            Ok(StreamEvent::Token { .. }) => self.trace.tokens.push(Instant::now()),
            Ok(StreamEvent::Finished(_)) => self.finished = true,
            Err(e) => {
                self.trace.error = Some(e.to_string());
                return false;
            }
        }
        true
    }

    fn finish(mut self) -> Trace {
        if !self.finished && self.trace.error.is_none() {
            self.trace.error = Some("stream ended without a final event".into());
        }
        self.trace.done = Instant::now();
        self.trace
    }
}

/// Reads every stream on this one thread, one task per stream (a current-thread tokio runtime),
/// as the server's async front ends read the engine: one thread wakes per step for all the
/// streams, where a thread per stream put 32 wake-ups per step beside the engine's compute
/// threads on a 2-core machine, and each token's stamp waited for its own thread's turn.
pub fn read_all(streams: Vec<(Instant, mpsc::Receiver<EventResult>)>) -> Vec<Trace> {
    on_one_thread(async move {
        let tasks: Vec<_> = streams.into_iter().map(|(start, rx)| tokio::spawn(read_async(start, rx))).collect();
        let mut traces = Vec::with_capacity(tasks.len());
        for t in tasks {
            traces.push(t.await.expect("a reader task"));
        }
        traces
    })
}

/// Runs `f` to completion on a current-thread tokio runtime of its own (this thread).
pub fn on_one_thread<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime").block_on(f)
}

/// Prepares every job, then submits them all at once and reads the streams ([`read_all`]).
/// The submissions come in one tight loop, before any reader starts: spawning a reader
/// thread between two submissions (tens of µs, more while a step keeps both cores busy) let the
/// engine start its first step on one or two prompts in some runs and on all of them in others,
/// and a first step of one prompt turns the rest of the prefill into stall-capped steps (8 steps
/// with prefill rows in one run of a scenario, 26 in the next), which moved a run's tok/s by
/// about a tenth.
pub fn run_all_at_once(ctx: &Ctx, store: Option<&AdapterStore>, jobs: &[Job]) -> anyhow::Result<Vec<Trace>> {
    let mut prepared = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        prepared.push(ctx.front.prepare(store, request(j, format!("bench-{i}"), None))?);
    }
    let mut streams = Vec::with_capacity(prepared.len());
    for p in prepared {
        let start = Instant::now();
        streams.push((start, ctx.engine.submit(p)?));
    }
    Ok(read_all(streams))
}

/// Closed loop: `concurrency` workers each take the next job, prepare (resolving its composition,
/// loading modules on a miss), submit and read it, until all jobs ran.
pub fn run_closed_loop(ctx: &Ctx, store: &AdapterStore, jobs: &[Job], concurrency: usize) -> Vec<Trace> {
    run_closed_loop_by(ctx, store, jobs, concurrency, None)
}

/// [`run_closed_loop`], each request with a deadline of `deadline` from its start (before its
/// preparation, so module loads count against it).
pub fn run_closed_loop_by(ctx: &Ctx, store: &AdapterStore, jobs: &[Job], concurrency: usize, deadline: Option<Duration>) -> Vec<Trace> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<(usize, Trace)>> = Mutex::new(Vec::with_capacity(jobs.len()));
    let progress = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let start = Instant::now();
                let t = match submit_by(ctx, Some(store), job, format!("bench-{i}"), deadline.map(|d| start + d)) {
                    Ok(rx) => read(start, rx),
                    Err(e) => Trace { start, tokens: Vec::new(), done: Instant::now(), error: Some(e.to_string()) },
                };
                out.lock().expect("traces").push((i, t));
                let n = progress.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(64) || n == jobs.len() {
                    eprintln!("[bench]   {n}/{} requests done", jobs.len());
                }
            });
        }
    });
    let mut v = out.into_inner().expect("traces");
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, t)| t).collect()
}

/// Waits until the engine holds no request (after a scenario dropped or finished its streams).
pub fn wait_idle(ctx: &Ctx) {
    let t0 = Instant::now();
    while (ctx.engine.running() > 0 || ctx.engine.queued() > 0) && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Aggregates of a set of traces.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub tokens: usize,
    pub wall_s: f64,
    pub tok_s: f64,
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
    pub itl_p50: Option<f64>,
    pub itl_p99: Option<f64>,
}

/// Throughput over first start to last token; TTFT and inter-token percentiles over all streams.
pub fn summarize(traces: &[Trace]) -> Summary {
    let tokens: usize = traces.iter().map(|t| t.tokens.len()).sum();
    let first = traces.iter().map(|t| t.start).min();
    let last = traces.iter().filter_map(|t| t.tokens.last().copied()).max();
    let wall_s = match (first, last) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let ttft: Vec<f64> = traces.iter().filter_map(Trace::ttft_ms).collect();
    let gaps: Vec<f64> = traces.iter().flat_map(Trace::gaps_ms).collect();
    let errors: Vec<&String> = traces.iter().filter_map(|t| t.error.as_ref()).collect();
    Summary {
        requests: traces.len(),
        errors: errors.len(),
        first_error: errors.first().map(|s| s.to_string()),
        tokens,
        wall_s,
        tok_s: if wall_s > 0.0 { tokens as f64 / wall_s } else { 0.0 },
        ttft_p50: percentile(&ttft, 50.0),
        ttft_p99: percentile(&ttft, 99.0),
        itl_p50: percentile(&gaps, 50.0),
        itl_p99: percentile(&gaps, 99.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_distinct_and_sized() {
        let p = prompts(32, 49152, 0);
        assert_eq!(p.len(), 32);
        assert!(p.iter().all(|x| (16..=32).contains(&x.len()) && x.iter().all(|&t| (100..49152).contains(&t))));
        let distinct: std::collections::BTreeSet<_> = p.iter().collect();
        assert_eq!(distinct.len(), 32);
        assert_eq!(p, prompts(32, 49152, 0));
        assert_eq!(long_prompt(256, 1000, 1).len(), 256);
    }

    #[test]
    fn summary_of_traces() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let a = Trace { start: at(0), tokens: vec![at(100), at(110), at(130)], done: at(130), error: None };
        let b = Trace { start: at(0), tokens: vec![at(200), at(210)], done: at(210), error: Some("x".into()) };
        let s = summarize(&[a, b]);
        assert_eq!((s.tokens, s.errors, s.requests), (5, 1, 2));
        assert!((s.wall_s - 0.21).abs() < 1e-9);
        assert!((s.tok_s - 5.0 / 0.21).abs() < 1e-6);
        assert_eq!(s.ttft_p50.map(f64::round), Some(100.0));
        assert_eq!(s.ttft_p99.map(f64::round), Some(200.0));
        assert_eq!(s.itl_p99.map(f64::round), Some(20.0));
        assert_eq!(s.itl_p50.map(f64::round), Some(10.0));
    }

    #[test]
    fn deadline_misses() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let d = Duration::from_millis(100);
        let ok = Trace { start: at(0), tokens: vec![at(50)], done: at(100), error: None };
        let late = Trace { start: at(0), tokens: vec![at(50)], done: at(101), error: None };
        let failed = Trace { start: at(0), tokens: vec![], done: at(10), error: Some("the request's deadline passed".into()) };
        let other = Trace { start: at(0), tokens: vec![], done: at(10), error: Some("the request queue is full (9 waiting)".into()) };
        assert_eq!([ok, late, failed, other].map(|t| t.missed(d)), [false, true, true, false]);
    }
}
