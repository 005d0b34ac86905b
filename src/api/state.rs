//! What the gRPC services and the HTTP API share: the engine handle, the text front end and the adapter store once
//! the model is loaded, and the draining flag.
//!
//! Invariant: before the model is ready, or once draining has begun, every inference call is
//! refused with UNAVAILABLE (health reports NOT_SERVING at the same moments).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tonic::{Code, Status};

use super::status::status;
use crate::adapters::named::CompositionBook;
use crate::adapters::store::AdapterStore;
use crate::engine::actor::EngineHandle;
use crate::engine::prepare::TextFrontEnd;

/// Everything available once the model is loaded.
pub struct Ready {
    pub engine: EngineHandle,
    pub front: Arc<TextFrontEnd>,
    pub store: Option<Arc<AdapterStore>>,
    /// Saved compositions.
    pub book: Arc<CompositionBook>,
    /// The base model's name (`model` in requests and listings).
    pub base_name: String,
    /// Bounds the label values of per-module metrics.
    pub labels: Arc<super::labels::LabelBudget>,
}

/// Shared serving state.
#[derive(Default)]
pub struct ServingState {
    ready: OnceLock<Ready>,
    draining: AtomicBool,
}

impl ServingState {
    pub fn set_ready(&self, r: Ready) {
        let _ = self.ready.set(r);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The ready state, if the server accepts new work.
    pub fn accepting(&self) -> Result<&Ready, Status> {
        if self.is_draining() {
            return Err(status(Code::Unavailable, "draining", "the server is shutting down"));
        }
        self.ready.get().ok_or_else(|| status(Code::Unavailable, "not_ready", "the model is still loading"))
    }

    /// The ready state regardless of draining, or UNAVAILABLE while the model loads.
    pub fn loaded(&self) -> Result<&Ready, Status> {
        self.ready.get().ok_or_else(|| status(Code::Unavailable, "not_ready", "the model is still loading"))
    }

    /// The ready state regardless of draining (admin reads, drain progress).
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.get()
    }

    /// The adapter store, or FAILED_PRECONDITION when no adapter root is configured.
    pub fn store(&self) -> Result<Arc<AdapterStore>, Status> {
        let r = self.ready.get().ok_or_else(|| status(Code::Unavailable, "not_ready", "the model is still loading"))?;
        r.store.clone().ok_or_else(|| status(Code::FailedPrecondition, "no_adapter_root", "the server was started without --adapter-root"))
    }
}
