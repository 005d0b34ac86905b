//! The JSON report of `modserve loadgen` (its fields are documented in [`super`]): what each
//! request produced ([`Outcome`]), aggregated into counters, rates and latency summaries.
//!
//! Invariants: the report aggregates exactly the outcomes it is given (the driver records only
//! requests that started in the measured window); latency, TTFT and ITL samples and token counts
//! come from successful requests only; percentiles are exact nearest-rank values
//! ([`crate::tools::stats`]).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::Code;

use super::args::{LoadMode, Protocol};

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
    pub protocol: Protocol,
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
    /// Tokens that arrived inside the measured window, from any request (also those started in
    /// the warm-up or still running at its end), per second of the window (its start to the
    /// stop). Unlike `output_tokens_per_s` it does not depend on where the requests' ends fall:
    /// closed-loop streams of equal length run in waves, and whole waves in or out of the
    /// request count moved that figure by up to a fifth.
    pub window_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub latency_ms: Summary,
    /// Counters per mix entry, keyed by the entry's `name` (or `entries[i]`).
    pub by_entry: BTreeMap<String, EntryCounts>,
}

/// What one request gave: its result (or gRPC-style code and message), TTFT, inter-token gaps
/// and output tokens.
pub type Measured = (Result<(), (String, String)>, Option<Duration>, Vec<Duration>, u64);

/// Run settings echoed in the report.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub target: String,
    pub protocol: Protocol,
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
/// window and `stopped` when the run stopped (used as the end when nothing was recorded);
/// `window_tokens` the tokens that arrived between the two.
pub fn build_report(
    info: &RunInfo,
    outcomes: &[Outcome],
    (dropped, cancelled): (u64, u64),
    (window_start, stopped): (Instant, Instant),
    window_tokens: u64,
) -> Report {
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
        protocol: info.protocol,
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
        window_tokens_per_s: match stopped.saturating_duration_since(window_start).as_secs_f64() {
            w if w > 0.0 => round3(window_tokens as f64 / w),
            _ => 0.0,
        },
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            s,
            Summary { count: 5, mean: Some(3.0), p50: Some(3.0), p90: Some(5.0), p99: Some(5.0), min: Some(1.0), max: Some(5.0) }
        );
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
        let info = RunInfo {
            target: "http://127.0.0.1:1".into(),
            protocol: Protocol::Grpc,
            mode: LoadMode::Closed,
            concurrency: 2,
            rate: None,
            stream: true,
            seed: 0,
            warmup: Duration::ZERO,
            entry_names: vec!["a".into()],
        };
        let r = build_report(&info, &[ok(0, 1000, 10), ok(500, 2000, 30), err.clone(), err], (3, 1), (t, at(2000)), 50);
        assert_eq!(r.requests, RequestCounts { ok: 2, errors: 2, dropped: 3, cancelled: 1 });
        assert_eq!(r.errors_by_code.get("RESOURCE_EXHAUSTED"), Some(&2));
        assert_eq!(r.output_tokens, 40);
        assert_eq!(r.duration_s, 2.0);
        assert_eq!(r.output_tokens_per_s, 20.0);
        assert_eq!(r.window_tokens_per_s, 25.0);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.latency_ms.p50, Some(1000.0));
        assert_eq!(r.latency_ms.max, Some(1500.0));
        assert_eq!(r.itl_ms.count, 38);
        assert_eq!(r.ttft_ms.mean, Some(10.0));
        assert_eq!(r.by_entry["a"], EntryCounts { ok: 2, errors: 0, output_tokens: 40 });
        assert_eq!(r.by_entry["entries[1]"], EntryCounts { ok: 0, errors: 2, output_tokens: 0 });
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "target",
            "mode",
            "concurrency",
            "duration_s",
            "requests",
            "errors_by_code",
            "output_tokens",
            "output_tokens_per_s",
            "window_tokens_per_s",
            "requests_per_s",
            "ttft_ms",
            "itl_ms",
            "latency_ms",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(json["mode"], "closed");
        assert_eq!(json["requests"]["dropped"], 3);
        // Nothing recorded: the window up to the stop counts, rates are 0.
        let r = build_report(&info, &[], (0, 0), (t, at(1500)), 0);
        assert_eq!((r.duration_s, r.requests_per_s, r.ttft_ms.p50, r.window_tokens_per_s), (1.5, 0.0, None, 0.0));
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
    }
}
