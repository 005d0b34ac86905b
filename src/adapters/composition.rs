//! Compositions: what a request asks for ([`CompositionSpec`]: module ids with scales, plus an
//! optional Poly route) and what it resolves to ([`Composition`]: the pinned deltas), with the
//! command-line spellings `ID[@SCALE]` and `INVENTORY:TASK` / `INVENTORY:W1,W2,...`.
//!
//! Invariant: a [`Composition`] holds `Arc`s to every module version it uses, so those stay pinned
//! (never evicted, never changed) until the request drops it.
use std::sync::Arc;

use super::error::AdapterError;
use super::formats::poly::Routing;
use super::loader::LoadedModule;
use super::module_deltas::ModuleDeltas;

/// One `(module id, scale)` of a composition.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaRef {
    pub id: String,
    pub scale: f32,
}

/// A request's composition: deltas with scales, plus an optional Poly routing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompositionSpec {
    pub deltas: Vec<DeltaRef>,
    pub route: Option<(String, Routing)>,
}

impl CompositionSpec {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.route.is_none()
    }
}

/// Resolved deltas of one request: `W' = W + sum scale * delta`.
pub struct Composition {
    pub parts: Vec<(Arc<ModuleDeltas>, f32)>,
    /// The module versions this request pins.
    pub pinned: Vec<Arc<LoadedModule>>,
    /// Identifies the composition (ids, versions, scales) for grouping and logs.
    pub key: String,
}

/// Parses `ID[@SCALE]` (scale defaults to 1; the last `@` separates).
pub fn parse_delta_ref(s: &str) -> Result<DeltaRef, AdapterError> {
    let (id, scale) = match s.rsplit_once('@') {
        Some((id, sc)) => {
            let scale: f32 = sc.parse().map_err(|_| AdapterError::Composition(format!("`{s}`: scale `{sc}` is not a number")))?;
            (id, scale)
        }
        None => (s, 1.0),
    };
    if id.is_empty() {
        return Err(AdapterError::Composition(format!("`{s}`: empty module id")));
    }
    if !scale.is_finite() {
        return Err(AdapterError::Composition(format!("`{s}`: scale must be finite")));
    }
    Ok(DeltaRef { id: id.into(), scale })
}

/// Parses `ID:TASK` (an integer task id) or `ID:W1,W2,...` (explicit routing weights).
pub fn parse_route(s: &str) -> Result<(String, Routing), AdapterError> {
    let (id, r) =
        s.rsplit_once(':').ok_or_else(|| AdapterError::Composition(format!("`{s}`: expected INVENTORY:TASK or INVENTORY:W1,W2,...")))?;
    if id.is_empty() {
        return Err(AdapterError::Composition(format!("`{s}`: empty inventory id")));
    }
    if let Ok(t) = r.parse::<i64>() {
        return Ok((id.into(), Routing::Task(t)));
    }
    let w: Result<Vec<f32>, _> = r.split(',').map(|x| x.trim().parse::<f32>()).collect();
    match w {
        Ok(w) if !w.is_empty() => Ok((id.into(), Routing::Weights(w))),
        _ => Err(AdapterError::Composition(format!("`{s}`: `{r}` is neither a task id nor a list of weights"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs() {
        assert_eq!(parse_delta_ref("a/b@-0.5").unwrap(), DeltaRef { id: "a/b".into(), scale: -0.5 });
        assert_eq!(parse_delta_ref("lora").unwrap().scale, 1.0);
        assert!(parse_delta_ref("x@nan").is_err());
        assert!(parse_delta_ref("x@abc").is_err());
        assert_eq!(parse_route("poly:2").unwrap(), ("poly".into(), Routing::Task(2)));
        assert_eq!(parse_route("p:0.5,0.5").unwrap().1, Routing::Weights(vec![0.5, 0.5]));
        assert!(parse_route("poly").is_err());
        assert!(parse_route("poly:x").is_err());
    }
}
