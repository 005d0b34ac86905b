//! Process bootstrap shared by every subcommand that runs the model: allocator and thread-pool
//! settings, device, default-model resolution (fetching it on first use), model loading and the
//! adapter store. Invariant: `keep_freed_memory` and `set_threads` run first, before any other
//! thread (compute pools, tokio) exists.
use std::path::PathBuf;

use crate::adapters::registry::{AdapterRoot, Registry};
use crate::adapters::store::AdapterStore;
use crate::config::{parse_device, AdapterArgs, ModelArgs};
use crate::model::load::{load, LoadOptions, LoadedModel};

/// Sets the compute thread count. Must run before any compute thread pool starts.
///
/// All parallel compute (GEMMs, int8 kernels, attention, delta kernels) runs on the one rayon
/// pool of `threads` workers. candle 0.11 also starts a second, spin-waiting "barrier pool" for
/// its element-wise ops sized like rayon's; beside the rayon workers it oversubscribes the cores
/// (measured: 16% of batched-decode time spinning on 2 cores). Unless `CANDLE_NUM_THREADS` is
/// set by the user, that pool gets no worker: element-wise ops run on the calling thread.
pub fn set_threads(threads: Option<usize>) {
    // SAFETY-free in edition 2021; called at start-up before other threads exist.
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

pub use crate::kernels::alloc::keep_freed_memory;

/// Starts the thread that hands free heap pages back to the kernel every `every` (see
/// [`crate::kernels::alloc::return_free_memory`]): the allocator keeps freed memory for the
/// steps' buffers, and this bounds what module loads and evictions leave behind. Each pass is
/// timed (`modserve_malloc_trim_seconds`); the next step re-faults the few MB of buffers it
/// needs.
pub fn spawn_memory_trimmer(every: std::time::Duration) {
    let spawned = std::thread::Builder::new().name("modserve-trim".into()).spawn(move || loop {
        std::thread::sleep(every);
        let t0 = std::time::Instant::now();
        let released = crate::kernels::alloc::return_free_memory();
        let took = t0.elapsed();
        metrics::histogram!("modserve_malloc_trim_seconds").record(took.as_secs_f64());
        tracing::debug!(released, took_ms = took.as_secs_f64() * 1e3, "returned free heap pages to the kernel");
    });
    if let Err(e) = spawned {
        tracing::warn!("could not start the memory trimmer thread: {e}");
    }
}

/// The model path: `--model`, or the default model in the models folder (fetched if missing).
pub fn resolve_model_path(args: &ModelArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.model {
        anyhow::ensure!(p.exists(), "--model {}: no such file or directory", p.display());
        return Ok(p.clone());
    }
    let path = crate::tools::fetch::default_model_path(&args.models_dir);
    if path.exists() {
        return Ok(path);
    }
    Ok(crate::tools::fetch::fetch_model(&args.models_dir, &mut |m| tracing::info!("{m}"))?)
}

/// Resolves and loads the model described by `args`.
pub fn load_model(args: &ModelArgs) -> anyhow::Result<LoadedModel> {
    let path = resolve_model_path(args)?;
    let device = parse_device(&args.device)?;
    let t0 = std::time::Instant::now();
    let m = load(&path, &LoadOptions { weights: args.weights, device })?;
    tracing::info!(path = %path.display(), weights = ?args.weights, secs = t0.elapsed().as_secs_f64(), "model loaded");
    Ok(m)
}

/// Opens the adapter store over `model` when an adapter root is configured.
/// `auto_register`: module ids resolve as paths under the root without an explicit registration.
pub fn open_adapter_store(model: &LoadedModel, adapters: &AdapterArgs, auto_register: bool) -> anyhow::Result<Option<AdapterStore>> {
    Ok(match &adapters.adapter_root {
        Some(root) => {
            let registry = Registry::new(AdapterRoot::new(root)?, auto_register);
            Some(AdapterStore::for_model(registry, adapters.adapter_cache_bytes as usize, model.llama.clone()))
        }
        None => None,
    })
}

/// The KV-memory budget: `configured` bytes, or (0) a quarter of the memory this process may
/// use: the cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) when one is set, else the
/// machine's `MemTotal`. Falls back to 1 GiB when neither can be read.
pub fn kv_budget(configured: u64) -> usize {
    if configured > 0 {
        return configured as usize;
    }
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = read_u64("/sys/fs/cgroup/memory.max").or_else(|| read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    });
    // cgroup v1 reports "no limit" as a huge number.
    let limit = match (cgroup, machine) {
        (Some(c), Some(m)) => c.min(m),
        (c, m) => c.or(m).unwrap_or(4 << 30),
    };
    let budget = (limit / 4) as usize;
    tracing::info!(bytes = budget, limit, "KV-memory budget (a quarter of the memory limit; --max-kv-bytes sets it)");
    budget
}
