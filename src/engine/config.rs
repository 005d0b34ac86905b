//! Sizing of the engine ([`EngineConfig`]): queue and running limits, batch and prefill sizes, the
//! decode-stall bound, stream buffering and the KV-memory budget. Plain data; the actor enforces it.
use std::time::Duration;

/// Sizing of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_queued: usize,
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    /// Latency that prefill rows may add to a step that also carries decode tokens (sized by
    /// `StepCostModel` from measured step costs; at least one prefill row per step). None: no
    /// limit beyond `max_batch_tokens` / `prefill_chunk`.
    pub max_decode_stall: Option<Duration>,
    /// Events buffered per request before the sequence pauses.
    pub stream_buffer: usize,
    pub slow_client_timeout: Duration,
    /// KV-cache memory of all running sequences together, in bytes (0 = unlimited).
    pub max_kv_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queued: 256,
            max_running: 64,
            max_batch_tokens: 512,
            prefill_chunk: 256,
            max_decode_stall: Some(Duration::from_millis(DEFAULT_MAX_DECODE_STALL_MS)),
            stream_buffer: 64,
            slow_client_timeout: Duration::from_secs(30),
            max_kv_bytes: 0,
        }
    }
}

/// Default of `--max-decode-stall-ms`. The planner aims at 80% of it. On a 2-core VM the host
/// alone adds 15-40 ms to a decoding stream's worst gap in a second (the bench's noise floor), so
/// the worst of ten 256-token prompts arriving under load stalled its decoders 52-62 ms in three
/// of seven runs at 40, and at most 46 ms in seven runs at 30 (docs/BENCHMARKS.md), for about a
/// quarter more time to first token.
pub const DEFAULT_MAX_DECODE_STALL_MS: u64 = 30;

/// `--max-decode-stall-ms` as [`EngineConfig::max_decode_stall`] (0 = off).
pub fn decode_stall(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}
