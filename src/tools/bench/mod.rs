//! `modserve bench`: in-process benchmark scenarios over one loaded model, printed as one markdown
//! table (plus optional JSON).
//!
//! Every scenario drives the same engine (continuous batching, the server's defaults unless the
//! flags say otherwise) with greedy requests that generate exactly their token budget. Adapters
//! are written synthetically (seeded, realistic magnitudes, real on-disk formats) into the work
//! dir and loaded through the adapter store, so the numbers include the real resolve and apply
//! paths. Client-side timestamps: TTFT is from preparation (composition resolve) to the first
//! token event, inter-token latency (ITL) is the gap between token events of one stream.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

mod context;
mod drive;
mod load;
mod scenarios;
mod stats;
mod synth;
mod working_set;

use crate::adapters::target::BaseShapes;
use crate::config::ModelArgs;
use crate::engine::actor::{spawn_engine, EngineConfig};
use crate::engine::prepare::TextFrontEnd;
pub use context::{Ctx, Results};
pub use stats::Row;

/// Every scenario, in the order they run.
/// `zipf1000` runs last: its all-hot half holds every module resident, which raises the
/// process-wide peak RSS that every later row would report.
pub const SCENARIOS: [&str; 15] = [
    "single",
    "base32",
    "base32_sampled",
    "lora32",
    "sft32",
    "poly32",
    "lora32_r16",
    "lora32_r64",
    "lora32_mixed",
    "base128",
    "lora128",
    "coldload",
    "ttft_under_load",
    "ws2x",
    "zipf1000",
];

/// Benchmark options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Scenarios to run, comma-separated: single, base32, base32_sampled (base32 at temperature
    /// 0.8, top-p 0.95), lora32, sft32, poly32, lora32_r16,
    /// lora32_r64, lora32_mixed (ranks 8/16/32/64 in one batch), base128, lora128 (128 streams),
    /// zipf1000 (also reports `allhot`), ws2x (working set of 64 LoRAs over a cache of 32; also
    /// reports `ws2x_allhot`), coldload, ttft_under_load. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Tokens each request generates (single and the 32-stream scenarios).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Concurrent streams of the multi-stream scenarios (the `32` of their names).
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    /// Requests of the zipf1000 / allhot and ws2x / ws2x_allhot closed loops (zipf: each min(32,
    /// --new-tokens) tokens; ws2x: budgets spread over half to 1.5 times that).
    #[arg(long, default_value_t = 128)]
    pub zipf_requests: usize,
    /// Also run the zipf1000 requests on the base model alone (`zipf_base`), the base-only
    /// reference of the zipf1000 / allhot ratio column (one more closed-loop run).
    #[arg(long)]
    pub zipf_base: bool,
    /// Also write the rows as JSON to this file (with `--profile`, also `profiles`: per run of a
    /// scenario its name, round and phase times per step kind, as `tools::profile::to_json`).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the synthetic adapters are written (kept, and reused by later runs). Default: a
    /// temporary folder, removed afterwards.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Engine: largest prefill chunk of one prompt per step (server default).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Engine: largest number of token rows in one batch step (server default).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Engine: latency (ms) prefill rows may add to a step that carries decode tokens; 0 = off
    /// (server default).
    #[arg(long, default_value_t = crate::engine::actor::DEFAULT_MAX_DECODE_STALL_MS)]
    pub max_decode_stall_ms: u64,
    /// Seed of prompts, adapters and request sequences.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Runs the selected scenarios this many times, round after round. Each adapter scenario's
    /// ratio is to the base run of its own round (minutes apart at most, so a host that gets
    /// busier or quieter moves both); a table after the results gives, per scenario, every
    /// round's tok/s and ratio, the median tok/s and the smallest and median ratio.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also time every phase of the batch steps (trace spans: norms, projections, attention,
    /// adapter deltas, head, sampling) and print, per scenario, where a decode step's and a
    /// prefill step's time went. Costs well under 1% of a step.
    #[arg(long)]
    pub profile: bool,
    /// Runs base32 again after each 32-stream adapter scenario (lora32, sft32, poly32,
    /// lora32_r16, lora32_r64, lora32_mixed; base32 must be selected) and takes each of their
    /// ratios to the mean of the base32 runs just before and just after it, so that a host whose
    /// speed drifts within minutes moves both sides of the ratio. Each extra base32 run is a row.
    #[arg(long)]
    pub bracket_base: bool,
}

/// The scenarios whose ratio is to base32 (what `--bracket-base` brackets).
const AGAINST_BASE32: [&str; 7] = ["base32_sampled", "lora32", "sft32", "poly32", "lora32_r16", "lora32_r64", "lora32_mixed"];

fn selected(args: &BenchArgs) -> anyhow::Result<Vec<&'static str>> {
    if args.scenarios.is_empty() {
        return Ok(SCENARIOS.to_vec());
    }
    let mut want = Vec::new();
    for s in &args.scenarios {
        let s = s.trim();
        let s = match s {
            "allhot" => "zipf1000",
            "ws2x_allhot" => "ws2x",
            s => s,
        };
        match SCENARIOS.iter().find(|n| **n == s) {
            Some(n) => want.push(*n),
            None => anyhow::bail!("--scenarios: unknown scenario `{s}` (known: {})", SCENARIOS.join(", ")),
        }
    }
    // Run in the canonical order so the base-only references run before their comparisons.
    Ok(SCENARIOS.iter().copied().filter(|n| want.contains(n)).collect())
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scenarios = selected(&args)?;
    anyhow::ensure!(args.new_tokens >= 2, "--new-tokens must be at least 2");
    anyhow::ensure!(args.streams >= 2, "--streams must be at least 2");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        !args.bracket_base || scenarios.contains(&"base32"),
        "--bracket-base needs base32 among the scenarios (the runs it brackets with)"
    );
    anyhow::ensure!(args.prefill_chunk >= 1 && args.max_batch_tokens >= 1, "--prefill-chunk and --max-batch-tokens must be positive");
    crate::bootstrap::set_threads(args.model.threads);
    let (work, temporary) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("modserve-bench-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("--work-dir {}", work.display()))?;
    let result = run_in(&args, &scenarios, work.clone());
    if temporary {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn run_in(args: &BenchArgs, scenarios: &[&str], work: PathBuf) -> anyhow::Result<()> {
    let t_all = Instant::now();
    let load_before = loadavg();
    eprintln!("[bench] loading the model ({:?} weights) ...", args.model.weights);
    let model = crate::bootstrap::load_model(&args.model)?;
    let front = Arc::new(TextFrontEnd::from_model(&model));
    let cfg = EngineConfig {
        max_running: scenarios::WIDE_STREAMS.max(args.streams),
        max_queued: 256.max(args.streams * 2),
        max_batch_tokens: args.max_batch_tokens,
        prefill_chunk: args.prefill_chunk,
        max_decode_stall: crate::engine::actor::decode_stall(args.max_decode_stall_ms),
        ..EngineConfig::default()
    };
    let engine = spawn_engine(model.llama.clone(), front.clone(), cfg.clone())?;
    let base = BaseShapes::new(model.llama.cfg.clone());
    let vocab = model.llama.cfg.vocab_size;
    let ctx = Ctx {
        model,
        front,
        engine,
        cfg,
        work,
        base,
        vocab,
        new_tokens: args.new_tokens,
        streams: args.streams,
        zipf_requests: args.zipf_requests.max(1),
        zipf_base: args.zipf_base,
        seed: args.seed,
    };
    scenarios::warmup(&ctx)?;
    let mut res = Results::default();
    let mut profiles = Vec::new();
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("[bench] ==== round {round} of {} ====", args.rounds);
            // Every round's adapter rows compare with its own base runs.
            (res.base_streams, res.base_wide) = (None, None);
        }
        for name in scenarios {
            let first_row = res.rows.len();
            run_scenario(&ctx, name, &mut res)?;
            if args.profile {
                profiles.push((*name, round, crate::tools::profile::global().take()));
            }
            if let (true, true, Some(before)) = (args.bracket_base, AGAINST_BASE32.contains(name), res.base_streams) {
                let bracket_row = res.rows.len();
                run_scenario(&ctx, "base32", &mut res)?;
                if let Some(after) = res.base_streams {
                    stats::bracket(&mut res.rows[first_row..bracket_row], before, after);
                    res.rows[bracket_row].notes = format!("after {name} (--bracket-base): {}", res.rows[bracket_row].notes);
                }
                if args.profile {
                    profiles.push(("base32", round, crate::tools::profile::global().take()));
                }
            }
            if args.rounds > 1 {
                for r in &mut res.rows[first_row..] {
                    r.round = Some(round);
                    r.notes = format!("round {round}: {}", r.notes);
                }
            }
        }
    }
    let threads = args.model.threads.map(|t| t.to_string()).unwrap_or_else(|| "all".into());
    let header = format!(
        "modserve bench: model {}, weights {:?}, threads {threads}, new_tokens {}, streams {}, prefill_chunk {}, max_batch_tokens {}, max_decode_stall_ms {}, seed {} ({:.0} s total; host load average {load_before} before, {} after, on {} CPUs)",
        ctx.model.source.display(),
        args.model.weights,
        args.new_tokens,
        args.streams,
        args.prefill_chunk,
        args.max_batch_tokens,
        args.max_decode_stall_ms,
        args.seed,
        t_all.elapsed().as_secs_f64(),
        loadavg(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("{header}\n");
    print!("{}", stats::render_table(&res.rows));
    let rounds = stats::render_rounds(&res.rows);
    if !rounds.is_empty() {
        println!("\n### {} rounds\n\n{rounds}", args.rounds);
    }
    for (name, _, table) in &profiles {
        println!("\n### Phase profile: {name}\n{}", crate::tools::profile::render(table));
    }
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "model": ctx.model.source.display().to_string(),
            "weights": format!("{:?}", args.model.weights).to_lowercase(),
            "threads": args.model.threads,
            "new_tokens": args.new_tokens,
            "streams": args.streams,
            "prefill_chunk": args.prefill_chunk,
            "max_batch_tokens": args.max_batch_tokens,
            "max_decode_stall_ms": args.max_decode_stall_ms,
            "seed": args.seed,
            "rounds": args.rounds,
            "total_s": t_all.elapsed().as_secs_f64(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "rows": res.rows,
            "profiles": profiles
                .iter()
                .map(|(name, round, table)| serde_json::json!({"scenario": name, "round": round, "steps": crate::tools::profile::to_json(table)}))
                .collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(())
}

/// Runs scenario `name`, adding its rows to `res`, each noted with how many cores it kept busy
/// and how much CPU other processes and the hypervisor took meanwhile. The phase profile is
/// reset before it (read it with `tools::profile::global().take()` after).
fn run_scenario(ctx: &Ctx, name: &str, res: &mut Results) -> anyhow::Result<()> {
    eprintln!("[bench] == {name} ==");
    let t0 = Instant::now();
    let (cpu0, host0, first_row) = (stats::cpu_seconds(), stats::host_cpu(), res.rows.len());
    crate::tools::profile::global().take();
    match name {
        "single" => scenarios::single(ctx, res)?,
        "base32" => scenarios::base_streams(ctx, res)?,
        "base32_sampled" => scenarios::base_streams_sampled(ctx, res)?,
        "lora32" => scenarios::lora_streams(ctx, res)?,
        "sft32" => scenarios::sft_streams(ctx, res)?,
        "poly32" => scenarios::poly_streams(ctx, res)?,
        "base128" => scenarios::base_streams_wide(ctx, res)?,
        "lora32_r16" | "lora32_r64" | "lora32_mixed" | "lora128" => scenarios::lora_streams_named(ctx, res, name)?,
        "zipf1000" => load::zipf(ctx, res)?,
        "coldload" => load::coldload(ctx, res)?,
        "ttft_under_load" => load::ttft_under_load(ctx, res)?,
        "ws2x" => working_set::ws2x(ctx, res)?,
        other => unreachable!("unknown scenario {other}"),
    }
    drive::wait_idle(ctx);
    let wall = t0.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (cpu0, stats::cpu_seconds()) {
        // Fewer busy cores than --threads means other processes, or the hypervisor (steal:
        // the VM wanted a CPU it did not get), took CPU from this run.
        let mine = (b - a) / wall.max(1e-9);
        let host = match (host0, stats::host_cpu()) {
            (Some(h0), Some(h1)) => format!(
                "; other processes {:.2} cores, hypervisor steal {:.2} cores",
                ((h1.busy - h0.busy) / wall.max(1e-9) - mine).max(0.0),
                (h1.steal - h0.steal) / wall.max(1e-9)
            ),
            _ => String::new(),
        };
        let note = format!("[this scenario kept {mine:.2} cores busy on average{host}]");
        for r in &mut res.rows[first_row..] {
            r.notes = format!("{} {note}", r.notes);
        }
    }
    eprintln!("[bench]   {name} took {wall:.1} s");
    Ok(())
}

/// The 1-minute load average of the host (other processes skew every number here).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        b: BenchArgs,
    }

    #[test]
    fn scenario_selection() {
        let a = Cli::parse_from(["x"]).b;
        assert_eq!(selected(&a).unwrap(), SCENARIOS.to_vec());
        assert_eq!((a.new_tokens, a.streams, a.prefill_chunk, a.max_batch_tokens, a.max_decode_stall_ms), (128, 32, 256, 512, 30));
        let a = Cli::parse_from(["x", "--scenarios", "lora32,single,allhot"]).b;
        assert_eq!(selected(&a).unwrap(), vec!["single", "lora32", "zipf1000"]);
        let a = Cli::parse_from(["x", "--scenarios", "zipf1000,ws2x_allhot"]).b;
        assert_eq!(selected(&a).unwrap(), vec!["ws2x", "zipf1000"]);
        let a = Cli::parse_from(["x", "--scenarios", "nope"]).b;
        assert!(selected(&a).unwrap_err().to_string().contains("unknown scenario `nope`"));
    }
}
