//! What the benchmark's scenarios share: the loaded model, the engine, the work dir of synthetic
//! adapters ([`Ctx`]), and the rows measured so far ([`Results`]).
use std::path::PathBuf;
use std::sync::Arc;

use super::stats::Row;
use crate::adapters::registry::{AdapterRoot, Registry};
use crate::adapters::store::AdapterStore;
use crate::adapters::target::BaseShapes;
use crate::engine::actor::{EngineConfig, EngineHandle};
use crate::engine::prepare::TextFrontEnd;
use crate::model::load::LoadedModel;

/// What every scenario shares.
pub struct Ctx {
    pub model: LoadedModel,
    pub front: Arc<TextFrontEnd>,
    pub engine: EngineHandle,
    pub cfg: EngineConfig,
    pub work: PathBuf,
    pub base: BaseShapes,
    pub vocab: usize,
    pub new_tokens: usize,
    pub streams: usize,
    pub zipf_requests: usize,
    pub zipf_base: bool,
    pub seed: u64,
}

impl Ctx {
    /// A fresh adapter store over the work dir (ids are paths under it).
    pub fn store(&self, cache_bytes: usize) -> anyhow::Result<AdapterStore> {
        let registry = Registry::new(AdapterRoot::new(&self.work)?, true);
        Ok(AdapterStore::for_model(registry, cache_bytes, self.model.llama.clone()))
    }
}

/// Results so far, with the base-only throughputs later rows compare against.
#[derive(Default)]
pub struct Results {
    pub rows: Vec<Row>,
    /// tok/s of `base32` (the reference of the 32-stream adapter scenarios).
    pub base_streams: Option<f64>,
    /// tok/s of `base128` (the reference of `lora128`).
    pub base_wide: Option<f64>,
}
