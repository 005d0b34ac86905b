//! The engine actor: one thread owns the model's KV caches and runs continuous batching.
//!
//! Requests arrive prepared (tokenized, validated, composition pinned) through a bounded channel
//! (`max_queued`: a full queue is refused at once). Between steps the actor admits new requests up
//! to `max_running` and while their KV memory fits `max_kv_bytes` (prompt + `max_new_tokens`
//! positions reserved up front; oldest first; one that alone exceeds it is RESOURCE_EXHAUSTED), drops sequences whose client went away (their KV memory is freed with them),
//! fails those past their deadline, and plans the next step (decode tokens first, then chunked
//! prefill, within `max_batch_tokens`; while sequences decode, the prefill rows of a step are
//! limited to what measured step costs allow within `max_decode_stall`). Every step runs the base
//! model once over all rows, each sequence with its own composition.
//!
//! Invariants: the model thread never blocks on a client (events go through bounded per-request
//! channels with `try_send`; a sequence whose client does not read is paused, and dropped after
//! `slow_client_timeout`); a sequence is removed only after its final event was delivered or its
//! client is gone; `EngineStats` always reflects the running set.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::error::EngineError;
use super::faults::Faults;
use super::prepare::{PreparedRequest, TextFrontEnd};
use super::scheduler::{chunk_keys, gather_burst, plan_step, SeqState, StepBudget, StepCostModel};
use super::sequence::{FinishReason, Sequence};
use super::step::run_step;
use crate::model::llama::Llama;
use crate::model::sampling::TokenLogprob;

pub use super::config::{decode_stall, EngineConfig, DEFAULT_MAX_DECODE_STALL_MS};

/// Why and how a generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishInfo {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub queue_s: f64,
    pub ttft_s: f64,
    pub total_s: f64,
}

/// What a request's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Token { token: TokenLogprob, top: Vec<TokenLogprob>, text: String },
    Finished(FinishInfo),
}

/// One item of a request's stream.
pub type EventResult = Result<StreamEvent, EngineError>;

/// Live counters of the engine (tests, metrics, draining).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub steps: AtomicU64,
    pub cancelled: AtomicU64,
    /// The engine thread ended by a panic (set before its requests' channels close).
    pub died: std::sync::atomic::AtomicBool,
    /// Woken when the engine thread ends, cleanly or not.
    pub ended: tokio::sync::Notify,
}

struct Submission {
    req: PreparedRequest,
    tx: mpsc::Sender<EventResult>,
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    stats: Arc<EngineStats>,
    max_queued: usize,
    stream_buffer: usize,
}

impl EngineHandle {
    /// Enqueues a prepared request; returns its event stream. A full queue is refused at once.
    pub fn submit(&self, req: PreparedRequest) -> Result<mpsc::Receiver<EventResult>, EngineError> {
        let (tx, rx) = mpsc::channel(self.stream_buffer.max(2));
        self.tx.try_send(Submission { req, tx }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("modserve_queue_rejections_total").increment(1);
                EngineError::QueueFull(self.max_queued)
            }
            mpsc::error::TrySendError::Closed(_) => EngineError::NotReady,
        })?;
        metrics::gauge!("modserve_queue_depth").set(self.queued() as f64);
        Ok(rx)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests waiting for a running slot.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Running sequences.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }
}

struct Active {
    seq: Sequence,
    tx: mpsc::Sender<EventResult>,
    pending: VecDeque<EventResult>,
    blocked_since: Option<Instant>,
    received_at: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    deadline: Option<Instant>,
    kv_bytes: usize,
    request_id: String,
}

enum Flush {
    Done,
    Blocked,
    Closed,
}

impl Active {
    fn flush(&mut self) -> Flush {
        while let Some(ev) = self.pending.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.pending.push_front(ev);
                    return Flush::Blocked;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Flush::Closed,
            }
        }
        Flush::Done
    }
}

/// Starts the engine thread over `llama`.
pub fn spawn_engine(llama: Arc<Llama>, front: Arc<TextFrontEnd>, cfg: EngineConfig) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel::<Submission>(cfg.max_queued.max(1));
    let stats = Arc::new(EngineStats::default());
    let handle = EngineHandle { tx, stats: stats.clone(), max_queued: cfg.max_queued, stream_buffer: cfg.stream_buffer };
    std::thread::Builder::new().name("modserve-engine".into()).spawn(move || {
        let ended = EndSignal(stats.clone());
        EngineLoop {
            llama,
            front,
            cfg,
            stats,
            running: Vec::new(),
            head: None,
            cost: StepCostModel::default(),
            faults: Faults::from_env(),
        }
        .run(rx);
        drop(ended);
    })?;
    Ok(handle)
}

impl EngineHandle {
    /// True once the engine thread died (a panic outside a step's containment).
    pub fn died(&self) -> bool {
        self.stats.died.load(Ordering::SeqCst)
    }

    /// Resolves when the engine thread has ended.
    pub async fn ended(&self) {
        self.stats.ended.notified().await
    }
}

/// Wakes [`EngineHandle::ended`] when the engine thread ends, however it ends.
struct EndSignal(Arc<EngineStats>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        self.0.ended.notify_one();
    }
}

impl Drop for EngineLoop {
    /// On a panic, marks the engine dead and tells every request before their channels close.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stats.died.store(true, Ordering::SeqCst);
            tracing::error!(running = self.running.len(), "the engine thread died: failing every request");
            for a in &self.running {
                let _ = a.tx.try_send(Err(EngineError::Stopped));
            }
            if let Some(s) = &self.head {
                let _ = s.tx.try_send(Err(EngineError::Stopped));
            }
        }
    }
}

struct EngineLoop {
    llama: Arc<Llama>,
    front: Arc<TextFrontEnd>,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    running: Vec<Active>,
    /// The oldest request not yet admitted because its KV memory does not fit yet (later ones
    /// wait behind it in the channel: no overtaking, so a large request is not starved).
    head: Option<Submission>,
    /// Measured step costs; size the prefill share of decode steps.
    cost: StepCostModel,
    faults: Faults,
}

impl EngineLoop {
    fn run(mut self, mut rx: mpsc::Receiver<Submission>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.head.is_none() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(s) => self.head = Some(s),
                    None => break,
                }
                gather_burst(|| rx.len());
            }
            while self.running.len() < self.cfg.max_running.max(1) {
                let s = match self.head.take() {
                    Some(s) => s,
                    None if !open => break,
                    None => match rx.try_recv() {
                        Ok(s) => s,
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                };
                if !self.kv_fits(&s) {
                    self.head = Some(s);
                    break;
                }
                self.admit(s);
            }
            metrics::gauge!("modserve_queue_depth").set((rx.len() + usize::from(self.head.is_some())) as f64);
            self.expire_head();
            self.housekeeping();
            // The step runs on a rayon worker, so its parallel kernels fork and join within the
            // pool instead of waking this thread after each one (hundreds per step), and the
            // other workers stay awake through it (`awake`).
            if !super::awake::step_scope(|| self.step()) {
                // Nothing runnable (all paused on slow clients): wait a little for them.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        tracing::info!("engine stopped");
    }

    /// KV positions a request reserves: its prompt and `max_new_tokens`, within the context.
    fn kv_need(&self, req: &PreparedRequest) -> (usize, usize) {
        let cfg = &self.llama.cfg;
        let capacity = (req.spec.prompt_ids.len() + req.spec.max_new_tokens).min(cfg.max_position_embeddings);
        (capacity, self.llama.cache_bytes(capacity))
    }

    /// True when the request's KV memory fits beside the running sequences' (always true for a
    /// request that alone exceeds the budget: [`Self::admit`] refuses it).
    fn kv_fits(&self, s: &Submission) -> bool {
        let budget = self.cfg.max_kv_bytes;
        let need = self.kv_need(&s.req).1;
        budget == 0 || need > budget || self.stats.kv_bytes.load(Ordering::Relaxed) + need <= budget
    }

    /// Ends the waiting head request if its client left or its deadline passed.
    fn expire_head(&mut self) {
        let Some(s) = &self.head else { return };
        if s.tx.is_closed() {
            self.head = None;
            metrics::counter!("modserve_cancelled_total").increment(1);
        } else if s.req.deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = s.tx.try_send(Err(EngineError::DeadlineExceeded));
            metrics::counter!("modserve_deadline_exceeded_total").increment(1);
            self.head = None;
        }
    }

    fn admit(&mut self, s: Submission) {
        let (capacity, need) = self.kv_need(&s.req);
        let Submission { req, tx } = s;
        if self.cfg.max_kv_bytes > 0 && need > self.cfg.max_kv_bytes {
            metrics::counter!("modserve_kv_budget_refusals_total").increment(1);
            let _ = tx.try_send(Err(EngineError::KvBudget(format!(
                "the request needs {need} bytes of KV cache ({capacity} positions: prompt + max_new_tokens), more than --max-kv-bytes {}",
                self.cfg.max_kv_bytes
            ))));
            return;
        }
        let cache = match self.llama.new_cache(capacity) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.try_send(Err(EngineError::Internal(format!("KV cache allocation: {e}"))));
                return;
            }
        };
        let seq = match Sequence::new(req.spec, cache, self.front.tokenizer.clone(), self.front.eos.clone()) {
            Ok(mut s) => {
                s.composition = req.composition;
                s
            }
            Err(e) => {
                let _ = tx.try_send(Err(EngineError::InvalidArgument(e.to_string())));
                return;
            }
        };
        let kv_bytes = self.llama.cache_bytes(capacity);
        self.stats.kv_bytes.fetch_add(kv_bytes, Ordering::Relaxed);
        let mut a = Active {
            seq,
            tx,
            pending: VecDeque::new(),
            blocked_since: None,
            received_at: req.received_at,
            scheduled_at: None,
            first_token_at: None,
            last_token_at: None,
            deadline: req.deadline,
            kv_bytes,
            request_id: req.request_id,
        };
        if a.seq.finished().is_some() {
            // max_new_tokens == 0: nothing to generate.
            let info = finish_info(&a, Instant::now());
            a.pending.push_back(Ok(StreamEvent::Finished(info)));
        }
        tracing::debug!(request_id = %a.request_id, "admitted");
        self.running.push(a);
        self.publish();
    }

    /// Delivers buffered events; removes finished, cancelled, expired and stuck sequences.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.slow_client_timeout;
        let stats = self.stats.clone();
        let llama = self.llama.clone();
        self.running.retain_mut(|a| {
            let keep = match a.flush() {
                Flush::Closed => {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("modserve_cancelled_total").increment(1);
                    tracing::debug!(request_id = %a.request_id, "client went away: cancelled");
                    false
                }
                Flush::Blocked => {
                    // A deadline passes whether or not the client reads: the sequence stops, its
                    // KV memory is freed, and the error waits in `pending` for room in the buffer.
                    if a.seq.finished().is_none() && a.deadline.is_some_and(|d| now >= d) {
                        metrics::counter!("modserve_deadline_exceeded_total").increment(1);
                        a.fail(EngineError::DeadlineExceeded);
                        a.release_kv(&llama, &stats);
                    }
                    let since = *a.blocked_since.get_or_insert(now);
                    if now - since > timeout {
                        tracing::warn!(request_id = %a.request_id, "client stopped reading: dropped");
                        metrics::counter!("modserve_slow_client_drops_total").increment(1);
                        false
                    } else {
                        true
                    }
                }
                Flush::Done => {
                    a.blocked_since = None;
                    if a.seq.finished().is_some() {
                        false
                    } else if a.tx.is_closed() {
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("modserve_cancelled_total").increment(1);
                        false
                    } else if a.deadline.is_some_and(|d| now >= d) {
                        metrics::counter!("modserve_deadline_exceeded_total").increment(1);
                        // Kept until the error is delivered (or the client is found gone).
                        a.fail(EngineError::DeadlineExceeded);
                        let keep = !matches!(a.flush(), Flush::Done | Flush::Closed);
                        if keep {
                            a.release_kv(&llama, &stats);
                        }
                        keep
                    } else {
                        true
                    }
                }
            };
            if !keep {
                stats.kv_bytes.fetch_sub(a.kv_bytes, Ordering::Relaxed);
            }
            keep
        });
        self.publish();
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        metrics::gauge!("modserve_running_sequences").set(self.running.len() as f64);
        metrics::gauge!("modserve_kv_cache_bytes").set(self.stats.kv_bytes.load(Ordering::Relaxed) as f64);
    }

    /// Plans and runs one batch step. Returns false if nothing could run.
    fn step(&mut self) -> bool {
        let states: Vec<SeqState> = self
            .running
            .iter()
            .map(|a| SeqState { pending_prompt: a.seq.pending_prompt(), blocked: !a.pending.is_empty() || a.seq.finished().is_some() })
            .collect();
        // The oldest runnable prompt's position sizes the chunk (later prompts start lower).
        let first_pos =
            self.running.iter().zip(&states).find(|(_, s)| !s.blocked && s.pending_prompt > 0).map_or(0, |(a, _)| a.seq.cache.len());
        let prefill_rows_with_decodes = self.cost.prefill_rows(self.cfg.max_decode_stall, first_pos);
        let budget =
            StepBudget { max_batch_tokens: self.cfg.max_batch_tokens, prefill_chunk: self.cfg.prefill_chunk, prefill_rows_with_decodes };
        let plan = plan_step(&states, budget);
        let rows: usize = plan.iter().sum();
        if rows == 0 {
            return false;
        }
        let t0 = Instant::now();
        for (a, &p) in self.running.iter_mut().zip(&plan) {
            if p > 0 && a.scheduled_at.is_none() {
                a.scheduled_at = Some(t0);
            }
        }
        let fault = |id: Option<u32>| {
            id.is_some_and(|id| self.running.iter().zip(&plan).any(|(a, &p)| p > 0 && a.seq.spec.prompt_ids.contains(&id)))
        };
        if fault(self.faults.engine_panic) {
            panic!("fault injection: engine_panic");
        }
        let step_fault = fault(self.faults.step_panic);
        // A panic inside the step (a kernel's assertion, a bug) fails this step's sequences only;
        // the model is shared read-only, and the failed sequences are aborted with their caches.
        let result = {
            let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|a| &mut a.seq).collect();
            let llama = &self.llama;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if step_fault {
                    panic!("fault injection: step_panic");
                }
                run_step(llama, &mut seqs, &plan).map_err(|e| e.to_string())
            }))
            .unwrap_or_else(|p| {
                let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                Err(format!("panic in the batch step: {}", msg.unwrap_or_else(|| "(no message)".into())))
            })
        };
        let step_s = t0.elapsed().as_secs_f64();
        let (mut prefill_rows, mut prefill_keys) = (0, 0);
        for ((a, s), &n) in self.running.iter().zip(&states).zip(&plan) {
            if s.pending_prompt > 0 && n > 0 {
                prefill_rows += n;
                // After a successful step the cache advanced by `n`.
                prefill_keys += chunk_keys(a.seq.cache.len().saturating_sub(n), n);
            }
        }
        let prefill_cost = self.cost.prefill_cost();
        tracing::trace!(
            rows,
            prefill_rows,
            prefill_cap = prefill_rows_with_decodes,
            first_pos,
            row_ms = prefill_cost.map(|c| c.row_s * 1e3),
            key_us = prefill_cost.map(|c| c.key_s * 1e6),
            step_ms = step_s * 1e3,
            "step"
        );
        if result.is_ok() {
            self.cost.observe(rows - prefill_rows, prefill_rows, prefill_keys, step_s);
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("modserve_batch_rows").record(rows as f64);
        metrics::histogram!("modserve_step_seconds").record(step_s);
        if let Some(c) = prefill_cost {
            metrics::gauge!("modserve_prefill_row_cost_seconds").set(c.row_s);
            metrics::gauge!("modserve_prefill_key_cost_seconds").set(c.key_s);
        }
        if self.cfg.max_decode_stall.is_some() {
            metrics::gauge!("modserve_decode_step_prefill_rows").set(prefill_rows_with_decodes.min(self.cfg.max_batch_tokens) as f64);
        }
        let now = Instant::now();
        match result {
            Ok(events) => {
                let mut generated = 0u64;
                let seq_fail = self.faults.seq_fail;
                for (a, ev) in self.running.iter_mut().zip(events) {
                    let ev = match ev {
                        Some(Ok(_)) if seq_fail.is_some_and(|id| a.seq.spec.prompt_ids.contains(&id)) => {
                            a.fail(EngineError::Internal("the sequence failed: fault injection: seq_fail".into()));
                            continue;
                        }
                        None => continue,
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => {
                            tracing::warn!(request_id = %a.request_id, "sequence failed: {e}");
                            a.fail(EngineError::Internal(format!("the sequence failed: {e}")));
                            continue;
                        }
                    };
                    generated += 1;
                    match a.last_token_at {
                        None => {
                            a.first_token_at = Some(now);
                            metrics::histogram!("modserve_ttft_seconds").record((now - a.received_at).as_secs_f64());
                        }
                        Some(prev) => metrics::histogram!("modserve_inter_token_seconds").record((now - prev).as_secs_f64()),
                    }
                    a.last_token_at = Some(now);
                    a.pending.push_back(Ok(StreamEvent::Token { token: ev.sampled.token, top: ev.sampled.top, text: ev.text_delta }));
                    if ev.finished.is_some() {
                        let info = finish_info(a, now);
                        a.pending.push_back(Ok(StreamEvent::Finished(info)));
                    }
                    let _ = a.flush();
                }
                metrics::counter!("modserve_generated_tokens_total").increment(generated);
            }
            Err(e) => {
                tracing::error!("batch step failed: {e}");
                for (a, &p) in self.running.iter_mut().zip(&plan) {
                    if p > 0 {
                        a.fail(EngineError::Internal(e.clone()));
                    }
                }
            }
        }
        true
    }
}

impl Active {
    /// Ends the sequence with `e` as its terminal event: the tokens not yet delivered are
    /// dropped, and the error is queued like any event (housekeeping delivers it), so it reaches
    /// the client even when the stream buffer is full (the sequence stays until it is delivered,
    /// the client leaves, or the slow-client timeout drops it).
    fn fail(&mut self, e: EngineError) {
        self.pending.clear();
        self.pending.push_back(Err(e));
        self.seq.abort();
    }

    /// Frees the KV cache of a sequence that will not run again but waits to deliver its
    /// terminal event (its budget share is returned at once).
    fn release_kv(&mut self, llama: &Llama, stats: &EngineStats) {
        if self.kv_bytes == 0 {
            return;
        }
        if let Ok(empty) = llama.new_cache(0) {
            self.seq.cache = empty;
            stats.kv_bytes.fetch_sub(self.kv_bytes, Ordering::Relaxed);
            self.kv_bytes = 0;
        }
    }
}

fn finish_info(a: &Active, now: Instant) -> FinishInfo {
    let start = a.received_at;
    FinishInfo {
        reason: a.seq.finished().unwrap_or(FinishReason::Length),
        prompt_tokens: a.seq.spec.prompt_ids.len(),
        generated_tokens: a.seq.generated.len(),
        queue_s: a.scheduled_at.map(|s| (s - start).as_secs_f64()).unwrap_or(0.0),
        ttft_s: a.first_token_at.map(|f| (f - start).as_secs_f64()).unwrap_or(0.0),
        total_s: (now - start).as_secs_f64(),
    }
}
