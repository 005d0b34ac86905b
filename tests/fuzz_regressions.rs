//! Replays every fuzz input kept under `tests/fixtures/fuzz/<target>/` (seeds and crash
//! reproducers) through the same harness the cargo-fuzz targets run (`fuzz/src/lib.rs`), on stable,
//! as ordinary tests: no input may make a loader panic. `seed-ok-*` inputs must also be accepted by
//! some loader of their target and `seed-err-*` inputs by none, so the harness stays meaningful.
//! `timeout-*` / `oom-*` / `slow-unit-*` inputs (resource findings) are replayed by
//! `resource_findings_finish`, which also requires each to be refused quickly and for the reason
//! listed in `RESOURCE_REASONS` (e.g. candle's memo deep-copy bomb, now refused by
//! `modserve::adapters::pickle_guard` before candle parses anything).
//!
//! Regenerate the seed files (after changing the harness's builders) with
//! `cargo test --test fuzz_regressions -- --ignored write_seed_files`.
#[path = "../fuzz/src/lib.rs"]
#[allow(clippy::all)]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz")
}

fn is_resource_finding(name: &str) -> bool {
    ["timeout-", "oom-", "slow-unit-"].iter().any(|p| name.starts_with(p))
}

/// The replayable inputs of `target`, sorted by name.
fn inputs(target: &str, resource: bool) -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .filter(|(n, _)| !n.starts_with('.') && n != "README.md" && is_resource_finding(n) == resource)
        .map(|(n, p)| (n, std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))))
        .collect();
    v.sort();
    v
}

/// Runs every input of `target`; fails listing each input that panicked or broke its seed contract.
fn replay(target: &str) {
    let all = inputs(target, false);
    assert!(all.iter().any(|(n, _)| n.starts_with("seed-ok-")), "{target}: no seed-ok-* inputs in {}", fixtures().display());
    let mut failures = Vec::new();
    for (name, data) in &all {
        match catch_unwind(AssertUnwindSafe(|| harness::run(target, data).expect("a known target"))) {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                failures.push(format!("{target}/{name}: PANIC: {msg}"));
            }
            Ok(accepted) if name.starts_with("seed-ok-") && accepted == 0 => {
                failures.push(format!("{target}/{name}: no loader accepted this valid seed"))
            }
            Ok(accepted) if name.starts_with("seed-err-") && accepted != 0 => {
                failures.push(format!("{target}/{name}: {accepted} loader(s) accepted this invalid seed"))
            }
            Ok(_) => {}
        }
    }
    assert!(failures.is_empty(), "{} of {} inputs failed:\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[test]
fn safetensors_task_vector() {
    replay("safetensors_task_vector");
}

#[test]
fn peft_config() {
    replay("peft_config");
}

#[test]
fn peft_bin() {
    replay("peft_bin");
}

#[test]
fn pickle_diff() {
    replay("pickle_diff");
}

#[test]
fn pickle_bin() {
    replay("pickle_bin");
}

#[test]
fn merge_recipe() {
    replay("merge_recipe");
}

#[test]
fn every_target_has_its_seed_files() {
    for target in harness::TARGETS {
        for (name, _) in harness::seeds(target) {
            let p = fixtures().join(target).join(&name);
            assert!(p.is_file(), "{} is missing (run the ignored write_seed_files test)", p.display());
        }
    }
}

/// Why each resource finding must be refused: `(file name, text in every refusal of its loaders)`.
const RESOURCE_REASONS: [(&str, &str); 2] = [
    // ~200 bytes that memo-put and memo-get a growing tuple: candle deep-copies on every memo
    // operation (GBs, minutes); `pickle_guard` counts the copies and refuses before parsing.
    ("oom-candle-pickle-memo-bomb", "memo deep-copy bomb"),
    // A 1M x 1M float tensor over a 256-byte storage: refused before anything is allocated.
    ("oom-candle-huge-tensor-shape", "claims more data than the file holds"),
];

/// Resource findings (`oom-*`, `timeout-*`, `slow-unit-*`): each must be refused by every loader of
/// its target, without a panic, within two seconds, with a `adapter_malformed` error that says why
/// (`RESOURCE_REASONS`).
#[test]
fn resource_findings_finish() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for target in harness::TARGETS {
        for (name, data) in inputs(target, true) {
            seen += 1;
            let t = std::time::Instant::now();
            let r = catch_unwind(AssertUnwindSafe(|| harness::run_explained(target, &data).expect("a known target")));
            let took = t.elapsed();
            eprintln!("{target}/{name}: {:?} in {took:?}", r.as_ref().map_err(|_| "panic"));
            let fail = |why: String| format!("{target}/{name}: {why}");
            let Ok((accepted, refusals)) = r else {
                failures.push(fail("PANIC".into()));
                continue;
            };
            if took > std::time::Duration::from_secs(2) {
                failures.push(fail(format!("took {took:?}")));
            }
            if accepted != 0 || refusals.is_empty() {
                failures.push(fail(format!("{accepted} loader(s) accepted it, {} refused it", refusals.len())));
            }
            let Some((_, reason)) = RESOURCE_REASONS.iter().find(|(n, _)| *n == name) else {
                failures.push(fail("no expected reason in RESOURCE_REASONS".into()));
                continue;
            };
            for refusal in &refusals {
                if !refusal.starts_with("adapter_malformed: ") || !refusal.contains(reason) {
                    failures.push(fail(format!("refused as `{refusal}`, expected adapter_malformed saying `{reason}`")));
                }
            }
        }
    }
    assert!(seen >= 4, "only {seen} resource findings under {}", fixtures().display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes `harness::seeds` to `tests/fixtures/fuzz/<target>/` and `fuzz/corpus/<target>/`.
#[test]
#[ignore]
fn write_seed_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for target in harness::TARGETS {
        for dir in [fixtures().join(target), root.join("fuzz/corpus").join(target)] {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in harness::seeds(target) {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}
