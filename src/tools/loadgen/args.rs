//! `modserve loadgen` command-line options: the [`LoadgenArgs`] clap derive, the [`LoadMode`] and
//! the duration syntax of `--duration`, `--warmup`, `--request-timeout` and `--grace`.
//!
//! Invariant: every value clap accepts here is well-formed (durations are finite and >= 0);
//! cross-flag rules (`--rate` only with `--mode open`, ...) are checked by [`super::run`].
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

/// The protocol requests are sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Grpc,
    Http,
}

/// Load generator options.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Server URL: the gRPC address (plain HTTP/2, e.g. http://127.0.0.1:50051), or with
    /// `--protocol http` the OpenAI HTTP API's (e.g. http://127.0.0.1:8080).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// grpc: `Inference.GenerateStream` / `Generate`; http: the OpenAI API (`/v1/completions`,
    /// `/v1/chat/completions`, server-sent events when streaming) of a server with --http-listen.
    #[arg(long, value_enum, default_value = "grpc")]
    pub protocol: Protocol,
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
    fn cli_parses() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: LoadgenArgs,
        }
        let t = T::try_parse_from(["t", "--mix", "m.json", "--duration", "500ms", "--stream", "false", "--mode", "open", "--rate", "2.5"])
            .unwrap();
        assert_eq!(t.a.duration, Duration::from_millis(500));
        assert!(!t.a.stream);
        assert_eq!((t.a.mode, t.a.rate), (LoadMode::Open, Some(2.5)));
        let t = T::try_parse_from(["t", "--mix", "m.json"]).unwrap();
        assert!(t.a.stream);
        assert_eq!(t.a.concurrency, 8);
        assert!(T::try_parse_from(["t", "--mix", "m.json", "--duration", "5x"]).is_err());
    }
}
