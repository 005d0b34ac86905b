//! Bearer-token authentication with two scopes: `inference` (Inference service, Adapters reads)
//! and `admin` (Adapters register/unregister/merge/preload/evict).
//!
//! Invariants: tokens are compared in constant time (`subtle`) and never logged; with no tokens
//! configured every caller is anonymous with every scope, which `serve` allows only on loopback
//! addresses unless `--insecure-allow-anonymous`; health and reflection need no token (probes).
use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Code, Request, Status};

use super::status::status;

/// A permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "inference" => Some(Scope::Inference),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Configured tokens.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Arc<Vec<(Vec<u8>, Vec<Scope>)>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

impl TokenSet {
    /// Parses `TOKEN SCOPE[,SCOPE]` lines (`#` comments, blank lines ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(tok), Some(scopes), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("line {}: expected `TOKEN SCOPE[,SCOPE]`", n + 1));
            };
            let scopes = scopes
                .split(',')
                .map(|s| Scope::parse(s).ok_or_else(|| format!("line {}: unknown scope `{s}` (inference, admin)", n + 1)))
                .collect::<Result<Vec<_>, _>>()?;
            if tok.len() < 16 {
                return Err(format!("line {}: tokens must be at least 16 characters", n + 1));
            }
            tokens.push((tok.as_bytes().to_vec(), scopes));
        }
        if tokens.is_empty() {
            return Err("no tokens".into());
        }
        Ok(Self { tokens: Arc::new(tokens) })
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Scopes of `presented`, comparing against every token in constant time.
    fn scopes_of(&self, presented: &[u8]) -> Option<&[Scope]> {
        let mut found: Option<&[Scope]> = None;
        for (t, scopes) in self.tokens.iter() {
            if bool::from(t.as_slice().ct_eq(presented)) {
                found = Some(scopes);
            }
        }
        found
    }

    /// Checks the request's `authorization: Bearer ...` for `need`.
    pub fn check<T>(&self, req: &Request<T>, need: Scope) -> Result<(), Status> {
        self.check_header(req.metadata().get("authorization").and_then(|v| v.to_str().ok()), need)
    }

    /// Checks an `Authorization` header value (gRPC metadata or HTTP header) for `need`.
    pub fn check_header(&self, header: Option<&str>, need: Scope) -> Result<(), Status> {
        if self.is_empty() {
            return Ok(());
        }
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(status(Code::Unauthenticated, "unauthenticated", "missing `authorization: Bearer <token>`"));
        };
        match self.scopes_of(token.trim().as_bytes()) {
            None => Err(status(Code::Unauthenticated, "unauthenticated", "invalid token")),
            Some(s) if s.contains(&need) || s.contains(&Scope::Admin) => Ok(()),
            Some(_) => Err(status(Code::PermissionDenied, "permission_denied", format!("this token lacks the {need:?} scope"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(h: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = h {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn scopes_and_errors() {
        let t = TokenSet::parse("# comment\ninference-token-0001 inference\nadmin-token-000001 admin\n").unwrap();
        assert!(t.check(&req(Some("Bearer inference-token-0001")), Scope::Inference).is_ok());
        assert_eq!(t.check(&req(Some("Bearer inference-token-0001")), Scope::Admin).unwrap_err().code(), Code::PermissionDenied);
        assert!(t.check(&req(Some("Bearer admin-token-000001")), Scope::Inference).is_ok());
        assert_eq!(t.check(&req(Some("Bearer nope-nope-nope-nope")), Scope::Inference).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(t.check(&req(None), Scope::Inference).unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(t.check(&req(Some("Basic abc")), Scope::Inference).unwrap_err().code(), Code::Unauthenticated);
        assert!(TokenSet::parse("short inference").is_err());
        assert!(TokenSet::parse("long-enough-token-1 root").unwrap_err().contains("unknown scope"));
        assert!(TokenSet::default().check(&req(None), Scope::Admin).is_ok());
    }
}
