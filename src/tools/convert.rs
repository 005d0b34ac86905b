//! `modserve convert-sft`: converts a composable-sft `pytorch_diff.bin` to the native sparse format
//! (`modserve-sparse-v1`, `DIR/sparse_delta.safetensors`) with [`sft::convert_pytorch_diff`], for
//! modules that should load without the pickle reader.
//!
//! Invariants: the diff is validated against the base model's shapes (read from the GGUF metadata
//! or `config.json` only; no weights are loaded); the output file appears whole or not at all (it
//! is written next to its final name and renamed); an existing output is kept unless `--force`; a
//! failed conversion leaves no file (and no folder it created).
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::adapters::formats::sft::{self, ConvertSummary, SPARSE_FILE};
use crate::adapters::target::BaseShapes;
use crate::model::config::LlamaConfig;

#[derive(Debug, Args)]
pub struct ConvertSftArgs {
    /// The composable-sft `pytorch_diff.bin` to convert.
    #[arg(long)]
    pub input: PathBuf,
    /// Module folder to write `sparse_delta.safetensors` into (created if missing).
    #[arg(long)]
    pub output: PathBuf,
    /// Base model the diff applies to: a .gguf file or a Hugging Face model directory (only its
    /// config is read). Default: the fetched model in the models folder.
    #[arg(long, env = "MODSERVE_MODEL")]
    pub model: Option<PathBuf>,
    /// Models folder used when --model is not given.
    #[arg(long, env = "MODSERVE_MODELS_DIR", default_value = crate::config::DEFAULT_MODELS_DIR)]
    pub models_dir: PathBuf,
    /// Replace an existing `sparse_delta.safetensors` in the output folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs the conversion; returns the file written and what it holds.
pub fn run(a: &ConvertSftArgs) -> anyhow::Result<(PathBuf, ConvertSummary)> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let p = crate::tools::fetch::default_model_path(&a.models_dir);
            anyhow::ensure!(p.exists(), "no --model given and {} does not exist (run `modserve fetch-model` or pass --model)", p.display());
            p
        }
    };
    let base = base_shapes(&model)?;
    let created = !a.output.exists();
    std::fs::create_dir_all(&a.output).with_context(|| format!("--output {}: cannot create the folder", a.output.display()))?;
    let dst = a.output.join(SPARSE_FILE);
    anyhow::ensure!(a.force || !dst.exists(), "{} already exists (pass --force to replace it)", dst.display());
    let partial = a.output.join(format!(".{SPARSE_FILE}.partial"));
    let written = sft::convert_pytorch_diff(&a.input, &partial, &base).map_err(anyhow::Error::from).and_then(|s| {
        std::fs::rename(&partial, &dst).with_context(|| format!("cannot move the converted file to {}", dst.display()))?;
        Ok(s)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
        if created {
            let _ = std::fs::remove_dir(&a.output); // only if still empty
        }
    }
    Ok((dst, written?))
}

/// The shapes of the base model at `model` (GGUF metadata or a Hugging Face `config.json`).
pub fn base_shapes(model: &Path) -> anyhow::Result<BaseShapes> {
    let cfg = if model.is_dir() {
        let p = model.join("config.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("--model {}: cannot read config.json", model.display()))?;
        LlamaConfig::from_hf_json(&text).with_context(|| format!("{}", p.display()))?
    } else {
        let mut f = std::fs::File::open(model).with_context(|| format!("--model {}", model.display()))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f)
            .with_context(|| format!("--model {}: not a readable GGUF file", model.display()))?;
        LlamaConfig::from_gguf(&content).with_context(|| format!("{}", model.display()))?
    };
    Ok(BaseShapes::new(cfg))
}
