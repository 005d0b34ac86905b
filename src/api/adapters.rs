//! The `modserve.v1.Adapters` service: registration, listing, description, merges, preloading and
//! eviction of modules under the adapter root. Loading work runs on blocking threads, never on the
//! engine thread; evicting or unregistering never disturbs in-flight requests (they hold pinned
//! versions).
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::auth::{Scope, TokenSet};
use super::state::ServingState;
use super::status::status;
use crate::adapters::composition::{parse_expression, to_expression, CompositionSpec};
use crate::adapters::loader::{LoadedModule, ModuleData};
use crate::adapters::registry::Registration;
use crate::adapters::store::AdapterStore;
use crate::pb;

/// Service implementation.
pub struct AdaptersApi {
    state: Arc<ServingState>,
    tokens: TokenSet,
}

impl AdaptersApi {
    pub fn new(state: Arc<ServingState>, tokens: TokenSet) -> Self {
        Self { state, tokens }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| status(Code::Internal, "internal", e.to_string()))?
}

fn composition_info(ready: &super::state::Ready, name: String, spec: &CompositionSpec, replaced: bool) -> pb::CompositionInfo {
    let (deltas, route) = super::inference::spec_to_pb(spec);
    pb::CompositionInfo {
        name,
        deltas,
        route,
        expression: to_expression(spec),
        missing_modules: super::submit::missing_modules(ready, spec),
        replaced,
    }
}

fn cache_prefix(id: &str) -> String {
    format!("{id}#")
}

/// Describes a registration, with load details when `loaded` is given.
pub fn module_info(store: &AdapterStore, reg: &Registration, loaded: Option<&LoadedModule>) -> pb::ModuleInfo {
    let rel = reg.path.strip_prefix(store.registry().root().path()).unwrap_or(&reg.path);
    let resident = store.cache().has_prefix(&cache_prefix(&reg.id));
    let mut info = pb::ModuleInfo {
        module_id: reg.id.clone(),
        path: rel.display().to_string(),
        kind: reg.kind.as_str().into(),
        resident,
        ..Default::default()
    };
    if let Some(m) = loaded {
        use crate::adapters::cache::Weighted;
        info.bytes = m.bytes() as u64;
        info.file_bytes = m.file_bytes;
        info.version = m.version.clone();
        info.rank = m.rank.unwrap_or(0) as u32;
        match &m.data {
            ModuleData::Deltas(d) => info.targets = d.targets.keys().map(|t| t.hf_name()).collect(),
            ModuleData::Poly(p) => {
                info.targets = p.targets().map(|t| t.hf_name()).collect();
                info.poly_tasks = p.n_tasks() as u32;
            }
        }
    }
    info
}

#[tonic::async_trait]
impl pb::adapters_server::Adapters for AdaptersApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::ModuleInfo>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let store = self.state.store()?;
        let r = request.into_inner();
        blocking(move || {
            let path = (!r.path.is_empty()).then_some(r.path.as_str());
            let reg = store.registry().register(&r.module_id, path)?;
            store.cache().evict_prefix(&cache_prefix(&reg.id));
            Ok(Response::new(module_info(&store, &reg, None)))
        })
        .await
    }

    async fn unregister(&self, request: Request<pb::ModuleRef>) -> Result<Response<pb::UnregisterResponse>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let store = self.state.store()?;
        let id = request.into_inner().module_id;
        store.registry().unregister(&id)?;
        store.cache().evict_prefix(&cache_prefix(&id));
        Ok(Response::new(pb::UnregisterResponse {}))
    }

    async fn list(&self, _request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.tokens.check(&_request, Scope::Inference)?;
        let store = self.state.store()?;
        let modules = store.registry().list().iter().map(|r| module_info(&store, r, None)).collect();
        Ok(Response::new(pb::ListResponse { modules }))
    }

    async fn describe(&self, request: Request<pb::ModuleRef>) -> Result<Response<pb::ModuleInfo>, Status> {
        self.tokens.check(&request, Scope::Inference)?;
        let store = self.state.store()?;
        let id = request.into_inner().module_id;
        blocking(move || {
            let reg = store.registry().get(&id)?;
            let mut info = module_info(&store, &reg, None);
            let resident = info.resident;
            let m = store.module(&id)?;
            info = module_info(&store, &reg, Some(&m));
            info.resident = resident;
            Ok(Response::new(info))
        })
        .await
    }

    async fn merge(&self, request: Request<pb::MergeRequest>) -> Result<Response<pb::ModuleInfo>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let store = self.state.store()?;
        let r = request.into_inner();
        blocking(move || {
            if store.registry().list().iter().any(|m| m.id == r.module_id) {
                return Err(status(
                    Code::AlreadyExists,
                    "module_exists",
                    format!("module `{}` is already registered; unregister it first or pick another id", r.module_id),
                ));
            }
            let reg = store.registry().register(&r.module_id, Some(&r.recipe_path))?;
            if reg.kind != crate::adapters::registry::ModuleKind::Merge {
                let _ = store.registry().unregister(&r.module_id);
                return Err(status(Code::InvalidArgument, "merge_recipe", format!("{} is not a merge recipe", r.recipe_path)));
            }
            match store.module(&r.module_id) {
                Ok(m) => Ok(Response::new(module_info(&store, &reg, Some(&m)))),
                Err(e) => {
                    let _ = store.registry().unregister(&r.module_id);
                    Err(e.into())
                }
            }
        })
        .await
    }

    async fn preload(&self, request: Request<pb::ModuleRef>) -> Result<Response<pb::ModuleInfo>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let store = self.state.store()?;
        let id = request.into_inner().module_id;
        blocking(move || {
            let reg = store.registry().get(&id)?;
            let m = store.module(&id)?;
            Ok(Response::new(module_info(&store, &reg, Some(&m))))
        })
        .await
    }

    async fn evict(&self, request: Request<pb::ModuleRef>) -> Result<Response<pb::EvictResponse>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let store = self.state.store()?;
        let id = request.into_inner().module_id;
        store.registry().get(&id)?;
        let n = store.cache().evict_prefix(&cache_prefix(&id));
        Ok(Response::new(pb::EvictResponse { evicted: n as u32 }))
    }

    async fn save_composition(&self, request: Request<pb::SaveCompositionRequest>) -> Result<Response<pb::CompositionInfo>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let ready = self.state.loaded()?;
        let r = request.into_inner();
        let spec = if r.expression.is_empty() {
            super::inference::spec_from_pb(r.deltas, r.route)?
        } else if r.deltas.is_empty() && r.route.is_none() {
            parse_expression(&r.expression)?
        } else {
            return Err(status(Code::InvalidArgument, "invalid_composition", "give either an expression or deltas/route, not both"));
        };
        if ready.store.as_ref().is_some_and(|s| s.registry().get(&r.name).is_ok())
            || r.name == super::submit::BASE_ALIAS
            || r.name == ready.base_name
        {
            return Err(status(
                Code::AlreadyExists,
                "name_taken",
                format!("`{}` already names a module or the base model", crate::adapters::error::clip(&r.name)),
            ));
        }
        let book = ready.book.clone();
        let (name, spec2) = (r.name.clone(), spec.clone());
        let replaced = blocking(move || Ok(book.save(&name, spec2)?)).await?;
        tracing::info!(composition = %r.name, expression = %to_expression(&spec), replaced, "composition saved");
        Ok(Response::new(composition_info(ready, r.name, &spec, replaced)))
    }

    async fn delete_composition(&self, request: Request<pb::CompositionRef>) -> Result<Response<pb::DeleteCompositionResponse>, Status> {
        self.tokens.check(&request, Scope::Admin)?;
        let ready = self.state.loaded()?;
        let name = request.into_inner().name;
        let book = ready.book.clone();
        blocking(move || Ok(book.delete(&name)?)).await?;
        Ok(Response::new(pb::DeleteCompositionResponse {}))
    }

    async fn list_compositions(
        &self,
        request: Request<pb::ListCompositionsRequest>,
    ) -> Result<Response<pb::ListCompositionsResponse>, Status> {
        self.tokens.check(&request, Scope::Inference)?;
        let ready = self.state.loaded()?;
        let compositions = ready.book.list().into_iter().map(|(n, s)| composition_info(ready, n, &s, false)).collect();
        Ok(Response::new(pb::ListCompositionsResponse { compositions }))
    }

    async fn list_models(&self, request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.tokens.check(&request, Scope::Inference)?;
        let ready = self.state.loaded()?;
        let models = super::submit::catalog(ready)
            .into_iter()
            .map(|e| pb::ModelEntry { id: e.id, kind: e.kind.into(), detail: e.detail, missing_modules: e.missing })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
