//! What both front ends (gRPC and the OpenAI HTTP API) do with a generation request: resolve the
//! `model` string into a composition, prepare the request off the async threads (tokenization,
//! adapter loading) and submit it to the engine; plus the model catalog (`/v1/models`,
//! `Adapters.ListModels`) and per-module metrics.
//!
//! Invariants: `model` resolves in one fixed order: the base model's name (or `base`), a
//! registered module id, a saved composition, else a composition expression (ids in it must be
//! registered; the store checks that when it resolves the composition). Metric labels are module
//! ids and composition names only, at most `top_n` distinct values each, the rest under `other`:
//! no request can grow the number of series without bound.
use tokio::sync::mpsc::Receiver;
use tonic::{Code, Status};

use super::state::{Ready, ServingState};
use super::status::status;
use crate::adapters::composition::{parse_expression, CompositionSpec};
use crate::adapters::error::AdapterError;
use crate::adapters::named::module_ids;
use crate::adapters::registry::EXPRESSION_CHARS;
use crate::engine::actor::{EventResult, FinishInfo};
use crate::engine::prepare::EngineRequest;

/// Name under which the base model is always listed, beside its own name.
pub const BASE_ALIAS: &str = "base";

/// What a `model` string named, for metrics and listings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    pub spec: CompositionSpec,
    /// The saved composition's name, when `model` named one.
    pub composition: Option<String>,
}

/// Resolves `model` (empty = the base model) against what the server has.
pub fn resolve_model(ready: &Ready, model: &str) -> Result<Resolved, AdapterError> {
    if model.is_empty() || model == BASE_ALIAS || model == ready.base_name {
        return Ok(Resolved::default());
    }
    if let Some(store) = &ready.store {
        if let Ok(reg) = store.registry().get(model) {
            // A Poly inventory alone is not a composition: it needs a route.
            if reg.kind == crate::adapters::registry::ModuleKind::Poly {
                return Err(AdapterError::Composition(format!(
                    "`{}` is a Poly inventory: name a route, `{}#task=N`",
                    crate::adapters::error::clip(model),
                    crate::adapters::error::clip(model)
                )));
            }
            return Ok(Resolved {
                spec: CompositionSpec {
                    deltas: vec![crate::adapters::composition::DeltaRef { id: model.into(), scale: 1.0 }],
                    route: None,
                },
                composition: None,
            });
        }
    }
    if let Some(spec) = ready.book.get(model) {
        return Ok(Resolved { spec, composition: Some(model.into()) });
    }
    if model.contains(EXPRESSION_CHARS) {
        return Ok(Resolved { spec: parse_expression(model)?, composition: None });
    }
    Err(AdapterError::UnknownModel(model.into()))
}

/// Adds `extra` (a request's own deltas and route) after `base` (what its `model` named).
pub fn combine(mut base: CompositionSpec, extra: CompositionSpec) -> Result<CompositionSpec, AdapterError> {
    base.deltas.extend(extra.deltas);
    match (&base.route, extra.route) {
        (Some(_), Some(_)) => return Err(AdapterError::Composition("two Poly routes: `model` names one and the request another".into())),
        (None, r) => base.route = r,
        (Some(_), None) => {}
    }
    Ok(base)
}

/// Prepares `req` on a blocking thread and submits it to the engine.
pub async fn start(state: &ServingState, req: EngineRequest) -> Result<Receiver<EventResult>, Status> {
    let ready = state.accepting()?;
    let span = tracing::info_span!("request", request_id = %req.request_id, composition = ?req.composition);
    // Entered only around synchronous work: a guard held across the await below stayed entered
    // on the worker thread while other requests ran there, and tracing-subscriber then panicked
    // ("tried to clone a span that already closed") under concurrent load.
    let front = ready.front.clone();
    let store = ready.store.clone();
    let prepare = span.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare.in_scope(|| front.prepare(store.as_deref(), req)))
        .await
        .map_err(|e| status(Code::Internal, "internal", e.to_string()))??;
    let rx = span.in_scope(|| ready.engine.submit(prepared))?;
    Ok(rx)
}

/// One entry of the model catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub id: String,
    /// `base`, `module` or `composition`.
    pub kind: &'static str,
    /// The module's kind (`lora`, `poly`, ...), or the composition as an expression.
    pub detail: String,
    /// Module ids a composition names that are not registered (it fails until they are).
    pub missing: Vec<String>,
}

/// Modules a composition names that are not registered.
pub fn missing_modules(ready: &Ready, spec: &CompositionSpec) -> Vec<String> {
    let Some(store) = &ready.store else { return module_ids(spec).map(str::to_string).collect() };
    module_ids(spec).filter(|id| store.registry().get(id).is_err()).map(str::to_string).collect()
}

/// The base model (by name and as `base`), every registered module, every saved composition.
pub fn catalog(ready: &Ready) -> Vec<CatalogEntry> {
    let mut out = vec![
        CatalogEntry { id: ready.base_name.clone(), kind: "base", detail: String::new(), missing: vec![] },
        CatalogEntry { id: BASE_ALIAS.into(), kind: "base", detail: ready.base_name.clone(), missing: vec![] },
    ];
    if let Some(store) = &ready.store {
        out.extend(store.registry().list().into_iter().map(|r| CatalogEntry {
            id: r.id,
            kind: "module",
            detail: r.kind.as_str().into(),
            missing: vec![],
        }));
    }
    for (name, spec) in ready.book.list() {
        let missing = missing_modules(ready, &spec);
        out.push(CatalogEntry { id: name, kind: "composition", detail: crate::adapters::composition::to_expression(&spec), missing });
    }
    out
}

/// Per-module and per-composition labels of one request, fixed when it is admitted.
#[derive(Debug, Clone, Default)]
pub struct UsageLabels {
    modules: Vec<String>,
    composition: Option<String>,
}

impl UsageLabels {
    pub fn new(ready: &Ready, resolved: &Resolved, spec: &CompositionSpec) -> Self {
        let mut modules: Vec<String> = module_ids(spec).map(|id| ready.labels.label(id)).collect();
        modules.sort();
        modules.dedup();
        Self { modules, composition: resolved.composition.as_deref().map(|c| ready.labels.label(c)) }
    }

    /// Counts a finished request: requests, generated tokens and time to first token.
    pub fn record(&self, f: &FinishInfo) {
        for m in &self.modules {
            metrics::counter!("modserve_module_requests_total", "module" => m.clone()).increment(1);
            metrics::counter!("modserve_module_generated_tokens_total", "module" => m.clone()).increment(f.generated_tokens as u64);
            metrics::histogram!("modserve_module_ttft_seconds", "module" => m.clone()).record(f.ttft_s);
        }
        if let Some(c) = &self.composition {
            metrics::counter!("modserve_composition_requests_total", "composition" => c.clone()).increment(1);
            metrics::counter!("modserve_composition_generated_tokens_total", "composition" => c.clone())
                .increment(f.generated_tokens as u64);
            metrics::histogram!("modserve_composition_ttft_seconds", "composition" => c.clone()).record(f.ttft_s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combining_keeps_one_route() {
        let a = parse_expression("x+inv#task=1").unwrap();
        let b = parse_expression("y@0.5").unwrap();
        let c = combine(a.clone(), b).unwrap();
        assert_eq!(c.deltas.len(), 2);
        assert!(c.route.is_some());
        assert_eq!(combine(a.clone(), a).unwrap_err().code(), "invalid_composition");
    }
}
