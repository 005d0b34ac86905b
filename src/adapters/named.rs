//! Named compositions: a name that stands for a composition (deltas with scales and an optional
//! Poly route), usable wherever a request names its composition (gRPC `model`, the OpenAI `model`
//! field). Saved durably in `<state dir>/compositions.json`.
//!
//! Invariants: the file is replaced atomically (written to a temporary file in the same folder,
//! synced, renamed), so a crash leaves the old or the new set, never a torn one; a save or delete
//! is in memory only once it is on disk. Names follow module-id rules (1 to 256 bytes, no control
//! characters, no `+`, `@` or `#`). A composition may name modules that are not (or no longer)
//! registered: that is reported at request time and in listings, never silently dropped.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::composition::{CompositionSpec, DeltaRef};
use super::error::AdapterError;
use super::formats::poly::Routing;
use super::registry::EXPRESSION_CHARS;

/// File name inside the state folder.
pub const FILE_NAME: &str = "compositions.json";
/// Most saved compositions (each is small; the bound keeps the file and listings bounded).
pub const MAX_COMPOSITIONS: usize = 10_000;

#[derive(Serialize, Deserialize)]
struct FileDelta {
    module: String,
    scale: f32,
}

#[derive(Serialize, Deserialize)]
struct FileRoute {
    inventory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights: Option<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    deltas: Vec<FileDelta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route: Option<FileRoute>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    compositions: BTreeMap<String, FileEntry>,
}

fn to_file(spec: &CompositionSpec) -> FileEntry {
    FileEntry {
        deltas: spec.deltas.iter().map(|d| FileDelta { module: d.id.clone(), scale: d.scale }).collect(),
        route: spec.route.as_ref().map(|(inv, r)| FileRoute {
            inventory: inv.clone(),
            task: match r {
                Routing::Task(t) => Some(*t),
                Routing::Weights(_) => None,
            },
            weights: match r {
                Routing::Weights(w) => Some(w.clone()),
                Routing::Task(_) => None,
            },
        }),
    }
}

fn from_file(name: &str, e: FileEntry) -> Result<CompositionSpec, String> {
    let route = match e.route {
        None => None,
        Some(FileRoute { inventory, task: Some(t), weights: None }) => Some((inventory, Routing::Task(t))),
        Some(FileRoute { inventory, task: None, weights: Some(w) }) => Some((inventory, Routing::Weights(w))),
        Some(_) => return Err(format!("composition `{name}`: a route has exactly one of `task` and `weights`")),
    };
    Ok(CompositionSpec { deltas: e.deltas.into_iter().map(|d| DeltaRef { id: d.module, scale: d.scale }).collect(), route })
}

/// Checks a composition name (the module-id rules).
pub fn validate_name(name: &str) -> Result<(), AdapterError> {
    let bad = |reason: &str| AdapterError::BadPath { id: name.into(), reason: reason.into() };
    if name.is_empty() || name.len() > 256 {
        return Err(bad("composition names are 1 to 256 bytes"));
    }
    if name.chars().any(|c| c.is_control() || EXPRESSION_CHARS.contains(&c)) {
        return Err(bad("composition names may not contain control characters, `+`, `@` or `#`"));
    }
    Ok(())
}

/// Checks what a saved composition holds: at least one part, finite scales, non-empty ids.
pub fn validate_spec(spec: &CompositionSpec) -> Result<(), AdapterError> {
    if spec.is_empty() {
        return Err(AdapterError::Composition("a saved composition needs at least one delta or a route".into()));
    }
    for d in &spec.deltas {
        if d.id.is_empty() || !d.scale.is_finite() {
            return Err(AdapterError::Composition(format!("delta `{}`: ids are non-empty and scales finite", super::error::clip(&d.id))));
        }
    }
    if let Some((inv, r)) = &spec.route {
        if inv.is_empty() {
            return Err(AdapterError::Composition("the route's inventory id is empty".into()));
        }
        if let Routing::Weights(w) = r {
            if w.is_empty() || w.iter().any(|x| !x.is_finite()) {
                return Err(AdapterError::Composition("routing weights are non-empty and finite".into()));
            }
        }
    }
    Ok(())
}

/// The saved compositions, in memory and (with a state folder) on disk.
pub struct CompositionBook {
    file: Option<PathBuf>,
    entries: RwLock<BTreeMap<String, CompositionSpec>>,
}

impl CompositionBook {
    /// Compositions kept in memory only (tools, tests).
    pub fn in_memory() -> Self {
        Self { file: None, entries: RwLock::new(BTreeMap::new()) }
    }

    /// Opens (creating the folder if needed) the book in `state_dir`, reading what was saved.
    pub fn open(state_dir: &Path) -> Result<Self, AdapterError> {
        let state = |reason: String| AdapterError::State { path: state_dir.into(), reason };
        std::fs::create_dir_all(state_dir).map_err(|e| state(format!("cannot create the state folder: {e}")))?;
        let file = state_dir.join(FILE_NAME);
        let mut entries = BTreeMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => {
                let f: FileFormat = serde_json::from_slice(&bytes)
                    .map_err(|e| AdapterError::State { path: file.clone(), reason: format!("not a compositions file: {e}") })?;
                if f.version != 1 {
                    return Err(AdapterError::State { path: file, reason: format!("version {} (this server reads 1)", f.version) });
                }
                for (name, e) in f.compositions {
                    let spec = from_file(&name, e).map_err(|reason| AdapterError::State { path: file.clone(), reason })?;
                    entries.insert(name, spec);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AdapterError::State { path: file, reason: e.to_string() }),
        }
        Ok(Self { file: Some(file), entries: RwLock::new(entries) })
    }

    fn persist(&self, entries: &BTreeMap<String, CompositionSpec>) -> Result<(), AdapterError> {
        let Some(file) = &self.file else { return Ok(()) };
        let f = FileFormat { version: 1, compositions: entries.iter().map(|(k, v)| (k.clone(), to_file(v))).collect() };
        let bytes = serde_json::to_vec_pretty(&f).map_err(|e| AdapterError::State { path: file.clone(), reason: e.to_string() })?;
        let err = |e: std::io::Error| AdapterError::State { path: file.clone(), reason: e.to_string() };
        let dir = file.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        tmp.write_all(&bytes).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(file).map_err(|e| err(e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Saves (or replaces) `name`. Returns whether it replaced an earlier one.
    pub fn save(&self, name: &str, spec: CompositionSpec) -> Result<bool, AdapterError> {
        validate_name(name)?;
        validate_spec(&spec)?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if !entries.contains_key(name) && entries.len() >= MAX_COMPOSITIONS {
            return Err(AdapterError::Limit(format!("at most {MAX_COMPOSITIONS} saved compositions")));
        }
        let mut next = entries.clone();
        let replaced = next.insert(name.to_string(), spec).is_some();
        self.persist(&next)?;
        *entries = next;
        Ok(replaced)
    }

    /// Deletes `name`.
    pub fn delete(&self, name: &str) -> Result<CompositionSpec, AdapterError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let mut next = entries.clone();
        let old = next.remove(name).ok_or_else(|| AdapterError::UnknownComposition(name.into()))?;
        self.persist(&next)?;
        *entries = next;
        Ok(old)
    }

    pub fn get(&self, name: &str) -> Option<CompositionSpec> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Every saved composition, by name.
    pub fn list(&self) -> Vec<(String, CompositionSpec)> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The module ids a composition names (deltas, then the route's inventory).
pub fn module_ids(spec: &CompositionSpec) -> impl Iterator<Item = &str> {
    spec.deltas.iter().map(|d| d.id.as_str()).chain(spec.route.as_ref().map(|(inv, _)| inv.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::composition::parse_expression;

    #[test]
    fn saved_compositions_survive_a_reopen_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let book = CompositionBook::open(&state).unwrap();
        assert!(!book.save("de_qa", parse_expression("lang_de+task_qa@0.5+inv#task=3").unwrap()).unwrap());
        assert!(!book.save("mix", parse_expression("inv#w=0.25,0.75").unwrap()).unwrap());
        assert!(book.save("mix", parse_expression("a@-1").unwrap()).unwrap());
        for bad in ["", "a+b", "a@b", "a#b", "x\n"] {
            assert!(book.save(bad, parse_expression("a").unwrap()).is_err(), "{bad:?}");
        }
        assert!(book.save("empty", CompositionSpec::default()).is_err());
        let again = CompositionBook::open(&state).unwrap();
        assert_eq!(again.list().len(), 2);
        assert_eq!(again.get("de_qa"), Some(parse_expression("lang_de+task_qa@0.5+inv#task=3").unwrap()));
        assert_eq!(again.get("mix"), Some(parse_expression("a@-1").unwrap()));
        again.delete("mix").unwrap();
        assert_eq!(again.delete("mix").unwrap_err().code(), "unknown_composition");
        assert_eq!(CompositionBook::open(&state).unwrap().list().len(), 1);
        // A damaged file is an error naming it, not an empty book.
        std::fs::write(state.join(FILE_NAME), b"{").unwrap();
        let e = CompositionBook::open(&state).err().unwrap();
        assert_eq!(e.code(), "state_io");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let book = CompositionBook::open(dir.path()).unwrap();
        book.save("keep", parse_expression("a").unwrap()).unwrap();
        // Replace the folder by a file: the temporary file cannot be created there.
        let moved = dir.path().with_extension("moved");
        std::fs::rename(dir.path(), &moved).unwrap();
        std::fs::write(dir.path(), b"not a folder").unwrap();
        assert_eq!(book.save("new", parse_expression("b").unwrap()).unwrap_err().code(), "state_io");
        assert!(book.get("new").is_none());
        std::fs::remove_file(dir.path()).unwrap();
        std::fs::rename(&moved, dir.path()).unwrap();
    }
}
