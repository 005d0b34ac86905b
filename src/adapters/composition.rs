//! Compositions: what a request asks for ([`CompositionSpec`]: module ids with scales, plus an
//! optional Poly route) and what it resolves to ([`Composition`]: the pinned deltas), with the
//! command-line spellings `ID[@SCALE]` and `INVENTORY:TASK` / `INVENTORY:W1,W2,...`, and the
//! one-string expression of the OpenAI `model` field (`a+b@0.5+inv#task=3`, [`parse_expression`]).
//!
//! Invariant: a [`Composition`] holds `Arc`s to every module version it uses, so those stay pinned
//! (never evicted, never changed) until the request drops it.
use std::sync::Arc;

use super::error::AdapterError;
use super::formats::poly::Routing;
use super::loader::LoadedModule;
use super::module_deltas::ModuleDeltas;
pub use super::registry::EXPRESSION_CHARS;

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

/// Parses a composition expression: terms joined by `+`, each `MODULE[@SCALE]` or a Poly route
/// `INVENTORY#task=N` / `INVENTORY#w=W1,W2,...` (at most one route). Whitespace around terms is
/// ignored. Example: `sft_lang+sft_task@0.5+lora_x+poly_inv#task=3`.
pub fn parse_expression(s: &str) -> Result<CompositionSpec, AdapterError> {
    let bad = |why: String| AdapterError::Composition(format!("composition `{}`: {why}", super::error::clip(s)));
    let mut spec = CompositionSpec::default();
    for term in s.split('+').map(str::trim) {
        if term.is_empty() {
            return Err(bad("empty term (terms are joined by a single `+`)".into()));
        }
        if let Some((inv, routing)) = term.split_once('#') {
            if inv.is_empty() {
                return Err(bad(format!("`{term}`: empty inventory id")));
            }
            if spec.route.is_some() {
                return Err(bad("at most one Poly route (`INVENTORY#task=N`)".into()));
            }
            let routing = if let Some(t) = routing.strip_prefix("task=") {
                Routing::Task(t.parse().map_err(|_| bad(format!("`{term}`: task `{t}` is not an integer")))?)
            } else if let Some(w) = routing.strip_prefix("w=") {
                let w: Result<Vec<f32>, _> = w.split(',').map(|x| x.trim().parse::<f32>()).collect();
                match w {
                    Ok(w) if !w.is_empty() && w.iter().all(|x| x.is_finite()) => Routing::Weights(w),
                    _ => return Err(bad(format!("`{term}`: weights must be finite numbers, `w=0.5,0.5`"))),
                }
            } else {
                return Err(bad(format!("`{term}`: a route is `INVENTORY#task=N` or `INVENTORY#w=W1,W2,...`")));
            };
            spec.route = Some((inv.to_string(), routing));
        } else {
            spec.deltas.push(parse_delta_ref(term).map_err(|e| bad(e.to_string()))?);
        }
    }
    Ok(spec)
}

/// Writes a composition back as an expression (the inverse of [`parse_expression`]).
pub fn to_expression(spec: &CompositionSpec) -> String {
    let mut terms: Vec<String> =
        spec.deltas.iter().map(|d| if d.scale == 1.0 { d.id.clone() } else { format!("{}@{}", d.id, d.scale) }).collect();
    if let Some((inv, r)) = &spec.route {
        terms.push(match r {
            Routing::Task(t) => format!("{inv}#task={t}"),
            Routing::Weights(w) => format!("{inv}#w={}", w.iter().map(f32::to_string).collect::<Vec<_>>().join(",")),
        });
    }
    terms.join("+")
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

    #[test]
    fn parses_expressions() {
        let e = parse_expression("sft_lang + sft_task@0.5+lora_x+poly_inv#task=3").unwrap();
        assert_eq!(
            e.deltas,
            vec![
                DeltaRef { id: "sft_lang".into(), scale: 1.0 },
                DeltaRef { id: "sft_task".into(), scale: 0.5 },
                DeltaRef { id: "lora_x".into(), scale: 1.0 }
            ]
        );
        assert_eq!(e.route, Some(("poly_inv".into(), Routing::Task(3))));
        assert_eq!(parse_expression("a@-2").unwrap().deltas[0].scale, -2.0);
        let w = parse_expression("inv#w=0.25, 0.75").unwrap();
        assert!(w.deltas.is_empty());
        assert_eq!(w.route.unwrap().1, Routing::Weights(vec![0.25, 0.75]));
        for bad in ["", "a++b", "a+", "a@x", "#task=1", "i#task=x", "i#w=", "i#w=1,nan", "i#route=1", "i#task=1+j#task=2", "a@inf"] {
            assert!(parse_expression(bad).is_err(), "{bad:?} parsed");
        }
        for s in ["a", "a@0.5+b", "a+inv#task=2", "inv#w=0.5,0.5"] {
            assert_eq!(to_expression(&parse_expression(s).unwrap()), s);
        }
    }
}
