//! Where a batch step's time goes: a `tracing` layer that sums the wall time of the phase spans
//! (target [`crate::model::PHASE`]: `decode_step` / `prefill_step` around a whole step, and in
//! it `embed`, `attn_norm`, `qkv`, `attention`, `o_proj`, `mlp_norm`, `gate_up`, `act`, `down`,
//! `head`, `sample`, and `deltas` on the pool thread computing adapter deltas beside a base
//! product), as candle's `with_tracing` wrappers do for its models. `modserve bench --profile`
//! installs it and prints one table per scenario.
//!
//! Invariants: without the layer the phase spans are disabled at their call sites (they are
//! `trace` level and no other layer enables that target), so they cost a cached interest check.
//! Times are per span name, grouped by the step span the phase ran under (a span entered on
//! another thread names its step parent explicitly); re-entries of one span add up.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::span;
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Totals of one (step kind, phase) pair.
#[derive(Debug, Default, Clone, Copy)]
pub struct PhaseTotal {
    /// Times the span was entered.
    pub count: u64,
    pub total: Duration,
}

/// `(step kind, phase) -> totals`; the step spans themselves are keyed `(kind, kind)`.
pub type PhaseTable = BTreeMap<(&'static str, &'static str), PhaseTotal>;

/// The process's table (`main` installs its layer for `bench --profile`).
pub fn global() -> &'static PhaseTimes {
    static TIMES: std::sync::OnceLock<PhaseTimes> = std::sync::OnceLock::new();
    TIMES.get_or_init(PhaseTimes::default)
}

/// The shared table the layer writes and the bench reads.
#[derive(Clone, Default)]
pub struct PhaseTimes(Arc<Mutex<PhaseTable>>);

impl PhaseTimes {
    /// Takes the totals so far and starts a new table.
    pub fn take(&self) -> PhaseTable {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The layer that fills this table, filtered to the phase spans.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        PhaseLayer(self.clone()).with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == crate::model::PHASE))
    }
}

struct PhaseLayer(PhaseTimes);

/// When the span was last entered (in the span's extensions).
struct Entered(Instant);

impl<S> Layer<S> for PhaseLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(Entered(Instant::now()));
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(Entered(t0)) = span.extensions_mut().remove::<Entered>() else { return };
        let elapsed = t0.elapsed();
        let root = span.scope().from_root().next().map_or(span.name(), |r| r.name());
        let mut table = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        let e = table.entry((root, span.name())).or_default();
        e.count += 1;
        e.total += elapsed;
    }
}

/// True for the phases that run on a pool thread beside the step's own phases (`deltas`, beside
/// the base product of the projections): their time overlaps the step's instead of adding to it.
fn overlaps_the_step(phase: &str) -> bool {
    phase == "deltas"
}

/// The table as markdown: per step kind, its steps and mean step time, then each phase's share.
/// Phases run inside the step on the model thread unless marked: `deltas` runs on a pool thread
/// at the same time as the base product of `qkv` / `o_proj` / `gate_up` / `down`, so its time is
/// part of theirs rather than added to it.
pub fn render(table: &PhaseTable) -> String {
    let mut out = String::new();
    let kinds: Vec<&'static str> = table.keys().filter(|(k, p)| k == p).map(|(k, _)| *k).collect();
    for kind in kinds {
        let step = table[&(kind, kind)];
        if step.count == 0 {
            continue;
        }
        let step_ms = step.total.as_secs_f64() * 1e3;
        out.push_str(&format!(
            "\n{kind}: {} steps, {:.2} ms per step, {:.0} ms in all\n\n| phase | entries per step | ms per step | share of the step |\n|---|---:|---:|---:|\n",
            step.count,
            step_ms / step.count as f64,
            step_ms
        ));
        let mut phases: Vec<(&'static str, PhaseTotal)> =
            table.iter().filter(|((k, p), _)| *k == kind && p != k).map(|((_, p), t)| (*p, *t)).collect();
        phases.sort_by_key(|p| std::cmp::Reverse(p.1.total));
        let mut inside = Duration::ZERO;
        for (p, t) in &phases {
            let ms = t.total.as_secs_f64() * 1e3;
            let concurrent = overlaps_the_step(p);
            if !concurrent {
                inside += t.total;
            }
            out.push_str(&format!(
                "| {p}{} | {:.1} | {:.2} | {:.1}% |\n",
                if concurrent { " (pool thread, overlaps the projections)" } else { "" },
                t.count as f64 / step.count as f64,
                ms / step.count as f64,
                100.0 * ms / step_ms
            ));
        }
        let rest = step.total.saturating_sub(inside).as_secs_f64() * 1e3;
        out.push_str(&format!(
            "| (rest of the step: residual adds, batch assembly, logits copy) | - | {:.2} | {:.1}% |\n",
            rest / step.count as f64,
            100.0 * rest / step_ms
        ));
    }
    out
}

/// The table as JSON (the bench's `--json` carries one per profiled run): per step kind,
/// `{"steps": N, "ms_per_step": x, "phases": {phase: {"entries_per_step": e, "ms_per_step": m,
/// "concurrent": bool}}}`, `concurrent` marking the phases [`render`] marks (`deltas`). Kinds with no step
/// are left out, as in the markdown.
pub fn to_json(table: &PhaseTable) -> serde_json::Value {
    let mut kinds = serde_json::Map::new();
    for (&(kind, _), step) in table.iter().filter(|((k, p), t)| k == p && t.count > 0) {
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / step.count as f64;
        let phases: serde_json::Map<String, serde_json::Value> = table
            .iter()
            .filter(|((k, p), _)| *k == kind && *p != kind)
            .map(|((_, p), t)| {
                let v = serde_json::json!({
                    "entries_per_step": t.count as f64 / step.count as f64,
                    "ms_per_step": per_step(t.total),
                    "concurrent": overlaps_the_step(p),
                });
                (p.to_string(), v)
            })
            .collect();
        kinds.insert(kind.to_string(), serde_json::json!({"steps": step.count, "ms_per_step": per_step(step.total), "phases": phases}));
    }
    serde_json::Value::Object(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn phases_add_up_under_their_step_and_other_targets_are_ignored() {
        let times = PhaseTimes::default();
        let subscriber = tracing_subscriber::registry().with(times.layer());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                let step = tracing::trace_span!(target: crate::model::PHASE, "decode_step");
                let _s = step.enter();
                for _ in 0..2 {
                    let _q = tracing::trace_span!(target: crate::model::PHASE, "qkv").entered();
                    std::thread::sleep(Duration::from_millis(2));
                }
                // A phase on another thread, parented explicitly (the server's subscriber is
                // global; this test's is scoped, so the thread is handed it).
                let dispatch = tracing::dispatcher::get_default(|d| d.clone());
                std::thread::scope(|sc| {
                    sc.spawn(|| {
                        tracing::dispatcher::with_default(&dispatch, || {
                            let _d = tracing::trace_span!(target: crate::model::PHASE, parent: &step, "deltas").entered();
                            std::thread::sleep(Duration::from_millis(1));
                        })
                    });
                });
                let _other = tracing::trace_span!("not_a_phase").entered();
            }
        });
        let t = times.take();
        assert_eq!(t[&("decode_step", "decode_step")].count, 3);
        assert_eq!(t[&("decode_step", "qkv")].count, 6);
        assert!(t[&("decode_step", "qkv")].total >= Duration::from_millis(12));
        assert_eq!(t[&("decode_step", "deltas")].count, 3);
        assert!(!t.keys().any(|(_, p)| *p == "not_a_phase"));
        assert!(t[&("decode_step", "decode_step")].total >= t[&("decode_step", "qkv")].total);
        let md = render(&t);
        assert!(md.contains("decode_step: 3 steps"), "{md}");
        assert!(md.contains("| qkv | 2.0 |"), "{md}");
        let js = to_json(&t);
        assert_eq!(js["decode_step"]["steps"], 3);
        assert_eq!(js["decode_step"]["phases"]["qkv"]["entries_per_step"], 2.0);
        assert!(js["decode_step"]["phases"]["qkv"]["ms_per_step"].as_f64().unwrap() >= 4.0);
        assert!(js["decode_step"]["ms_per_step"].as_f64().unwrap() >= js["decode_step"]["phases"]["qkv"]["ms_per_step"].as_f64().unwrap());
        assert_eq!(js["decode_step"]["phases"]["deltas"]["concurrent"], true);
        assert_eq!(js["decode_step"]["phases"]["qkv"]["concurrent"], false);
        assert!(times.take().is_empty(), "take() starts a new table");
    }
}
