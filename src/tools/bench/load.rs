//! Scenarios about loading and latency: a Zipf-popular library of 1000 LoRAs behind a cache that
//! holds 64 of them (against the same requests with everything hot), cold module loads, and the
//! time to first token of a long prompt arriving while other streams decode.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::context::{Ctx, Results};
use super::drive::{self, long_prompt, ms, prompts, Job};
use super::scenarios::{ensure_loras, p50_p90, row, since_ms};
use super::stats::{peak_rss_mb, percentile, Row, Zipf};
use super::synth;
use crate::adapters::cache::CacheSnapshot;
use crate::adapters::composition::{CompositionSpec, DeltaRef};
use crate::adapters::store::AdapterStore;
use crate::engine::actor::StreamEvent;
use crate::model::linear::Proj;

const LIBRARY: usize = 1000;
const HOT: usize = 64;
const ZIPF_CONCURRENCY: usize = 32;

fn zipf_id(k: usize) -> String {
    format!("zipf/m_{k:04}")
}

/// Writes the 1000 small LoRAs (r=8 on q_proj and v_proj, f16 files).
fn ensure_library(ctx: &Ctx) -> anyhow::Result<()> {
    let dir = ctx.work.join("zipf");
    synth::ensure(&dir, "1000 PEFT LoRAs (r=8, q_proj+v_proj, f16)", || {
        for k in 0..LIBRARY {
            synth::write_lora(
                &ctx.work.join(zipf_id(k)),
                &ctx.base,
                &[Proj::Q, Proj::V],
                8,
                synth::Elem::F16,
                ctx.seed.wrapping_mul(7919) + 10_000 + k as u64,
            )?;
            if (k + 1) % 250 == 0 {
                eprintln!("[bench]   {}/{LIBRARY} written", k + 1);
            }
        }
        Ok(())
    })
}

fn delta_of(k: usize) -> CompositionSpec {
    CompositionSpec { deltas: vec![DeltaRef { id: zipf_id(k), scale: 1.0 }], route: None }
}

/// Cache activity during a run.
pub(super) struct Activity {
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub evictions: u64,
    pub refused: u64,
    /// Summed load times (waits for a load slot included).
    pub load_s: f64,
}

impl Activity {
    pub fn between(a: CacheSnapshot, b: CacheSnapshot) -> Self {
        Self {
            hits: b.hits - a.hits,
            misses: b.misses - a.misses,
            loads: b.loads - a.loads,
            evictions: b.evictions - a.evictions,
            refused: b.refused - a.refused,
            load_s: (b.load_micros - a.load_micros) as f64 / 1e6,
        }
    }

    /// `cache hit rate ..% (.. hits, .. misses, .. loads, .. evictions[, .. refused])`.
    pub fn text(&self) -> String {
        let lookups = self.hits + self.misses;
        let rate = if lookups > 0 { self.hits as f64 / lookups as f64 * 100.0 } else { 0.0 };
        let refused = if self.refused > 0 { format!(", {} refused", self.refused) } else { String::new() };
        format!(
            "cache hit rate {rate:.1}% ({} hits, {} misses, {} loads, {} evictions{refused})",
            self.hits, self.misses, self.loads, self.evictions
        )
    }
}

/// Loads `ids` into `store`; returns seconds.
pub(super) fn preload(store: &AdapterStore, ids: &[String]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    for id in ids {
        store.module(id)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Resident bytes of module `id` once loaded (tensors + CPU kernel layout), measured in a store of
/// its own.
pub(super) fn module_bytes(ctx: &Ctx, id: &str) -> anyhow::Result<usize> {
    let probe = ctx.store(usize::MAX / 2)?;
    probe.module(id)?;
    Ok(probe.cache().snapshot().bytes.max(1))
}

/// Runs the jobs closed-loop on `store`; returns the row and the cache activity during the run.
fn zipf_run(ctx: &Ctx, name: &str, store: &AdapterStore, jobs: &[Job], base: Option<f64>, notes: &str) -> anyhow::Result<(Row, f64)> {
    let before = store.cache().snapshot();
    let traces = drive::run_closed_loop(ctx, store, jobs, ZIPF_CONCURRENCY);
    let after = store.cache().snapshot();
    let s = drive::summarize(&traces);
    anyhow::ensure!(s.errors < s.requests, "{name}: every request failed: {}", s.first_error.unwrap_or_default());
    let notes = format!("{notes}; {}, resident {:.0} MB", Activity::between(before, after).text(), after.bytes as f64 / 1e6);
    Ok((row(name, ZIPF_CONCURRENCY, &s, base, notes), s.tok_s))
}

/// `zipf1000` + `allhot`: the same Zipf(1.0)-popular request sequence over 1000 LoRAs, closed loop
/// with 32 streams, first with a cache of 64 modules (the 64 most popular preloaded, so it starts
/// warm), then with every module preloaded.
pub fn zipf(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    ensure_library(ctx)?;
    let new_tokens = ctx.new_tokens.min(32);
    let one = module_bytes(ctx, &zipf_id(0))?;
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x21bf);
    let zipf = Zipf::new(LIBRARY, 1.0);
    let picks: Vec<usize> = (0..ctx.zipf_requests).map(|_| zipf.sample(&mut rng)).collect();
    let distinct = picks.iter().collect::<std::collections::BTreeSet<_>>().len();
    let jobs: Vec<Job> = prompts(picks.len(), ctx.vocab, ctx.seed ^ 0x77)
        .into_iter()
        .zip(&picks)
        .map(|(prompt, &k)| Job { prompt, new_tokens, composition: delta_of(k), sampling: Default::default() })
        .collect();
    let shape = format!("{} requests x {new_tokens} tokens, {distinct} distinct modules", jobs.len());

    // Base-only reference of the same request shapes (opt-in: one more run).
    let mut base = None;
    if ctx.zipf_base {
        eprintln!("[bench]   base-only reference: {shape} ...");
        let base_jobs: Vec<Job> = jobs.iter().map(|j| Job { composition: CompositionSpec::default(), ..j.clone() }).collect();
        let base_store = ctx.store(1 << 20)?;
        let (mut r, tok_s) = zipf_run(ctx, "zipf_base", &base_store, &base_jobs, None, "")?;
        r.ratio_to_base = Some(1.0);
        r.notes = format!("base model only, the same {shape} closed loop (reference of zipf1000 / allhot)");
        res.rows.push(r);
        base = Some(tok_s);
        drive::wait_idle(ctx);
    }

    let budget = HOT * one + one / 2;
    let store = ctx.store(budget)?;
    let warm_s = preload(&store, &(0..HOT).map(zipf_id).collect::<Vec<_>>())?;
    eprintln!(
        "[bench]   zipf1000: {shape}, cache of {HOT} modules ({:.0} MB), top {HOT} preloaded in {:.1} s ...",
        budget as f64 / 1e6,
        warm_s
    );
    let mb = (one as f64) / 1e6;
    let notes = format!(
        "LoRA r=8 on q_proj+v_proj only (f16 files, {:.2} MB; {mb:.1} MB resident), Zipf(1.0) over {LIBRARY}, cache holds {HOT} (top {HOT} preloaded); {shape}{}",
        super::scenarios::dir_mb(&ctx.work.join(zipf_id(0))),
        if base.is_some() { "; ratio column is against zipf_base" } else { "; ratio column needs --zipf-base" }
    );
    let (z_row, z_tok_s) = zipf_run(ctx, "zipf1000", &store, &jobs, base, &notes)?;
    drop(store);
    drive::wait_idle(ctx);

    let store = ctx.store(LIBRARY * one + LIBRARY * one / 10)?;
    let preload_s = preload(&store, &(0..LIBRARY).map(zipf_id).collect::<Vec<_>>())?;
    eprintln!("[bench]   allhot: all {LIBRARY} modules preloaded in {preload_s:.1} s ...");
    let (h_row, h_tok_s) = zipf_run(
        ctx,
        "allhot",
        &store,
        &jobs,
        base,
        &format!("same requests, all {LIBRARY} modules resident (preloaded in {preload_s:.1} s)"),
    )?;
    let mut z_row = z_row;
    z_row.notes = format!("zipf1000 / allhot tok/s = {:.2}; {}", z_tok_s / h_tok_s.max(1e-9), z_row.notes);
    res.rows.push(z_row);
    res.rows.push(h_row);
    Ok(())
}

/// `coldload`: 20 loads of distinct r=8 all-projection LoRAs through `store.module(id)` into an
/// empty cache (the files may be in the OS page cache).
pub fn coldload(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    const N: usize = 20;
    let ids = ensure_loras(ctx, N)?;
    // The figure is the load's own cost: every file is read once first, so none comes from the
    // disk (the VM's page cache was seen to lose them between runs: 44 ms instead of 1 ms a read).
    for id in &ids {
        for f in crate::adapters::source::module_files(&ctx.work.join(id))? {
            anyhow::Context::with_context(std::fs::read(&f), || format!("reading {}", f.display()))?;
        }
    }
    let store = ctx.store(8 << 30)?;
    let mut times = Vec::with_capacity(N);
    for id in &ids {
        let t0 = Instant::now();
        store.module(id)?;
        times.push(since_ms(t0));
    }
    let (p50, p90) = p50_p90(&times);
    let mb = super::scenarios::dir_mb(&ctx.work.join(&ids[0]));
    res.rows.push(Row {
        scenario: "coldload".into(),
        streams: 0,
        peak_rss_mb: peak_rss_mb(),
        notes: format!(
            "load of one PEFT LoRA (r=8, all 7 projections, f32, {mb:.1} MB) into an empty cache: p50 {:.1} ms, p90 {:.1} ms over {N} distinct ids (page cache warm)",
            p50.unwrap_or(f64::NAN),
            p90.unwrap_or(f64::NAN)
        ),
        ..Default::default()
    });
    Ok(())
}

/// `ttft_under_load`: N-1 streams decode; then `PROBES` 256-token prompts arrive one after
/// another (the next once the previous produced its first token, every decoding stream made a
/// few more tokens and 1.5 TTFTs passed). Reports the probes' TTFT p50/p99 and the decode stall:
/// per probe, the largest inter-token gap of any decoding stream from the probe's arrival to its
/// first token, minus those streams' ITL p50 just before it arrived (the extra wait a decoding
/// client sees), with its noise floor: the same statistic over a window as long as the TTFT just
/// before the probe.
pub fn ttft_under_load(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    let n = ctx.streams - 1;
    const PROBE_LEN: usize = 256;
    const PROBES: usize = 10;
    // Enough for every probe even with a tight stall budget (a stream that ends stops the probes).
    const DECODE_TOKENS: usize = 512;
    // Tokens every decoding stream makes between probes; the last `BEFORE` gaps before a probe
    // are its reference ITL.
    const SETTLE: usize = 4;
    const BEFORE: usize = 3;
    let jobs: Vec<Job> = prompts(n, ctx.vocab, ctx.seed ^ 0x99)
        .into_iter()
        .map(|prompt| Job { prompt, new_tokens: DECODE_TOKENS, composition: CompositionSpec::default(), sampling: Default::default() })
        .collect();
    let stamps: Arc<Vec<Mutex<Vec<Instant>>>> = Arc::new((0..n).map(|_| Mutex::new(Vec::new())).collect());
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        receivers.push((i, drive::submit(ctx, None, job, format!("decode-{i}"))?));
    }
    // One reader thread for all the decoding streams (a task each, as `drive::read_all`).
    let reader = {
        let (stamps, stop, ended) = (stamps.clone(), stop.clone(), ended.clone());
        std::thread::spawn(move || {
            drive::on_one_thread(async move {
                let tasks: Vec<_> = receivers
                    .into_iter()
                    .map(|(i, mut rx)| {
                        let (stamps, stop, ended) = (stamps.clone(), stop.clone(), ended.clone());
                        tokio::spawn(async move {
                            while let Some(ev) = rx.recv().await {
                                if let Ok(StreamEvent::Token { .. }) = ev {
                                    stamps[i].lock().expect("stamps").push(Instant::now());
                                }
                                if ev.is_err() || stop.load(Ordering::Relaxed) {
                                    break;
                                }
                            }
                            ended.fetch_add(1, Ordering::Relaxed);
                            // Dropping `rx` cancels the sequence.
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
    };
    let count = |i: usize| stamps[i].lock().expect("stamps").len();
    let wait_until = |cond: &dyn Fn() -> bool, what: &str| -> anyhow::Result<()> {
        let t0 = Instant::now();
        while !cond() {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "ttft_under_load: timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };
    let any_ended = || ended.load(Ordering::Relaxed) > 0;
    eprintln!("[bench]   {n} streams decoding; waiting for steady state ...");
    wait_until(&|| (0..n).all(|i| count(i) >= 2 + SETTLE) || any_ended(), "the decoding streams")?;
    // (arrival, first token) of each probe.
    let mut probes: Vec<(Instant, Instant)> = Vec::new();
    for k in 0..PROBES {
        if any_ended() {
            break;
        }
        let probe = Job {
            prompt: long_prompt(PROBE_LEN, ctx.vocab, ctx.seed.wrapping_add(k as u64)),
            new_tokens: 4,
            composition: CompositionSpec::default(),
            sampling: Default::default(),
        };
        let t_probe = Instant::now();
        let mut rx = drive::submit(ctx, None, &probe, format!("probe-{k}"))?;
        let mut first = None;
        while let Some(ev) = rx.blocking_recv() {
            if let StreamEvent::Token { .. } = ev? {
                first = Some(Instant::now());
                break;
            }
        }
        let first = first.ok_or_else(|| anyhow::anyhow!("ttft_under_load: probe {k} produced no token"))?;
        drop(rx);
        probes.push((t_probe, first));
        eprintln!("[bench]   probe {k}: TTFT {:.0} ms", ms(first - t_probe));
        // Settle, and leave room before the next probe for a control window as long as this
        // probe's TTFT.
        let marks: Vec<usize> = (0..n).map(count).collect();
        let quiet = (first - t_probe).mul_f64(1.5);
        wait_until(
            &|| ((0..n).all(|i| count(i) >= marks[i] + SETTLE) && first.elapsed() >= quiet) || any_ended(),
            "tokens after the probe",
        )?;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    anyhow::ensure!(!probes.is_empty(), "ttft_under_load: a decoding stream ended before the first probe");
    let streams: Vec<Vec<Instant>> = stamps.iter().map(|s| s.lock().expect("stamps").clone()).collect();
    // All gaps, without each stream's first two (its own prefill and start-up).
    let all: Vec<f64> = streams.iter().flat_map(|v| v.windows(2).skip(2).map(|w| ms(w[1] - w[0]))).collect();
    let (mut ttft, mut stall, mut max_gap, mut steady, mut jitter, mut typical) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut settled = None;
    for &(t, first) in &probes {
        let mut before = Vec::new();
        let mut during = Vec::new();
        // Control: the same statistic over a window as long as the TTFT just before the probe
        // (after the previous probe's prefill): the noise floor of the stall.
        let (c0, mut control) = (settled.map_or(t - (first - t), |s: Instant| s.max(t - (first - t))), Vec::new());
        for v in &streams {
            let gaps: Vec<(Instant, Instant)> = v.windows(2).skip(2).map(|w| (w[0], w[1])).collect();
            let done: Vec<f64> = gaps.iter().filter(|g| g.1 <= t).map(|g| ms(g.1 - g.0)).collect();
            before.extend_from_slice(&done[done.len().saturating_sub(BEFORE)..]);
            during.extend(gaps.iter().filter(|g| g.1 > t && g.0 < first).map(|g| ms(g.1 - g.0)));
            control.extend(gaps.iter().filter(|g| g.1 > c0 && g.1 <= t && g.0 >= settled.unwrap_or(g.0)).map(|g| ms(g.1 - g.0)));
        }
        let itl = percentile(&before, 50.0).unwrap_or(f64::NAN);
        let gap = during.iter().copied().fold(f64::NAN, f64::max);
        let (probe_stall, probe_typical) = ((gap - itl).max(0.0), percentile(&during, 50.0).unwrap_or(f64::NAN));
        let probe_jitter = (!control.is_empty()).then(|| (control.iter().copied().fold(f64::NAN, f64::max) - itl).max(0.0));
        eprintln!(
            "[bench]   probe {}: stall {probe_stall:.0} ms (largest gap {gap:.0}, ITL before {itl:.0}, gap p50 while it prefilled {probe_typical:.0}; noise floor {:.0})",
            ttft.len(),
            probe_jitter.unwrap_or(f64::NAN)
        );
        ttft.push(ms(first - t));
        steady.push(itl);
        max_gap.push(gap);
        stall.push(probe_stall);
        typical.push(probe_typical);
        jitter.extend(probe_jitter);
        settled = Some(first);
    }
    let p = |v: &[f64], q: f64| percentile(v, q).unwrap_or(f64::NAN);
    let stall_p99 = p(&stall, 99.0);
    let verdict = if stall_p99 < 50.0 { "meets" } else { "misses" };
    let budget = match ctx.cfg.max_decode_stall {
        Some(d) => format!("{} ms", d.as_millis()),
        None => "off".into(),
    };
    res.rows.push(Row {
        scenario: "ttft_under_load".into(),
        streams: n + 1,
        tok_s: None,
        ratio_to_base: None,
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p99_ms: percentile(&ttft, 99.0),
        itl_p50_ms: percentile(&all, 50.0),
        itl_p99_ms: percentile(&all, 99.0),
        peak_rss_mb: peak_rss_mb(),
        notes: format!(
            "{} probes, one at a time, of a {PROBE_LEN}-token prompt arriving while {n} streams decode (TTFT over the probes); decode stall p50 {:.0} / p99 {:.0} ms ({verdict} the < 50 ms target at p99), \
             stall = per probe, the largest inter-token gap of any decoding stream between the probe's arrival and its first token ({:.0} / {:.0} ms) minus those streams' ITL p50 over their last {BEFORE} gaps before it ({:.0} ms; ITL p50 while it prefilled {:.0} ms); \
             noise floor: the same statistic over an equally long window without a probe, p50 {:.0} / p99 {:.0} ms; \
             ITL columns: all decode gaps; prefill_chunk {}, max_batch_tokens {}, max_decode_stall {budget}",
            probes.len(),
            p(&stall, 50.0),
            stall_p99,
            p(&max_gap, 50.0),
            p(&max_gap, 99.0),
            p(&steady, 50.0),
            p(&typical, 50.0),
            p(&jitter, 50.0),
            p(&jitter, 99.0),
            ctx.cfg.prefill_chunk,
            ctx.cfg.max_batch_tokens,
        ),
        ..Default::default()
    });
    Ok(())
}
