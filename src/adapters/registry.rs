//! Module ids under a confined adapter root, with kind auto-detection and change fingerprints.
//!
//! Invariants: an id is a relative path of normal components (no `..`, no absolute path, no
//! empty or `.` component); after symlink resolution the module path must still lie inside the
//! canonical root (a symlink pointing out is refused). A registration records a fingerprint
//! (size, mtime, inode of every file) so a file swapped after registration is noticed and loaded
//! as a new version.
use std::path::{Component, Path, PathBuf};

use dashmap::DashMap;

use super::error::AdapterError;

/// What a module folder (or file) holds, detected from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// PEFT LoRA (`adapter_config.json` with `peft_type: LORA`).
    Lora,
    /// PEFT Poly inventory (`peft_type: POLY`); used through routing, not as a plain delta.
    Poly,
    /// composable-sft `pytorch_diff.bin`.
    SparseDiff,
    /// Native sparse delta `sparse_delta.safetensors` (docs/ADAPTER_FORMATS.md).
    SparseNative,
    /// Dense task vector (safetensors with Hugging Face parameter names).
    TaskVector,
    /// A merge recipe (`recipe.json`) producing a new delta from other files.
    Merge,
}

impl ModuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Poly => "poly",
            Self::SparseDiff => "sparse_diff",
            Self::SparseNative => "sparse_native",
            Self::TaskVector => "task_vector",
            Self::Merge => "merge",
        }
    }
}

/// The adapter root: every module path resolves inside it.
#[derive(Debug, Clone)]
pub struct AdapterRoot {
    root: PathBuf,
}

impl AdapterRoot {
    /// `dir` must exist; it is canonicalised once.
    pub fn new(dir: &Path) -> Result<Self, AdapterError> {
        let root = dir.canonicalize().map_err(|e| AdapterError::Io { path: dir.into(), reason: format!("adapter root: {e}") })?;
        if !root.is_dir() {
            return Err(AdapterError::Io { path: dir.into(), reason: "adapter root is not a directory".into() });
        }
        Ok(Self { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Resolves a module id (a relative path) to a path inside the root.
    pub fn resolve(&self, id: &str) -> Result<PathBuf, AdapterError> {
        let bad = |reason: &str| AdapterError::BadPath { id: id.into(), reason: reason.into() };
        if id.is_empty() {
            return Err(bad("empty module id"));
        }
        let rel = Path::new(id);
        for c in rel.components() {
            match c {
                Component::Normal(_) => {}
                Component::ParentDir => return Err(bad("`..` is not allowed in module ids")),
                Component::RootDir | Component::Prefix(_) => return Err(bad("absolute paths are not allowed")),
                Component::CurDir => return Err(bad("`.` components are not allowed")),
            }
        }
        let joined = self.root.join(rel);
        let real = joined.canonicalize().map_err(|e| AdapterError::Io {
            path: joined.clone(),
            reason: format!("module `{id}` not found under the adapter root: {e}"),
        })?;
        if !real.starts_with(&self.root) {
            return Err(bad("the path leaves the adapter root (symlink)"));
        }
        Ok(real)
    }
}

/// Detects the module kind of a folder or file.
pub fn detect_kind(path: &Path) -> Result<ModuleKind, AdapterError> {
    if path.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        return match name {
            "pytorch_diff.bin" => Ok(ModuleKind::SparseDiff),
            "sparse_delta.safetensors" => Ok(ModuleKind::SparseNative),
            n if n.ends_with(".safetensors") => Ok(ModuleKind::TaskVector),
            n if n.ends_with(".json") => Ok(ModuleKind::Merge),
            _ => Err(AdapterError::Unsupported { path: path.into(), reason: "unrecognised module file".into() }),
        };
    }
    let cfg = path.join("adapter_config.json");
    if cfg.is_file() {
        let text = super::source::read_regular_to_string(&cfg)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| AdapterError::Malformed { path: cfg.clone(), reason: e.to_string() })?;
        return match v.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => Ok(ModuleKind::Lora),
            Some("POLY") => Ok(ModuleKind::Poly),
            other => Err(AdapterError::Unsupported { path: cfg, reason: format!("peft_type {other:?} (supported: LORA, POLY)") }),
        };
    }
    for (file, kind) in [
        ("pytorch_diff.bin", ModuleKind::SparseDiff),
        ("sparse_delta.safetensors", ModuleKind::SparseNative),
        ("recipe.json", ModuleKind::Merge),
        ("task_vector.safetensors", ModuleKind::TaskVector),
    ] {
        if path.join(file).is_file() {
            return Ok(kind);
        }
    }
    Err(AdapterError::Unsupported {
        path: path.into(),
        reason: "no adapter_config.json, pytorch_diff.bin, sparse_delta.safetensors, recipe.json or task_vector.safetensors".into(),
    })
}

/// A registered module.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub id: String,
    pub path: PathBuf,
    pub kind: ModuleKind,
}

/// Module ids -> paths under the root. Lock-free reads (dashmap).
pub struct Registry {
    root: AdapterRoot,
    entries: DashMap<String, Registration>,
    /// Resolve unregistered ids as paths under the root (the CLI); the server registers explicitly.
    auto_register: bool,
}

impl Registry {
    pub fn new(root: AdapterRoot, auto_register: bool) -> Self {
        Self { root, entries: DashMap::new(), auto_register }
    }

    pub fn root(&self) -> &AdapterRoot {
        &self.root
    }

    /// Registers `id` for the module at `rel_path` (default: the id itself) under the root.
    pub fn register(&self, id: &str, rel_path: Option<&str>) -> Result<Registration, AdapterError> {
        validate_id(id)?;
        let path = self.root.resolve(rel_path.unwrap_or(id))?;
        let kind = detect_kind(&path)?;
        let reg = Registration { id: id.into(), path, kind };
        self.entries.insert(id.into(), reg.clone());
        Ok(reg)
    }

    /// Removes a registration. In-flight requests keep the version they pinned.
    pub fn unregister(&self, id: &str) -> Result<Registration, AdapterError> {
        self.entries.remove(id).map(|(_, r)| r).ok_or_else(|| AdapterError::UnknownModule(id.into()))
    }

    /// Looks an id up (auto-registering it in CLI mode).
    pub fn get(&self, id: &str) -> Result<Registration, AdapterError> {
        if let Some(r) = self.entries.get(id) {
            return Ok(r.clone());
        }
        if self.auto_register {
            return self.register(id, None);
        }
        Err(AdapterError::UnknownModule(id.into()))
    }

    /// All registrations, sorted by id.
    pub fn list(&self) -> Vec<Registration> {
        let mut v: Vec<Registration> = self.entries.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// Ids are printable, at most 256 bytes, and contain no `#` (used in cache keys).
/// Characters that separate the parts of a composition expression (`a+b@0.5+inv#task=1`);
/// module ids and composition names may not contain them.
pub const EXPRESSION_CHARS: [char; 3] = ['+', '@', '#'];

fn validate_id(id: &str) -> Result<(), AdapterError> {
    let bad = |reason: &str| AdapterError::BadPath { id: id.into(), reason: reason.into() };
    if id.is_empty() || id.len() > 256 {
        return Err(bad("module ids are 1 to 256 bytes"));
    }
    if id.chars().any(|c| c.is_control() || EXPRESSION_CHARS.contains(&c)) {
        return Err(bad(
            "module ids may not contain control characters, `+`, `@` or `#` (they separate the parts of a composition expression)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::source::fingerprint;

    fn lora_dir(root: &Path, name: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), r#"{"peft_type":"LORA","r":4}"#).unwrap();
    }

    #[test]
    fn confinement_refuses_escapes() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        lora_dir(&root, "ok");
        lora_dir(outer.path(), "outside");
        std::os::unix::fs::symlink(outer.path().join("outside"), root.join("link")).unwrap();
        let r = AdapterRoot::new(&root).unwrap();
        assert!(r.resolve("ok").is_ok());
        for id in ["../outside", "ok/../../outside", "/etc", "link", "./ok", ""] {
            let e = r.resolve(id).unwrap_err();
            assert_eq!(e.code(), "adapter_path", "{id}: {e}");
        }
        let e = r.resolve("missing").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn detects_kinds_and_notices_swapped_files() {
        let root = tempfile::tempdir().unwrap();
        lora_dir(root.path(), "a");
        std::fs::create_dir_all(root.path().join("s")).unwrap();
        std::fs::write(root.path().join("s/pytorch_diff.bin"), b"x").unwrap();
        std::fs::write(root.path().join("tv.safetensors"), b"x").unwrap();
        let reg = Registry::new(AdapterRoot::new(root.path()).unwrap(), false);
        assert_eq!(reg.register("a", None).unwrap().kind, ModuleKind::Lora);
        assert_eq!(reg.register("s", None).unwrap().kind, ModuleKind::SparseDiff);
        assert_eq!(reg.register("tv", Some("tv.safetensors")).unwrap().kind, ModuleKind::TaskVector);
        assert!(matches!(reg.get("nope"), Err(AdapterError::UnknownModule(_))));
        let before = fingerprint(&root.path().join("s")).unwrap();
        std::fs::write(root.path().join("s/pytorch_diff.bin"), b"xy").unwrap();
        assert_ne!(before, fingerprint(&root.path().join("s")).unwrap());
        reg.unregister("a").unwrap();
        assert!(reg.get("a").is_err());
        assert!(reg.register("bad#id", Some("a")).is_err());
    }
}
