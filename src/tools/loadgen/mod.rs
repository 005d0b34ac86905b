//! `modserve loadgen`: a gRPC (or OpenAI HTTP, `--protocol http`) load generator that replays a mix of prompts and adapter
//! compositions against a running `modserve serve` and prints one JSON report on stdout.
//!
//! # Usage
//!
//! ```text
//! modserve loadgen --target http://127.0.0.1:50051 --mix tests/fixtures/loadgen/mixed.json \
//!     [--concurrency 8] [--duration 30s] [--mode closed|open] [--rate 4.0] [--max-requests N] \
//!     [--warmup 5s] [--report out.json] [--stream true|false] [--seed 0] \
//!     [--request-timeout 120s] [--grace 10s] [--protocol grpc|http]
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
//! output_tokens, output_tokens_per_s, window_tokens_per_s, requests_per_s, ttft_ms, itl_ms, latency_ms, by_entry
//! {NAME: {ok, errors, output_tokens}}` where each `*_ms` is `{count, mean, p50, p90, p99, min,
//! max}` (null values when there are no samples). Error codes are gRPC code names, plus
//! `INCOMPLETE` for a stream that ended without a finish_reason.
//! Percentiles are exact nearest-rank values over all recorded samples of successful requests.
//! `duration_s` runs from the start of the measured window to the end of its last request;
//! `output_tokens` counts the generated tokens of successful requests only.
//! `window_tokens_per_s` counts every token that arrived inside the window (any request's) per
//! second of the window: the figure to compare with peers measured the same way.
//!
//! # Code
//!
//! `args.rs` (the options), `mix.rs` (the mix file, drawing requests), `driver.rs` (the loops and
//! the gRPC calls), `report.rs` (aggregating outcomes into the report); [`run`] ties them together.
use std::time::Duration;

use anyhow::{bail, Context};

mod args;
mod driver;
mod http;
mod mix;
mod report;

pub use args::{parse_duration, LoadMode, LoadgenArgs};
use driver::drive;
pub use driver::exp_interarrival;
pub use mix::{Mix, MixDelta, MixEntry, MixFile, MixRoute, WeightedPicker, Zipf, ZipfSpec};
pub use report::{build_report, code_name, percentile, summarize, EntryCounts, Outcome, Report, RequestCounts, RunInfo, Summary};

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
