//! Batching policy, pure and testable without a model: which running sequences feed how many
//! tokens in the next step, and how many prefill rows a step that carries decode tokens may take.
//!
//! Invariants: the planned tokens never exceed `max_batch_tokens` (except that one sequence may
//! always make progress when the budget is smaller than a single decode token); every decoding
//! sequence that is not blocked gets its one token before any prefill chunk is planned; prefill is
//! first-come first-served. Stall-free batching (Sarathi-style): when a step carries decode
//! tokens, its prefill rows are capped by `prefill_rows_with_decodes` (sized by [`StepCostModel`]
//! so that they add at most `--max-decode-stall-ms` to the step), never below one row, so a
//! waiting prompt always makes progress and decode streams stall by a bounded amount; a step
//! without decode tokens prefills with full chunks. An idle engine gathers a burst of arrivals
//! before its first step ([`gather_burst`]).

use std::time::{Duration, Instant};

/// Poll period of [`gather_burst`]: what a lone request waits (a fiftieth of a step on the
/// reference model on 2 cores), and the largest gap between two requests of one burst.
const BURST_TICK: Duration = Duration::from_micros(500);

/// Longest wait of [`gather_burst`].
const BURST_MAX: Duration = Duration::from_millis(5);

/// After an idle engine's first arrival (`queued`: how many more wait in its queue): waits while
/// more requests keep arriving (the queue grew during the last [`BURST_TICK`]), at most
/// [`BURST_MAX`], so that a burst of requests sent together is admitted together. Without it
/// the step started on the first request alone: its prompt became a decoding stream, and the
/// rest of the burst's prompts then ran in stall-capped steps beside it (26 steps with prefill
/// rows for 32 prompts instead of 8, and a tenth less throughput for the burst in `modserve
/// bench`, in some runs and not others). A lone request waits one tick.
pub fn gather_burst(queued: impl Fn() -> usize) {
    let t0 = Instant::now();
    let mut seen = queued();
    loop {
        std::thread::sleep(BURST_TICK);
        let now = queued();
        if now == seen || t0.elapsed() >= BURST_MAX {
            break;
        }
        seen = now;
    }
}

/// What the scheduler knows of one running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Prompt tokens not yet in the KV cache (0 = decoding).
    pub pending_prompt: usize,
    /// Cannot run now (its client has not read the previous tokens yet).
    pub blocked: bool,
}

/// Step budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    /// Largest number of prefill rows (all prompts together) in a step that also carries decode
    /// tokens; at least one is always allowed. `usize::MAX`: no cap (the prefill chunks alone).
    pub prefill_rows_with_decodes: usize,
}

impl StepBudget {
    /// A budget without the decode-stall cap.
    pub fn uncapped(max_batch_tokens: usize, prefill_chunk: usize) -> Self {
        Self { max_batch_tokens, prefill_chunk, prefill_rows_with_decodes: usize::MAX }
    }
}

/// Tokens per sequence for the next step (0 = sits out), in the order of `seqs`.
pub fn plan_step(seqs: &[SeqState], budget: StepBudget) -> Vec<usize> {
    let mut plan = vec![0; seqs.len()];
    let mut left = budget.max_batch_tokens.max(1);
    let mut decodes = 0;
    for (i, s) in seqs.iter().enumerate() {
        if !s.blocked && s.pending_prompt == 0 && left > 0 {
            plan[i] = 1;
            left -= 1;
            decodes += 1;
        }
    }
    if decodes > 0 {
        left = left.min(budget.prefill_rows_with_decodes.max(1));
    }
    for (i, s) in seqs.iter().enumerate() {
        if left == 0 {
            break;
        }
        if !s.blocked && s.pending_prompt > 0 {
            let n = s.pending_prompt.min(budget.prefill_chunk.max(1)).min(left);
            plan[i] = n;
            left -= n;
        }
    }
    plan
}

/// Exponentially weighted least-squares line `y = a + b x` over recent samples.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl Fit {
    /// Weighted variance of `x` below which the slope is not trusted.
    const MIN_VAR: f64 = 4.0;

    fn add(&mut self, x: f64, y: f64, forget: f64) {
        self.w = self.w * forget + 1.0;
        self.sx = self.sx * forget + x;
        self.sy = self.sy * forget + y;
        self.sxx = self.sxx * forget + x * x;
        self.sxy = self.sxy * forget + x * y;
    }

    /// `y` at `x`: the fitted line when the samples spread enough in `x` and its slope is not
    /// negative, else the mean `y` scaled by `x / mean x` (exact when `x` did not vary). None
    /// without samples near `x` (within two standard deviations plus a quarter of the mean).
    fn predict(&self, x: f64) -> Option<f64> {
        if self.w <= 0.0 || self.sx <= 0.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let var = self.sxx / self.w - mx * mx;
        if (x - mx).abs() > 2.0 * var.max(0.0).sqrt() + (0.25 * mx).max(1.0) {
            return None;
        }
        if var >= Self::MIN_VAR {
            let slope = (self.sxy / self.w - mx * my) / var;
            if slope >= 0.0 {
                return Some(my + slope * (x - mx));
            }
        }
        Some(my * x / mx)
    }
}

/// Attended keys of a prefill chunk of `rows` tokens whose first token is at position `pos`:
/// token `pos + i` attends to `pos + i + 1` keys.
pub fn chunk_keys(pos: usize, rows: usize) -> usize {
    rows.saturating_mul(pos).saturating_add(rows.saturating_mul(rows.saturating_add(1)) / 2)
}

/// What a step costs, measured, to size the prefill share of steps that carry decode tokens.
///
/// Feedback, not a kernel model (costs depend on the kernels, adapters and the machine's load):
/// decode-only steps give the baseline `t(decode rows)` (a weighted line over recent such steps);
/// every mixed step gives a sample of what its prefill chunk added, `step - t(its decode rows)`.
/// Those extras are fitted (weighted least squares over recent mixed steps, both coefficients
/// non-negative) as `row_s * rows + key_s * keys`, `keys` being the positions the chunk's tokens
/// attend to ([`chunk_keys`]): a chunk deep into a long prompt costs more per row than the first
/// one, mostly on CPUs. A budget that was too generous shows up as a larger extra at the next
/// mixed step and shrinks the one after. Before any mixed step (or without a baseline near the
/// step's decode rows), the average cost per row of recent steps stands in.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepCostModel {
    decode: Fit,
    // Weighted sums over mixed steps of rows (n), keys (k) and extra seconds (e).
    s_nn: f64,
    s_nk: f64,
    s_kk: f64,
    s_ne: f64,
    s_ke: f64,
    all_s: f64,
    all_rows: f64,
}

/// Fitted cost of prefill rows in a step that carries decode tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillCost {
    /// Seconds per prefill row (projections, MLP).
    pub row_s: f64,
    /// Seconds per attended key of a prefill row (attention).
    pub key_s: f64,
}

impl PrefillCost {
    /// Predicted seconds of a chunk of `rows` tokens starting at position `pos`.
    pub fn chunk_s(&self, pos: usize, rows: usize) -> f64 {
        let (n, p) = (rows as f64, pos as f64);
        self.row_s * n + self.key_s * (n * p + n * (n + 1.0) / 2.0)
    }

    /// Largest chunk starting at `pos` predicted to cost at most `budget_s` (saturating; may
    /// be 0).
    pub fn rows_within(&self, pos: usize, budget_s: f64) -> usize {
        // key_s/2 n² + (row_s + key_s (pos + 1/2)) n <= budget, in the stable form of the root.
        let b = self.row_s + self.key_s * (pos as f64 + 0.5);
        let n = 2.0 * budget_s / (b + (b * b + 2.0 * self.key_s * budget_s).sqrt());
        // Float-to-int casts saturate (and map NaN to 0).
        let mut rows = n as usize;
        // Guard the rounding of the root.
        while rows > 0 && rows < 1 << 40 && self.chunk_s(pos, rows) > budget_s * (1.0 + 1e-9) {
            rows -= 1;
        }
        rows
    }
}

impl StepCostModel {
    /// Weight kept by past steps at each new one (about the last 20 steps count).
    const FORGET: f64 = 0.95;
    /// Share of the target that prefill rows are planned for; the rest absorbs estimation error
    /// and step-time jitter.
    pub const HEADROOM: f64 = 0.8;
    /// Prefill share of a decode step before any step was measured.
    pub const FIRST_ROWS: usize = 16;

    /// Records one step that carried `decode_rows` decode tokens and `prefill_rows` prompt
    /// tokens attending to `prefill_keys` positions in all ([`chunk_keys`]), and took `secs`.
    pub fn observe(&mut self, decode_rows: usize, prefill_rows: usize, prefill_keys: usize, secs: f64) {
        let rows = decode_rows + prefill_rows;
        if rows == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let f = Self::FORGET;
        self.all_s = self.all_s * f + secs;
        self.all_rows = self.all_rows * f + rows as f64;
        if prefill_rows == 0 {
            self.decode.add(decode_rows as f64, secs, f);
        } else if decode_rows > 0 {
            if let Some(base) = self.decode.predict(decode_rows as f64) {
                let (n, k, e) = (prefill_rows as f64, prefill_keys.max(prefill_rows) as f64, (secs - base).max(0.0));
                self.s_nn = self.s_nn * f + n * n;
                self.s_nk = self.s_nk * f + n * k;
                self.s_kk = self.s_kk * f + k * k;
                self.s_ne = self.s_ne * f + n * e;
                self.s_ke = self.s_ke * f + k * e;
            }
        }
    }

    /// The fitted cost of prefill rows in decode steps (None before a mixed step was measured).
    pub fn prefill_cost(&self) -> Option<PrefillCost> {
        if self.s_nn <= 0.0 || self.s_kk <= 0.0 {
            return None;
        }
        let rows_only = PrefillCost { row_s: self.s_ne / self.s_nn, key_s: 0.0 };
        let keys_only = PrefillCost { row_s: 0.0, key_s: self.s_ke / self.s_kk };
        let det = self.s_nn * self.s_kk - self.s_nk * self.s_nk;
        // Rows and keys grew together (one chunk shape only): rows alone.
        if det <= 1e-3 * self.s_nn * self.s_kk {
            return Some(rows_only);
        }
        let row_s = (self.s_ne * self.s_kk - self.s_ke * self.s_nk) / det;
        let key_s = (self.s_ke * self.s_nn - self.s_ne * self.s_nk) / det;
        Some(match (row_s >= 0.0, key_s >= 0.0) {
            (true, true) => PrefillCost { row_s, key_s },
            (false, _) => keys_only,
            (_, false) => rows_only,
        })
    }

    /// Average seconds per row of recent steps, fixed costs included (None before any step).
    pub fn avg_row_s(&self) -> Option<f64> {
        (self.all_rows > 0.0).then(|| self.all_s / self.all_rows)
    }

    /// Prefill rows a step carrying decode tokens may take, for a chunk starting at position
    /// `pos` (the oldest waiting prompt's), so that they are expected to add at most `HEADROOM *
    /// target` to it (at least 1); `None` target: no cap.
    pub fn prefill_rows(&self, target: Option<Duration>, pos: usize) -> usize {
        let Some(target) = target else { return usize::MAX };
        let budget = target.as_secs_f64() * Self::HEADROOM;
        match (self.prefill_cost(), self.avg_row_s()) {
            (Some(c), _) => c.rows_within(pos, budget).max(1),
            // No mixed step measured yet (or no decode-only baseline near this many decode
            // rows): the average cost per row of recent steps stands in. Float-to-int casts
            // saturate.
            (None, Some(avg)) if avg > 0.0 => ((budget / avg) as usize).max(1),
            _ => Self::FIRST_ROWS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(pending: usize, blocked: bool) -> SeqState {
        SeqState { pending_prompt: pending, blocked }
    }

    fn prefill_rows(plan: &[usize], seqs: &[SeqState]) -> usize {
        plan.iter().zip(seqs).filter(|(_, s)| s.pending_prompt > 0).map(|(p, _)| *p).sum()
    }

    #[test]
    fn decodes_first_then_chunked_prefill_fcfs() {
        let b = StepBudget::uncapped(10, 4);
        let plan = plan_step(&[st(100, false), st(0, false), st(3, false), st(0, true), st(0, false)], b);
        assert_eq!(plan, vec![4, 1, 3, 0, 1]);
        let plan = plan_step(&[st(100, false), st(100, false), st(0, false)], StepBudget::uncapped(6, 4));
        assert_eq!(plan, vec![4, 1, 1]);
    }

    #[test]
    fn decode_steps_cap_prefill_rows_and_prefill_only_steps_do_not() {
        let b = StepBudget { max_batch_tokens: 512, prefill_chunk: 256, prefill_rows_with_decodes: 10 };
        // 31 decoders and a 256-token prompt: the prompt gets 10 rows.
        let mut seqs = vec![st(0, false); 31];
        seqs.push(st(256, false));
        let plan = plan_step(&seqs, b);
        assert_eq!(plan[31], 10);
        assert_eq!(plan.iter().sum::<usize>(), 41);
        // The cap is shared first-come first-served by the waiting prompts.
        let plan = plan_step(&[st(4, false), st(0, false), st(100, false)], b);
        assert_eq!(plan, vec![4, 1, 6]);
        // Every decoder blocked: no decode tokens, so the prompt gets its full chunk.
        let plan = plan_step(&[st(0, true), st(300, false)], b);
        assert_eq!(plan, vec![0, 256]);
        // A cap of 0 still lets a prompt make progress.
        let plan = plan_step(&[st(0, false), st(300, false)], StepBudget { prefill_rows_with_decodes: 0, ..b });
        assert_eq!(plan, vec![1, 1]);
    }

    #[test]
    fn fit_predicts_near_its_samples_only() {
        let mut f = Fit::default();
        assert_eq!(f.predict(3.0), None);
        for i in 0..40 {
            let x = [10.0, 20.0, 31.0][i % 3];
            f.add(x, 0.01 + 0.002 * x, 0.95);
        }
        assert!((f.predict(25.0).unwrap() - 0.06).abs() < 1e-9);
        assert!((f.predict(40.0).unwrap() - 0.09).abs() < 1e-9);
        assert_eq!(f.predict(100.0), None, "no extrapolation far from the samples");
        // No spread in x: the mean, scaled, near it.
        let mut f = Fit::default();
        for _ in 0..10 {
            f.add(31.0, 0.05, 0.95);
        }
        assert!((f.predict(31.0).unwrap() - 0.05).abs() < 1e-12);
        assert!((f.predict(34.1).unwrap() - 0.055).abs() < 1e-12);
        assert_eq!(f.predict(21.0), None);
        // A negative slope (noise) is not followed.
        let mut f = Fit::default();
        f.add(10.0, 0.2, 1.0);
        f.add(100.0, 0.1, 1.0);
        assert!((f.predict(55.0).unwrap() - 0.15).abs() < 1e-12);
    }

    #[test]
    fn chunk_cost_and_rows_within_a_budget() {
        assert_eq!(chunk_keys(0, 1), 1);
        assert_eq!(chunk_keys(0, 4), 1 + 2 + 3 + 4);
        assert_eq!(chunk_keys(10, 3), 11 + 12 + 13);
        let c = PrefillCost { row_s: 0.0006, key_s: 0.000_003_75 };
        for pos in [0, 1, 17, 200, 4000] {
            for budget in [0.0, 0.0001, 0.04, 0.5] {
                let n = c.rows_within(pos, budget);
                assert!(c.chunk_s(pos, n) <= budget * (1.0 + 1e-9), "pos {pos} budget {budget}: {n}");
                assert!(c.chunk_s(pos, n + 1) > budget, "pos {pos} budget {budget}: {n} is the largest");
            }
        }
        // Deeper into a prompt, fewer rows fit.
        assert!(c.rows_within(0, 0.04) > c.rows_within(200, 0.04));
        assert_eq!(PrefillCost { row_s: 0.0, key_s: 0.0 }.rows_within(5, 0.04), usize::MAX);
        assert_eq!(PrefillCost { row_s: 0.01, key_s: 0.0 }.rows_within(5, 0.04), 4);
    }

    #[test]
    fn cost_model_measures_what_prefill_rows_add() {
        let target = Some(Duration::from_millis(50));
        let mut m = StepCostModel::default();
        assert_eq!(m.prefill_rows(target, 0), StepCostModel::FIRST_ROWS);
        assert_eq!(m.prefill_rows(None, 0), usize::MAX);
        // Decode-only steps: 20 ms + 1 ms per decode row. Before a mixed step, the average cost
        // per row sizes the chunk.
        for _ in 0..20 {
            m.observe(31, 0, 0, 0.020 + 0.001 * 31.0);
        }
        assert_eq!(m.prefill_cost(), None);
        assert_eq!(m.prefill_rows(target, 0), (0.04 / (0.051 / 31.0)) as usize);
        // A prompt's chunks cost 0.6 ms per row plus 4 µs per attended key.
        let truth = PrefillCost { row_s: 0.0006, key_s: 0.000_004 };
        let mut pos = 0;
        for n in [16, 40, 40, 35, 30] {
            m.observe(31, n, chunk_keys(pos, n), 0.020 + 0.001 * 31.0 + truth.chunk_s(pos, n));
            pos += n;
        }
        let c = m.prefill_cost().unwrap();
        assert!((c.row_s - truth.row_s).abs() < 1e-9 && (c.key_s - truth.key_s).abs() < 1e-12, "{c:?}");
        for pos in [0, 100, 1000] {
            assert_eq!(m.prefill_rows(target, pos), truth.rows_within(pos, 0.05 * StepCostModel::HEADROOM).max(1));
        }
        assert_eq!(m.prefill_rows(Some(Duration::from_micros(10)), 0), 1, "at least one row");
        // Prefill-only steps and decode steps far from the baseline's sizes add no sample.
        m.observe(0, 256, chunk_keys(0, 256), 0.3);
        m.observe(3, 40, chunk_keys(0, 40), 0.9);
        assert_eq!(m.prefill_cost(), Some(c));
        // Free prefill rows (a GPU-like step cost): no practical cap.
        let mut g = StepCostModel::default();
        for i in 0..10 {
            g.observe(31, 0, 0, 0.008);
            g.observe(31, 16, chunk_keys(16 * i, 16), 0.008);
        }
        assert!(g.prefill_rows(target, 100) > 1_000_000);
        // Zero-row steps and nonsense durations are ignored.
        let before = m.prefill_rows(target, 50);
        m.observe(0, 0, 0, 5.0);
        m.observe(31, 10, 100, f64::NAN);
        m.observe(31, 10, 100, -1.0);
        assert_eq!(m.prefill_rows(target, 50), before);
    }

    /// Closed loop of the engine against synthetic step costs: 31 decoders steady, then a
    /// 512-token prompt arrives. After the first mixed step (sized from the average cost per
    /// row) and one more to measure a second chunk shape, every step that carries the prompt's rows stays within the target over
    /// the decode-only step; the prompt makes progress every step and finishes.
    #[test]
    fn closed_loop_bounds_the_decode_stall() {
        // (fixed, per decode row, per prefill row, per attended key of a prefill row)
        let costs = [
            (0.010, 0.005, 0.005, 0.0),
            (0.020, 0.0016, 0.0006, 0.000_003_75),
            (0.008, 0.000_01, 0.000_01, 0.0),
            (0.001, 0.060, 0.060, 0.0),
            (0.02, 0.001, 0.0, 0.000_01),
        ];
        for (fixed, per_dec, per_row, per_key) in costs {
            let truth = PrefillCost { row_s: per_row, key_s: per_key };
            let target = Duration::from_millis(50);
            let mut model = StepCostModel::default();
            let mut seqs = vec![st(20, false); 31];
            let mut pos = vec![0usize; 31];
            let run = |seqs: &mut Vec<SeqState>, pos: &mut Vec<usize>, model: &mut StepCostModel| {
                let first = seqs.iter().position(|s| !s.blocked && s.pending_prompt > 0).map_or(0, |i| pos[i]);
                let budget = StepBudget {
                    max_batch_tokens: 512,
                    prefill_chunk: 256,
                    prefill_rows_with_decodes: model.prefill_rows(Some(target), first),
                };
                let plan = plan_step(seqs, budget);
                let (mut d, mut p, mut keys, mut extra) = (0, 0, 0, 0.0);
                for ((s, n), at) in seqs.iter_mut().zip(&plan).zip(pos.iter_mut()) {
                    if s.pending_prompt > 0 {
                        p += n;
                        keys += chunk_keys(*at, *n);
                        extra += truth.chunk_s(*at, *n);
                        s.pending_prompt -= n;
                    } else {
                        d += n;
                    }
                    *at += n;
                }
                let step = fixed + per_dec * d as f64 + extra;
                model.observe(d, p, keys, step);
                (p, extra)
            };
            // Start-up: the decoders prefill their prompts and decode a while.
            for _ in 0..200 {
                run(&mut seqs, &mut pos, &mut model);
            }
            assert!(seqs.iter().all(|s| s.pending_prompt == 0));
            seqs.push(st(512, false));
            pos.push(0);
            let mut steps = 0;
            while seqs[31].pending_prompt > 0 {
                let (p, extra) = run(&mut seqs, &mut pos, &mut model);
                assert!(p >= 1, "the prompt makes progress every step");
                let allowed = target.as_secs_f64().max(truth.chunk_s(pos[31] - p, 1)) + 1e-9;
                if steps > 1 {
                    assert!(
                        extra <= allowed,
                        "{:?}: step {steps} adds {extra} s with {p} prefill rows",
                        (fixed, per_dec, per_row, per_key)
                    );
                }
                steps += 1;
                assert!(steps <= 512);
            }
        }
    }

    proptest! {
        #[test]
        fn never_exceeds_the_token_budget(
            seqs in proptest::collection::vec((0usize..300, any::<bool>()), 0..64),
            max_batch_tokens in 1usize..512,
            prefill_chunk in 1usize..256,
            cap in prop_oneof![Just(usize::MAX), 0usize..300],
        ) {
            let seqs: Vec<SeqState> = seqs.into_iter().map(|(p, b)| st(p, b)).collect();
            let plan = plan_step(&seqs, StepBudget { max_batch_tokens, prefill_chunk, prefill_rows_with_decodes: cap });
            prop_assert!(plan.iter().sum::<usize>() <= max_batch_tokens);
            for (p, s) in plan.iter().zip(&seqs) {
                prop_assert!(!s.blocked || *p == 0);
                prop_assert!(*p <= s.pending_prompt.max(1));
                prop_assert!(*p <= prefill_chunk.max(1) || s.pending_prompt == 0);
            }
            // Decoders are served before any prefill when the budget allows all of them.
            let decoders = seqs.iter().filter(|s| !s.blocked && s.pending_prompt == 0).count();
            if decoders <= max_batch_tokens {
                for (p, s) in plan.iter().zip(&seqs) {
                    if !s.blocked && s.pending_prompt == 0 { prop_assert_eq!(*p, 1); }
                }
            }
        }

        #[test]
        fn decode_stall_cap_bounds_prefill_without_starving_it(
            seqs in proptest::collection::vec((prop_oneof![Just(0usize), 1usize..300], any::<bool>()), 0..64),
            max_batch_tokens in 1usize..512,
            prefill_chunk in 1usize..256,
            cap in 0usize..300,
        ) {
            let seqs: Vec<SeqState> = seqs.into_iter().map(|(p, b)| st(p, b)).collect();
            let budget = StepBudget { max_batch_tokens, prefill_chunk, prefill_rows_with_decodes: cap };
            let plan = plan_step(&seqs, budget);
            let decodes: usize = plan.iter().zip(&seqs).filter(|(_, s)| s.pending_prompt == 0).map(|(p, _)| *p).sum();
            let prefill = prefill_rows(&plan, &seqs);
            let runnable: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].blocked && seqs[i].pending_prompt > 0).collect();
            let full: usize = runnable.iter().map(|&i| seqs[i].pending_prompt.min(prefill_chunk)).sum();
            if decodes > 0 {
                // With decode tokens in the step, prefill rows stay within the cap (at least 1).
                prop_assert!(prefill <= cap.max(1));
            } else {
                // Without decode tokens, prefill makes full progress: exactly what the uncapped
                // policy plans.
                prop_assert_eq!(prefill, full.min(max_batch_tokens));
                prop_assert_eq!(&plan, &plan_step(&seqs, StepBudget::uncapped(max_batch_tokens, prefill_chunk)));
            }
            // No starvation: while the batch has room beyond the decoders, the oldest runnable
            // prompt advances every step.
            let decoders = seqs.iter().filter(|s| !s.blocked && s.pending_prompt == 0).count();
            if let Some(&first) = runnable.first() {
                if decoders < max_batch_tokens {
                    prop_assert!(plan[first] >= 1);
                }
            }
            // A capped plan never prefills more than the uncapped one (the cap only trims).
            let uncapped = plan_step(&seqs, StepBudget::uncapped(max_batch_tokens, prefill_chunk));
            prop_assert!(prefill <= prefill_rows(&uncapped, &seqs));
        }
    }
}
