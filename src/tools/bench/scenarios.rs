//! Throughput scenarios: one stream, and N concurrent streams on the base model (greedy, and
//! sampling with a temperature), on N distinct LoRAs, on language+task sparse compositions and
//! on one Poly inventory routed per task.
use std::path::Path;
use std::time::Instant;

use super::context::{Ctx, Results};
use super::drive::{self, ms, prompts, Job, Summary};
use super::stats::{peak_rss_mb, percentile, Row};
use super::synth::{self, PolyShape};
use crate::adapters::composition::{CompositionSpec, DeltaRef};
use crate::adapters::formats::poly::Routing;
use crate::adapters::store::AdapterStore;
use crate::model::sampling::SamplingParams;

/// Cache budget of the stores that must hold everything (no eviction while measuring).
const BIG_CACHE: usize = 8 << 30;

/// Folder of the all-projection r=8 LoRAs shared by `lora32` and `coldload`.
pub const LORA_DIR: &str = "lora_r8_all";

/// One short generation so lazy initialisation does not land in the first measurement.
pub fn warmup(ctx: &Ctx) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let jobs: Vec<Job> = prompts(2, ctx.vocab, ctx.seed.wrapping_add(99))
        .into_iter()
        .map(|prompt| Job { prompt, new_tokens: 4, composition: CompositionSpec::default(), sampling: Default::default() })
        .collect();
    let traces = drive::run_all_at_once(ctx, None, &jobs)?;
    check(&drive::summarize(&traces), "warmup")?;
    eprintln!("[bench] warm-up done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn check(s: &Summary, what: &str) -> anyhow::Result<()> {
    if s.errors == s.requests {
        anyhow::bail!("{what}: every request failed; first error: {}", s.first_error.as_deref().unwrap_or("?"));
    }
    Ok(())
}

fn error_note(s: &Summary) -> String {
    match &s.first_error {
        Some(e) => format!("; {} of {} requests FAILED (first: {e})", s.errors, s.requests),
        None => String::new(),
    }
}

/// A row from a summary (tok/s over the whole run).
pub fn row(name: &str, streams: usize, s: &Summary, base: Option<f64>, notes: String) -> Row {
    Row {
        scenario: name.into(),
        streams,
        tok_s: Some(s.tok_s),
        ratio_to_base: base.filter(|b| *b > 0.0).map(|b| s.tok_s / b),
        ttft_p50_ms: s.ttft_p50,
        ttft_p99_ms: s.ttft_p99,
        itl_p50_ms: s.itl_p50,
        itl_p99_ms: s.itl_p99,
        peak_rss_mb: peak_rss_mb(),
        notes: format!("{notes}{}", error_note(s)),
        tokens: Some(s.tokens),
        wall_s: Some(s.wall_s),
        round: None,
    }
}

/// `single`: one greedy stream; tok/s counts decode only: (generated - 1) / (last - first token).
pub fn single(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    let prompt = prompts(1, ctx.vocab, ctx.seed).remove(0);
    let job = Job { prompt, new_tokens: ctx.new_tokens, composition: CompositionSpec::default(), sampling: Default::default() };
    let traces = drive::run_all_at_once(ctx, None, std::slice::from_ref(&job))?;
    let s = drive::summarize(&traces);
    check(&s, "single")?;
    let t = &traces[0];
    let decode = match (t.tokens.first(), t.tokens.last()) {
        (Some(a), Some(b)) if t.tokens.len() > 1 && b > a => (t.tokens.len() - 1) as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    let mut r = row("single", 1, &s, None, format!("decode tok/s (TTFT excluded), {} new tokens", ctx.new_tokens));
    r.tok_s = Some(decode);
    r.ratio_to_base = Some(1.0);
    res.rows.push(r);
    Ok(())
}

/// Runs `comps.len()` greedy streams submitted at once, one composition each.
fn streams_row(
    ctx: &Ctx,
    name: &str,
    store: Option<&AdapterStore>,
    comps: Vec<CompositionSpec>,
    base: Option<f64>,
    notes: String,
) -> anyhow::Result<Row> {
    sampled_streams_row(ctx, name, store, comps, base, notes, |_| SamplingParams::default())
}

/// [`streams_row`] with stream `i` sampling as `sampling(i)` says.
fn sampled_streams_row(
    ctx: &Ctx,
    name: &str,
    store: Option<&AdapterStore>,
    comps: Vec<CompositionSpec>,
    base: Option<f64>,
    notes: String,
    sampling: impl Fn(usize) -> SamplingParams,
) -> anyhow::Result<Row> {
    let jobs: Vec<Job> = prompts(comps.len(), ctx.vocab, ctx.seed)
        .into_iter()
        .zip(comps)
        .enumerate()
        .map(|(i, (prompt, composition))| Job { prompt, new_tokens: ctx.new_tokens, composition, sampling: sampling(i) })
        .collect();
    eprintln!("[bench]   {} streams x {} tokens ...", jobs.len(), ctx.new_tokens);
    let traces = drive::run_all_at_once(ctx, store, &jobs)?;
    let s = drive::summarize(&traces);
    check(&s, name)?;
    Ok(row(name, jobs.len(), &s, base, notes))
}

/// `base32`: N base-only streams; tok/s = all generated tokens / (first submit .. last token).
pub fn base_streams(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    res.base_streams = base_row(ctx, res, "base32", ctx.streams)?;
    Ok(())
}

/// `base32_sampled`: the `base32` streams (same prompts) drawing every token at temperature
/// [`SAMPLED_TEMPERATURE`] with top-p [`SAMPLED_TOP_P`] (seed = stream index), as chat clients
/// ask; its ratio is to `base32`'s greedy streams of the same run: what sampling costs.
pub fn base_streams_sampled(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    let params = |i: usize| SamplingParams { temperature: SAMPLED_TEMPERATURE, top_p: SAMPLED_TOP_P, seed: i as u64, ..Default::default() };
    let notes =
        format!("base model only, temperature {SAMPLED_TEMPERATURE}, top-p {SAMPLED_TOP_P}, seeded per stream; ratio to base32 (greedy)");
    let r =
        sampled_streams_row(ctx, "base32_sampled", None, vec![CompositionSpec::default(); ctx.streams], res.base_streams, notes, params)?;
    res.rows.push(r);
    Ok(())
}

/// The sampling of `base32_sampled`.
pub const SAMPLED_TEMPERATURE: f32 = 0.8;
pub const SAMPLED_TOP_P: f32 = 0.95;

/// `base128`: [`WIDE_STREAMS`] base-only streams (how a step's cost grows with the batch).
pub fn base_streams_wide(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    res.base_wide = base_row(ctx, res, "base128", WIDE_STREAMS)?;
    Ok(())
}

/// Streams of `base128` and `lora128`.
pub const WIDE_STREAMS: usize = 128;

fn base_row(ctx: &Ctx, res: &mut Results, name: &str, streams: usize) -> anyhow::Result<Option<f64>> {
    let mut r =
        streams_row(ctx, name, None, vec![CompositionSpec::default(); streams], None, "base model only; tok/s = all tokens / wall".into())?;
    r.ratio_to_base = Some(1.0);
    let tok_s = r.tok_s;
    res.rows.push(r);
    Ok(tok_s)
}

/// Loads every module of `ids` (and Poly routings) into `store` before timing; returns seconds.
fn preload(store: &AdapterStore, comps: &[CompositionSpec]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    for c in comps {
        store.resolve(c)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Writes LoRA `i` (r=8, all 7 projections, f32: ~10 MB on SmolLM2-135M) of the shared set.
pub fn ensure_lora(ctx: &Ctx, i: usize) -> anyhow::Result<String> {
    ensure_lora_rank(ctx, i, 8)
}

/// Writes LoRA `i` of rank `rank` (all 7 projections, f32) of the shared set of that rank.
pub fn ensure_lora_rank(ctx: &Ctx, i: usize, rank: usize) -> anyhow::Result<String> {
    let folder = if rank == 8 { LORA_DIR.to_string() } else { format!("lora_r{rank}_all") };
    let id = format!("{folder}/lora_{i:03}");
    let dir = ctx.work.join(&id);
    if !dir.exists() {
        let tmp = ctx.work.join(format!("{id}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        synth::write_lora(
            &tmp,
            &ctx.base,
            &ctx.base.projections(),
            rank,
            synth::Elem::F32,
            ctx.seed.wrapping_mul(1000).wrapping_add(i as u64),
        )?;
        std::fs::rename(&tmp, &dir)?;
    }
    Ok(id)
}

/// Writes LoRAs `0..n` of the shared set, with progress.
pub fn ensure_loras(ctx: &Ctx, n: usize) -> anyhow::Result<Vec<String>> {
    let t0 = Instant::now();
    let ids = (0..n).map(|i| ensure_lora(ctx, i)).collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("[bench]   {n} PEFT LoRAs (r=8, all projections) ready in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(ids)
}

pub fn dir_mb(p: &Path) -> f64 {
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum::<u64>())
        .unwrap_or(0) as f64
        / 1e6
}

/// `lora32`: N streams, each with its own PEFT LoRA (r=8 on all 7 projections), preloaded.
pub fn lora_streams(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    lora_streams_of(ctx, res, "lora32", ctx.streams, &[8], res.base_streams)
}

/// `lora32_r16`, `lora32_r64`, `lora32_mixed` (ranks 8/16/32/64 in one batch, stream `i` rank
/// `ranks[i % 4]`) and `lora128` (128 streams of r=8): like `lora32`.
pub fn lora_streams_named(ctx: &Ctx, res: &mut Results, name: &str) -> anyhow::Result<()> {
    match name {
        "lora32_r16" => lora_streams_of(ctx, res, name, ctx.streams, &[16], res.base_streams),
        "lora32_r64" => lora_streams_of(ctx, res, name, ctx.streams, &[64], res.base_streams),
        "lora32_mixed" => lora_streams_of(ctx, res, name, ctx.streams, &[8, 16, 32, 64], res.base_streams),
        "lora128" => lora_streams_of(ctx, res, name, WIDE_STREAMS, &[8], res.base_wide),
        other => anyhow::bail!("not a LoRA scenario: {other}"),
    }
}

/// `streams` streams, stream `i` with its own PEFT LoRA of rank `ranks[i % ranks.len()]` on all 7
/// projections, preloaded; the notes give the file and resident bytes per module.
fn lora_streams_of(ctx: &Ctx, res: &mut Results, name: &str, streams: usize, ranks: &[usize], base: Option<f64>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let ids = (0..streams).map(|i| ensure_lora_rank(ctx, i, ranks[i % ranks.len()])).collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("[bench]   {streams} PEFT LoRAs (ranks {ranks:?}, all projections) ready in {:.1} s", t0.elapsed().as_secs_f64());
    let comps: Vec<CompositionSpec> =
        ids.iter().map(|id| CompositionSpec { deltas: vec![DeltaRef { id: id.clone(), scale: 1.0 }], route: None }).collect();
    let store = ctx.store(BIG_CACHE)?;
    let load_s = preload(&store, &comps)?;
    let file_mb: f64 = ids.iter().map(|id| dir_mb(&ctx.work.join(id))).sum::<f64>() / ids.len() as f64;
    let resident_mb = store.cache().snapshot().bytes as f64 / 1e6 / ids.len() as f64;
    let rank_text = ranks.iter().map(|r| format!("r={r}")).collect::<Vec<_>>().join("/");
    let notes = format!(
        "{} distinct {rank_text} LoRAs on all {} projections ({file_mb:.1} MB file, {resident_mb:.1} MB resident per module on average), preloaded in {load_s:.1} s",
        ids.len(),
        ctx.base.projections().len()
    );
    let r = streams_row(ctx, name, Some(&store), comps, base, notes)?;
    res.rows.push(r);
    Ok(())
}

/// `sft32`: N streams, each `lang_i + task_j` of 4 language and 8 task sparse modules (0.5%
/// density on all 7 projections of every layer, native sparse format).
pub fn sft_streams(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    const LANGS: usize = 4;
    const TASKS: usize = 8;
    const DENSITY: f64 = 0.005;
    let dir = ctx.work.join("sft");
    let mut nnz = 0;
    synth::ensure(&dir, "4 language + 8 task sparse modules (0.5% density)", || {
        for (kind, n, off) in [("lang", LANGS, 500u64), ("task", TASKS, 600)] {
            for i in 0..n {
                nnz = synth::write_sparse(
                    &dir.join(format!("{kind}_{i}")),
                    &ctx.base,
                    &ctx.base.projections(),
                    DENSITY,
                    ctx.seed.wrapping_mul(1000) + off + i as u64,
                )?;
            }
        }
        Ok(())
    })?;
    let comps: Vec<CompositionSpec> = (0..ctx.streams)
        .map(|s| CompositionSpec {
            deltas: vec![
                DeltaRef { id: format!("sft/lang_{}", (s / TASKS) % LANGS), scale: 1.0 },
                DeltaRef { id: format!("sft/task_{}", s % TASKS), scale: 1.0 },
            ],
            route: None,
        })
        .collect();
    let store = ctx.store(BIG_CACHE)?;
    let load_s = preload(&store, &comps)?;
    let mb = dir_mb(&dir.join("task_0"));
    let nnz_note = if nnz > 0 { format!(", {nnz} non-zeros each") } else { String::new() };
    let notes = format!(
        "lang_i + task_j of {LANGS}+{TASKS} sparse modules, 0.5% of all {} projections ({mb:.1} MB each{nnz_note}), preloaded in {load_s:.1} s",
        ctx.base.projections().len()
    );
    let r = streams_row(ctx, "sft32", Some(&store), comps, res.base_streams, notes)?;
    res.rows.push(r);
    Ok(())
}

/// `poly32`: N streams on one Poly inventory (32 tasks, 8 skills, 2 splits, r=8, all 7
/// projections), each routed by its own task id; the per-task mixtures are built before timing.
pub fn poly_streams(ctx: &Ctx, res: &mut Results) -> anyhow::Result<()> {
    let shape = PolyShape { n_tasks: 32, n_skills: 8, n_splits: 2, r: 8 };
    let dir = ctx.work.join("poly").join("inv");
    synth::ensure(&dir, "a Poly inventory (32 tasks, 8 skills, 2 splits, r=8)", || {
        synth::write_poly(&dir, &ctx.base, &ctx.base.projections(), shape, ctx.seed.wrapping_mul(1000) + 700)
    })?;
    let comps: Vec<CompositionSpec> = (0..ctx.streams)
        .map(|s| CompositionSpec { deltas: Vec::new(), route: Some(("poly/inv".into(), Routing::Task((s % shape.n_tasks) as i64))) })
        .collect();
    let store = ctx.store(BIG_CACHE)?;
    let t0 = Instant::now();
    store.module("poly/inv")?;
    let inv_s = t0.elapsed().as_secs_f64();
    let mix_s = preload(&store, &comps)?;
    let notes = format!(
        "one inventory ({:.0} MB; 32 tasks, 8 skills, 2 splits, r=8, all {} projections), task id per stream; inventory load {inv_s:.1} s, {} mixtures {mix_s:.1} s, before timing",
        dir_mb(&dir),
        ctx.base.projections().len(),
        ctx.streams.min(shape.n_tasks)
    );
    let r = streams_row(ctx, "poly32", Some(&store), comps, res.base_streams, notes)?;
    res.rows.push(r);
    Ok(())
}

/// p50 / p90 of a list of durations in ms.
pub fn p50_p90(v: &[f64]) -> (Option<f64>, Option<f64>) {
    (percentile(v, 50.0), percentile(v, 90.0))
}

/// Elapsed ms since `t0`.
pub fn since_ms(t0: Instant) -> f64 {
    ms(t0.elapsed())
}
