//! `modserve loadgen`: a gRPC load generator that replays a mix of prompts and adapter
//! compositions against a running `modserve serve` and prints one JSON report on stdout.
//!
//! # Usage
//!
//! ```text
//! modserve loadgen --target http://127.0.0.1:50051 --mix tests/fixtures/loadgen/mixed.json \
//!     [--concurrency 8] [--duration 30s] [--mode closed|open] [--rate 4.0] [--max-requests N] \
//!     [--warmup 5s] [--report out.json] [--stream true|false] [--seed 0] \
//!     [--request-timeout 120s] [--grace 10s]
//! ```
//!
//! * **closed** loop (default): `--concurrency` workers, each sends its next request when the
//!   previous one finished.
//! * **open** loop: arrivals follow a Poisson process at `--rate` requests/s; at most
//!   `--concurrency` requests are in flight, and an arrival that finds every slot taken is not
//!   sent and counts as `dropped`.
//! * `--warmup D` runs the load for D first without recording anything; then the measured window
//!   of `--duration` starts. A request belongs to the window it *started* in.
//! * The run stops issuing requests after `--duration` (or after `--max-requests` measured
//!   requests, or on Ctrl-C), then waits up to `--grace` for the requests in flight; those still
//!   running are cancelled (the stream is dropped, which the server sees) and count as
//!   `cancelled`.
//! * `--stream true` (default) uses `GenerateStream`: TTFT = time from sending the request to the
//!   first chunk that carries a token, inter-token latency (ITL) = gaps between successive chunks
//!   that carry tokens (as the client sees them: chunks that arrive in one read show gaps near
//!   0). `--stream false` uses unary `Generate`: TTFT = total latency, no ITL.
//! * Progress goes to stderr once per second; the report goes to stdout (and `--report FILE`).
//!
//! The target is any `http://host:port` URL; this project only ever points it at loopback / local
//! servers, and the tool neither checks nor refuses other addresses (there is no TLS support).
//!
//! # Mix file (JSON)
//!
//! ```json
//! {
//!   "entries": [
//!     {"name": "qv", "weight": 3, "prompt": "The quick brown fox",
//!      "deltas": [{"id": "lora_qv_r4", "scale": 1.0}], "max_new_tokens": 32},
//!     {"weight": 1, "chat_user": "What is the capital of France?",
//!      "route": {"inventory": "poly_qvup", "task": 1}, "temperature": 0.7, "seed": 7},
//!     {"weight": 1, "token_ids": [504, 2365, 6354, 16438],
//!      "route": {"inventory": "poly_qvup", "weights": [0.5, 0.5]}}
//!   ],
//!   "zipf": {"s": 1.0, "modules": ["lora_a", "lora_b"], "scale": 1.0}
//! }
//! ```
//!
//! Entry fields: `weight` (>= 0, default 1; the entry is picked with probability weight / total),
//! `name` (label, optional), exactly one prompt form of `prompt` (raw text), `chat_user` (one user
//! message rendered with the chat template) or `token_ids`; `deltas` (list of `{"id", "scale"}`,
//! scale default 1.0 and sent literally, 0 included), `route` (`{"inventory", "task"}` or
//! `{"inventory", "weights": [..]}`), `max_new_tokens` (default 64), `min_new_tokens` (default 0),
//! `temperature` (default 0 = greedy), `top_k`, `top_p`, `seed`, `stop` (list of strings).
//! Unknown fields are rejected.
//!
//! Optional `zipf`: every request picks ONE module as its only delta (replacing the entry's
//! `deltas`; the entry's prompt, route and sampling settings stay), the module of popularity rank
//! k (1-based, in list order) with probability proportional to 1 / k^s. The list is either
//! `"modules": [..]` or generated ids `"template": "bench_{}", "count": 1000` (`{}` replaced by
//! `start`, `start`+1, ... ; `start` defaults to 0). `scale` defaults to 1.0. This is the mode for
//! benchmarking many registered LoRAs against a small adapter cache.
//!
//! # Report (stdout, one JSON document)
//!
//! `target, mode, concurrency, rate, stream, seed, warmup_s, duration_s, requests {ok, errors,
//! dropped, cancelled}, errors_by_code {GRPC_CODE: n}, error_examples {GRPC_CODE: message},
//! output_tokens, output_tokens_per_s, requests_per_s, ttft_ms, itl_ms, latency_ms, by_entry
//! {NAME: {ok, errors, output_tokens}}` where each `*_ms` is `{count, mean, p50, p90, p99, min,
//! max}` (null values when there are no samples). Error codes are gRPC code names, plus
//! `INCOMPLETE` for a stream that ended without a finish_reason.
//! Percentiles are exact nearest-rank values over all recorded samples of successful requests.
//! `duration_s` runs from the start of the measured window to the end of its last request;
//! `output_tokens` counts the generated tokens of successful requests only.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::pb;
use crate::pb::inference_client::InferenceClient;

/// Load generator options.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Server URL (plain HTTP/2, e.g. http://127.0.0.1:50051).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// Closed loop: number of workers. Open loop: most requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Length of the measured window, e.g. 30s, 2m, 500ms, 1m30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Mix file (JSON): prompts and compositions with weights; see `modserve::loadgen` docs.
    #[arg(long)]
    pub mix: PathBuf,
    /// closed: each worker waits for its previous request; open: Poisson arrivals at --rate.
    #[arg(long, value_enum, default_value = "closed")]
    pub mode: LoadMode,
    /// Open loop arrival rate in requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many measured requests were sent (the duration still bounds the run).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Unrecorded load before the measured window.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Use GenerateStream (true) or unary Generate (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,
    /// Seed of the request picking, the Zipf module choice and the open-loop arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Deadline of each request (sent as grpc-timeout and enforced by the client).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long to wait for requests in flight once the run stops; the rest are cancelled.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Print no progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    Closed,
    Open,
}

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

/// Parses `500ms`, `30s`, `2m`, `1h`, `1m30s`, `1.5s`, `250us`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return secs_to_duration(secs).ok_or_else(|| format!("invalid duration `{s}`"));
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("invalid duration `{s}`: expected a number at `{rest}`"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| format!("invalid duration `{s}`: bad number `{}`", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "h" => 3600.0,
            "m" | "min" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "" => return Err(format!("invalid duration `{s}`: a unit (h, m, s, ms, us) must follow `{value}`")),
            other => return Err(format!("invalid duration `{s}`: unknown unit `{other}` (use h, m, s, ms, us)")),
        };
        total += value * factor;
    }
    secs_to_duration(total).ok_or_else(|| format!("invalid duration `{s}`"))
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    (0.0..1e12).contains(&secs).then(|| Duration::from_secs_f64(secs))
}

// ---------------------------------------------------------------------------------------------
// Mix file
// ---------------------------------------------------------------------------------------------

/// The mix file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixFile {
    pub entries: Vec<MixEntry>,
    #[serde(default)]
    pub zipf: Option<ZipfSpec>,
}

/// One kind of request and its weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixEntry {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub chat_user: Option<String>,
    #[serde(default)]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub deltas: Vec<MixDelta>,
    #[serde(default)]
    pub route: Option<MixRoute>,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: u32,
    #[serde(default)]
    pub min_new_tokens: u32,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: u32,
    #[serde(default)]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A delta of an entry's composition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixDelta {
    pub id: String,
    #[serde(default = "one_f32")]
    pub scale: f32,
}

/// Poly routing of an entry: a task id or explicit skill weights.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixRoute {
    pub inventory: String,
    #[serde(default)]
    pub task: Option<i64>,
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
}

/// Zipf-popular single-module mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZipfSpec {
    #[serde(default = "one")]
    pub s: f64,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub start: usize,
    #[serde(default = "one_f32")]
    pub scale: f32,
}

fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn default_max_new() -> u32 {
    64
}

/// A validated mix, ready to draw requests from.
#[derive(Debug, Clone)]
pub struct Mix {
    entries: Vec<MixEntry>,
    picker: WeightedPicker,
    zipf: Option<(Zipf, Vec<String>, f32)>,
}

impl Mix {
    /// Reads and validates a mix file.
    pub fn load(path: &Path) -> anyhow::Result<Mix> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--mix {}", path.display()))?;
        Mix::parse(&text).with_context(|| format!("--mix {}", path.display()))
    }

    /// Parses and validates mix JSON.
    pub fn parse(text: &str) -> anyhow::Result<Mix> {
        let file: MixFile = serde_json::from_str(text)?;
        Mix::from_file(file)
    }

    /// Validates a parsed mix file.
    pub fn from_file(file: MixFile) -> anyhow::Result<Mix> {
        if file.entries.is_empty() {
            bail!("`entries` is empty");
        }
        for (i, e) in file.entries.iter().enumerate() {
            let label = e.name.clone().unwrap_or_else(|| format!("entries[{i}]"));
            let forms = [e.prompt.is_some(), e.chat_user.is_some(), e.token_ids.is_some()].iter().filter(|b| **b).count();
            if forms != 1 {
                bail!("{label}: exactly one of `prompt`, `chat_user`, `token_ids` is required (found {forms})");
            }
            if matches!(&e.token_ids, Some(ids) if ids.is_empty()) {
                bail!("{label}: `token_ids` is empty");
            }
            if !(e.weight.is_finite() && e.weight >= 0.0) {
                bail!("{label}: `weight` must be a finite number >= 0");
            }
            for d in &e.deltas {
                if d.id.is_empty() || !d.scale.is_finite() {
                    bail!("{label}: every delta needs a non-empty `id` and a finite `scale`");
                }
            }
            if let Some(r) = &e.route {
                if r.task.is_some() == r.weights.is_some() {
                    bail!("{label}: `route` needs exactly one of `task` and `weights`");
                }
            }
            if !(e.temperature.is_finite() && e.temperature >= 0.0) {
                bail!("{label}: `temperature` must be >= 0");
            }
        }
        let picker = WeightedPicker::new(&file.entries.iter().map(|e| e.weight).collect::<Vec<_>>())
            .ok_or_else(|| anyhow::anyhow!("the entry weights must not all be 0"))?;
        let zipf = match file.zipf {
            None => None,
            Some(z) => {
                let modules = zipf_modules(&z)?;
                if !(z.s.is_finite() && z.s >= 0.0) {
                    bail!("zipf: `s` must be a finite number >= 0");
                }
                if !z.scale.is_finite() {
                    bail!("zipf: `scale` must be finite");
                }
                Some((Zipf::new(modules.len(), z.s), modules, z.scale))
            }
        };
        Ok(Mix { entries: file.entries, picker, zipf })
    }

    /// Label of each entry: its `name`, or `entries[i]`.
    pub fn entry_names(&self) -> Vec<String> {
        self.entries.iter().enumerate().map(|(i, e)| e.name.clone().unwrap_or_else(|| format!("entries[{i}]"))).collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the mix has no entries (never true for a validated mix).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Draws the next request: an entry by weight, and in Zipf mode its one module.
    pub fn draw(&self, rng: &mut impl Rng) -> (usize, pb::GenerateRequest) {
        let i = self.picker.pick(rng);
        let e = &self.entries[i];
        let deltas = match &self.zipf {
            Some((z, modules, scale)) => vec![delta(&modules[z.sample(rng)], *scale)],
            None => e.deltas.iter().map(|d| delta(&d.id, d.scale)).collect(),
        };
        (i, build_request(e, deltas))
    }
}

fn zipf_modules(z: &ZipfSpec) -> anyhow::Result<Vec<String>> {
    let modules = match (&z.template, z.count) {
        (Some(t), Some(n)) => {
            if !z.modules.is_empty() {
                bail!("zipf: give either `modules` or `template` + `count`, not both");
            }
            if !t.contains("{}") {
                bail!("zipf: `template` must contain `{{}}`");
            }
            (z.start..z.start + n).map(|i| t.replace("{}", &i.to_string())).collect()
        }
        (None, None) => z.modules.clone(),
        _ => bail!("zipf: `template` and `count` go together"),
    };
    if modules.is_empty() {
        bail!("zipf: the module list is empty");
    }
    Ok(modules)
}

fn delta(id: &str, scale: f32) -> pb::DeltaRef {
    pb::DeltaRef { module_id: id.to_string(), scale, scale_is_set: true }
}

fn build_request(e: &MixEntry, deltas: Vec<pb::DeltaRef>) -> pb::GenerateRequest {
    use pb::generate_request::Prompt;
    let prompt = if let Some(t) = &e.prompt {
        Prompt::Text(t.clone())
    } else if let Some(u) = &e.chat_user {
        Prompt::ChatUser(u.clone())
    } else {
        Prompt::TokenIds(pb::TokenIds { ids: e.token_ids.clone().unwrap_or_default() })
    };
    let route = e.route.as_ref().map(|r| pb::PolyRoute {
        inventory_id: r.inventory.clone(),
        routing: Some(match (&r.task, &r.weights) {
            (Some(t), _) => pb::poly_route::Routing::TaskId(*t),
            (None, w) => pb::poly_route::Routing::Weights(pb::RoutingWeights { values: w.clone().unwrap_or_default() }),
        }),
    });
    pb::GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: e.max_new_tokens,
        min_new_tokens: e.min_new_tokens,
        temperature: e.temperature,
        top_k: e.top_k,
        top_p: e.top_p,
        seed: e.seed,
        stop: e.stop.clone(),
        deltas,
        route,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Random choices
// ---------------------------------------------------------------------------------------------

/// Picks an index with probability proportional to its weight (rand's `WeightedIndex`; weights
/// that are not finite and positive count as 0).
#[derive(Debug, Clone)]
pub struct WeightedPicker {
    index: WeightedIndex<f64>,
}

impl WeightedPicker {
    /// None when no weight is positive.
    pub fn new(weights: &[f64]) -> Option<Self> {
        let clean = weights.iter().map(|w| if w.is_finite() && *w > 0.0 { *w } else { 0.0 });
        WeightedIndex::new(clean).ok().map(|index| Self { index })
    }

    /// Draws one index; indexes of weight 0 are never drawn.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        self.index.sample(rng)
    }
}

pub use crate::tools::stats::Zipf;

/// Exponential inter-arrival gap of a Poisson process with `rate` events per second.
pub fn exp_interarrival(rng: &mut impl Rng, rate: f64) -> Duration {
    let u: f64 = rng.random::<f64>(); // [0, 1)
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

/// Seed of worker `i`: distinct, deterministic streams from one `--seed`.
fn worker_seed(seed: u64, i: u64) -> u64 {
    // SplitMix64 finalizer over seed + i * golden gamma.
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Statistics and report
// ---------------------------------------------------------------------------------------------

pub use crate::tools::stats::{percentile, summarize, Summary};

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What one request produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request was sent.
    pub started: Instant,
    pub finished: Instant,
    /// Index of the mix entry it was drawn from.
    pub entry: usize,
    pub result: Result<(), (String, String)>,
    pub ttft: Option<Duration>,
    pub itl: Vec<Duration>,
    pub output_tokens: u64,
}

/// Per-entry counters of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EntryCounts {
    pub ok: u64,
    pub errors: u64,
    pub output_tokens: u64,
}

/// Request counters of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestCounts {
    pub ok: u64,
    pub errors: u64,
    pub dropped: u64,
    pub cancelled: u64,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: LoadMode,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub stream: bool,
    pub seed: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub requests: RequestCounts,
    pub errors_by_code: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub latency_ms: Summary,
    /// Counters per mix entry, keyed by the entry's `name` (or `entries[i]`).
    pub by_entry: BTreeMap<String, EntryCounts>,
}

/// Run settings echoed in the report.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub target: String,
    pub mode: LoadMode,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub stream: bool,
    pub seed: u64,
    pub warmup: Duration,
    /// Label of each mix entry (its `name`, or `entries[i]`).
    pub entry_names: Vec<String>,
}

/// Builds the report from the measured outcomes; `window_start` is the start of the measured
/// window and `stopped` when the run stopped (used as the end when nothing was recorded).
pub fn build_report(info: &RunInfo, outcomes: &[Outcome], dropped: u64, cancelled: u64, window_start: Instant, stopped: Instant) -> Report {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut errors_by_code = BTreeMap::new();
    let mut error_examples = BTreeMap::new();
    let (mut ok, mut errors, mut tokens) = (0u64, 0u64, 0u64);
    let (mut ttft, mut itl, mut latency) = (Vec::new(), Vec::new(), Vec::new());
    let mut end = window_start;
    let mut by_entry: BTreeMap<String, EntryCounts> = BTreeMap::new();
    for o in outcomes {
        end = end.max(o.finished);
        let name = info.entry_names.get(o.entry).cloned().unwrap_or_else(|| format!("entries[{}]", o.entry));
        let counts = by_entry.entry(name).or_default();
        match &o.result {
            Ok(()) => {
                counts.ok += 1;
                counts.output_tokens += o.output_tokens;
                ok += 1;
                tokens += o.output_tokens;
                latency.push(ms(o.finished.saturating_duration_since(o.started)));
                if let Some(t) = o.ttft {
                    ttft.push(ms(t));
                }
                itl.extend(o.itl.iter().map(|d| ms(*d)));
            }
            Err((code, msg)) => {
                counts.errors += 1;
                errors += 1;
                *errors_by_code.entry(code.clone()).or_insert(0) += 1;
                error_examples.entry(code.clone()).or_insert_with(|| msg.clone());
            }
        }
    }
    if outcomes.is_empty() {
        end = stopped.max(window_start);
    }
    let secs = end.saturating_duration_since(window_start).as_secs_f64();
    let per_s = |n: u64| if secs > 0.0 { round3(n as f64 / secs) } else { 0.0 };
    Report {
        target: info.target.clone(),
        mode: info.mode,
        concurrency: info.concurrency,
        rate: info.rate,
        stream: info.stream,
        seed: info.seed,
        warmup_s: round3(info.warmup.as_secs_f64()),
        duration_s: round3(secs),
        requests: RequestCounts { ok, errors, dropped, cancelled },
        errors_by_code,
        error_examples,
        output_tokens: tokens,
        output_tokens_per_s: per_s(tokens),
        requests_per_s: per_s(ok),
        ttft_ms: summarize(&ttft),
        itl_ms: summarize(&itl),
        latency_ms: summarize(&latency),
        by_entry,
    }
}

/// The gRPC status code's canonical name (`RESOURCE_EXHAUSTED`, ...).
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

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
    /// Measured requests sent so far (for --max-requests).
    issued: AtomicU64,
    outcomes: Mutex<Vec<Outcome>>,
    max_reached: tokio::sync::Notify,
}

struct Ctx {
    client: InferenceClient<Channel>,
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
        let mut client = self.client.clone();
        let timeout = self.request_timeout;
        let fut = async {
            if self.stream {
                stream_request(&mut client, req, started, timeout, &sh.live_tokens).await
            } else {
                unary_request(&mut client, req, started, timeout, &sh.live_tokens).await
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

type Measured = (Result<(), (String, String)>, Option<Duration>, Vec<Duration>, u64);

fn status_err(s: &tonic::Status) -> (String, String) {
    (code_name(s.code()).to_string(), s.message().to_string())
}

async fn stream_request(client: &mut InferenceClient<Channel>, req: pb::GenerateRequest, started: Instant, timeout: Duration, live: &AtomicU64) -> Measured {
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

async fn unary_request(client: &mut InferenceClient<Channel>, req: pb::GenerateRequest, started: Instant, timeout: Duration, live: &AtomicU64) -> Measured {
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

/// Runs the load generator.
pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let rate = match (args.mode, args.rate) {
        (LoadMode::Open, Some(r)) if r.is_finite() && r > 0.0 => Some(r),
        (LoadMode::Open, _) => bail!("--mode open needs --rate R (requests per second, > 0)"),
        (LoadMode::Closed, Some(_)) => bail!("--rate only applies to --mode open"),
        (LoadMode::Closed, None) => None,
    };
    let mix = Mix::load(&args.mix)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(drive(&args, mix, rate))?;
    // Cancel whatever still runs (requests past the grace period).
    rt.shutdown_timeout(Duration::from_millis(200));
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("--report {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

async fn drive(args: &LoadgenArgs, mix: Mix, rate: Option<f64>) -> anyhow::Result<Report> {
    let endpoint = Endpoint::from_shared(args.target.clone())
        .with_context(|| format!("--target {}", args.target))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {}", args.target))?;
    let client = InferenceClient::new(channel).max_decoding_message_size(64 << 20);

    let shared = Arc::new(Shared::default());
    let t0 = Instant::now();
    let window_start = t0 + args.warmup;
    let end = window_start + args.duration;
    let ctx = Arc::new(Ctx {
        client,
        mix,
        shared: shared.clone(),
        stream: args.stream,
        request_timeout: args.request_timeout,
        window_start,
        max_requests: args.max_requests,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));

    let progress = (!args.quiet).then(|| tokio::spawn(progress_loop(shared.clone(), t0, window_start, end)));

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
        mode: args.mode,
        concurrency: args.concurrency,
        rate,
        stream: args.stream,
        seed: args.seed,
        warmup: args.warmup,
        entry_names: ctx.mix.entry_names(),
    };
    Ok(build_report(&info, &outcomes, shared.dropped.load(Ordering::Relaxed), cancelled, window_start, stopped))
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
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration(" 0s ").unwrap(), Duration::ZERO);
        for bad in ["", "s", "10x", "-1s", "1s2", "abc", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn mix_parsing_and_validation() {
        let m = Mix::parse(
            r#"{"entries":[
                {"weight":3,"prompt":"hi","deltas":[{"id":"lora_a","scale":0.0}],"max_new_tokens":8},
                {"chat_user":"q","route":{"inventory":"poly","task":1},"temperature":0.5},
                {"weight":0,"token_ids":[1,2],"route":{"inventory":"poly","weights":[0.5,0.5]}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        let e = &m.entries[1];
        assert_eq!((e.weight, e.max_new_tokens), (1.0, 64));
        let r = build_request(&m.entries[0], m.entries[0].deltas.iter().map(|d| delta(&d.id, d.scale)).collect());
        assert_eq!(r.prompt, Some(pb::generate_request::Prompt::Text("hi".into())));
        assert_eq!(r.deltas, vec![pb::DeltaRef { module_id: "lora_a".into(), scale: 0.0, scale_is_set: true }]);
        assert_eq!(r.max_new_tokens, 8);
        let r = build_request(&m.entries[2], vec![]);
        assert_eq!(r.prompt, Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2] })));
        assert_eq!(r.route.unwrap().routing, Some(pb::poly_route::Routing::Weights(pb::RoutingWeights { values: vec![0.5, 0.5] })));
        let r = build_request(&m.entries[1], vec![]);
        assert_eq!(r.route.unwrap().routing, Some(pb::poly_route::Routing::TaskId(1)));

        for bad in [
            r#"{"entries":[]}"#,
            r#"{"entries":[{"prompt":"a","chat_user":"b"}]}"#,
            r#"{"entries":[{"weight":1}]}"#,
            r#"{"entries":[{"prompt":"a","weight":0}]}"#,
            r#"{"entries":[{"prompt":"a","weight":-1}]}"#,
            r#"{"entries":[{"prompt":"a","typo":1}]}"#,
            r#"{"entries":[{"token_ids":[]}]}"#,
            r#"{"entries":[{"prompt":"a","route":{"inventory":"p"}}]}"#,
            r#"{"entries":[{"prompt":"a","route":{"inventory":"p","task":1,"weights":[1]}}]}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"modules":[]}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"template":"m_{}"}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"template":"m","count":3}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"s":-1,"modules":["a"]}}"#,
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn weighted_picking_follows_weights_and_skips_zero() {
        let p = WeightedPicker::new(&[3.0, 0.0, 1.0]).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0usize; 3];
        for _ in 0..40_000 {
            counts[p.pick(&mut rng)] += 1;
        }
        assert_eq!(counts[1], 0);
        let frac = counts[0] as f64 / 40_000.0;
        assert!((frac - 0.75).abs() < 0.01, "{frac}");
        assert!(WeightedPicker::new(&[0.0, 0.0]).is_none());
        // A trailing zero weight is never picked either.
        let p = WeightedPicker::new(&[1.0, 0.0]).unwrap();
        assert!((0..1000).all(|_| p.pick(&mut rng) == 0));
    }

    #[test]
    fn zipf_popularity_and_seeded_determinism() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = StdRng::seed_from_u64(42);
        let n = 100_000;
        let mut counts = vec![0usize; 1000];
        for _ in 0..n {
            counts[z.sample(&mut rng)] += 1;
        }
        let h: f64 = (1..=1000).map(|k| 1.0 / k as f64).sum();
        let p0 = counts[0] as f64 / n as f64;
        assert!((p0 - 1.0 / h).abs() < 0.01, "rank 1: {p0} vs {}", 1.0 / h);
        let p1 = counts[1] as f64 / n as f64;
        assert!((p1 - 0.5 / h).abs() < 0.01, "rank 2: {p1}");
        assert!(counts[0] > counts[9] && counts[9] > counts[99]);
        // s = 0 is uniform.
        let u = Zipf::new(4, 0.0);
        let mut c = [0usize; 4];
        for _ in 0..40_000 {
            c[u.sample(&mut rng)] += 1;
        }
        assert!(c.iter().all(|x| (*x as f64 / 40_000.0 - 0.25).abs() < 0.01), "{c:?}");

        // The same seed draws the same request sequence.
        let mix = Mix::parse(r#"{"entries":[{"prompt":"a"},{"prompt":"b","weight":2}],"zipf":{"s":1.1,"template":"lora_{}","count":1000}}"#).unwrap();
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            (0..50).map(|_| mix.draw(&mut r).1).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        for r in draw(7) {
            assert_eq!(r.deltas.len(), 1);
            let id = &r.deltas[0].module_id;
            let k: usize = id.strip_prefix("lora_").unwrap().parse().unwrap();
            assert!(k < 1000);
        }
        assert_ne!(worker_seed(0, 0), worker_seed(0, 1));
    }

    #[test]
    fn poisson_gaps_have_the_right_mean() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 50_000;
        let total: f64 = (0..n).map(|_| exp_interarrival(&mut rng, 20.0).as_secs_f64()).sum();
        let mean = total / n as f64;
        assert!((mean - 0.05).abs() < 0.002, "{mean}");
    }

    #[test]
    fn percentiles_are_exact_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(90.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s, Summary { count: 5, mean: Some(3.0), p50: Some(3.0), p90: Some(5.0), p99: Some(5.0), min: Some(1.0), max: Some(5.0) });
        assert_eq!(summarize(&[]).p50, None);
    }

    #[test]
    fn report_counts_and_rates() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let ok = |start: u64, end: u64, tokens: u64| Outcome {
            started: at(start),
            finished: at(end),
            entry: 0,
            result: Ok(()),
            ttft: Some(Duration::from_millis(10)),
            itl: vec![Duration::from_millis(2); tokens.saturating_sub(1) as usize],
            output_tokens: tokens,
        };
        let err = Outcome {
            started: at(0),
            finished: at(5),
            entry: 1,
            result: Err(("RESOURCE_EXHAUSTED".into(), "queue full".into())),
            ttft: None,
            itl: vec![],
            output_tokens: 0,
        };
        let info = RunInfo { target: "http://127.0.0.1:1".into(), mode: LoadMode::Closed, concurrency: 2, rate: None, stream: true, seed: 0, warmup: Duration::ZERO, entry_names: vec!["a".into()] };
        let r = build_report(&info, &[ok(0, 1000, 10), ok(500, 2000, 30), err.clone(), err], 3, 1, t, at(2000));
        assert_eq!(r.requests, RequestCounts { ok: 2, errors: 2, dropped: 3, cancelled: 1 });
        assert_eq!(r.errors_by_code.get("RESOURCE_EXHAUSTED"), Some(&2));
        assert_eq!(r.output_tokens, 40);
        assert_eq!(r.duration_s, 2.0);
        assert_eq!(r.output_tokens_per_s, 20.0);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.latency_ms.p50, Some(1000.0));
        assert_eq!(r.latency_ms.max, Some(1500.0));
        assert_eq!(r.itl_ms.count, 38);
        assert_eq!(r.ttft_ms.mean, Some(10.0));
        assert_eq!(r.by_entry["a"], EntryCounts { ok: 2, errors: 0, output_tokens: 40 });
        assert_eq!(r.by_entry["entries[1]"], EntryCounts { ok: 0, errors: 2, output_tokens: 0 });
        let json = serde_json::to_value(&r).unwrap();
        for key in ["target", "mode", "concurrency", "duration_s", "requests", "errors_by_code", "output_tokens", "output_tokens_per_s", "requests_per_s", "ttft_ms", "itl_ms", "latency_ms"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(json["mode"], "closed");
        assert_eq!(json["requests"]["dropped"], 3);
        // Nothing recorded: the window up to the stop counts, rates are 0.
        let r = build_report(&info, &[], 0, 0, t, at(1500));
        assert_eq!((r.duration_s, r.requests_per_s, r.ttft_ms.p50), (1.5, 0.0, None));
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
    }

    #[test]
    fn fixture_mixes_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loadgen");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                Mix::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "fixture mixes in {}", dir.display());
    }

    #[test]
    fn cli_parses() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: LoadgenArgs,
        }
        let t = T::try_parse_from(["t", "--mix", "m.json", "--duration", "500ms", "--stream", "false", "--mode", "open", "--rate", "2.5"]).unwrap();
        assert_eq!(t.a.duration, Duration::from_millis(500));
        assert!(!t.a.stream);
        assert_eq!((t.a.mode, t.a.rate), (LoadMode::Open, Some(2.5)));
        let t = T::try_parse_from(["t", "--mix", "m.json"]).unwrap();
        assert!(t.a.stream);
        assert_eq!(t.a.concurrency, 8);
        assert!(T::try_parse_from(["t", "--mix", "m.json", "--duration", "5x"]).is_err());
    }
}
