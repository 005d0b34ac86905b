//! Merge recipes: the JSON file that describes a merge (format in docs/ADAPTER_FORMATS.md), parsed
//! and checked before anything is loaded.
//!
//! Invariants: a recipe's paths are relative to its folder and never leave it (`..`, absolute
//! paths and symbolic links out are refused); methods, weights and options are validated here.
use std::path::{Component as PathPart, Path, PathBuf};

use serde::Deserialize;

use crate::adapters::error::AdapterError;

/// How components are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    Ewr,
    TaskArithmetic,
    Linear,
    Ties,
    DareLinear,
    Fisher,
}

impl MergeMethod {
    /// The recipe spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ewr => "ewr",
            Self::TaskArithmetic => "task_arithmetic",
            Self::Linear => "linear",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::Fisher => "fisher",
        }
    }
}

/// Optional lossy storage of the merged delta.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Compression {
    /// Best rank-`r` approximation per tensor (truncated SVD by subspace iteration).
    LowRank(usize),
    /// Keep this fraction of each tensor's entries, the largest in magnitude.
    TopK(f64),
}

/// One module taking part in a merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// A task-vector file or module folder (resolved, inside the recipe folder).
    pub task_vector: PathBuf,
    /// Its diagonal Fisher file (ewr, fisher).
    pub fisher: Option<PathBuf>,
    pub lambda: f64,
    /// Use `-tau` (an anti-expert).
    pub negate: bool,
}

/// A validated merge recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe file (named in errors).
    pub path: PathBuf,
    pub method: MergeMethod,
    pub lambda_base: f64,
    pub fisher_base: Option<PathBuf>,
    pub fisher_floor: f64,
    pub density: Option<f64>,
    pub seed: u64,
    pub components: Vec<Component>,
    pub compress: Option<Compression>,
}

impl Recipe {
    /// Every file or folder the recipe reads (component task vectors, their Fisher files and the
    /// base Fisher file): what the merged module's fingerprint, size and version must cover.
    pub fn sources(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.fisher_base.iter().cloned().collect();
        for c in &self.components {
            v.push(c.task_vector.clone());
            v.extend(c.fisher.iter().cloned());
        }
        v.sort();
        v.dedup();
        v
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    method: Option<MergeMethod>,
    #[allow(dead_code)]
    formula: Option<serde_json::Value>,
    #[allow(dead_code)]
    description: Option<String>,
    lambda_base: Option<f64>,
    fisher_base: Option<String>,
    fisher_floor: Option<f64>,
    density: Option<f64>,
    seed: Option<u64>,
    components: Vec<ComponentFile>,
    compress: Option<Compression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentFile {
    task_vector: String,
    fisher: Option<String>,
    lambda: Option<f64>,
    #[serde(default)]
    negate: bool,
}

/// Reads and validates a recipe; every referenced file must exist inside the recipe's folder.
pub fn load_recipe(path: &Path) -> Result<Recipe, AdapterError> {
    let err = |reason: String| AdapterError::Recipe { path: path.into(), reason };
    let text = crate::adapters::source::read_regular_to_string(path)?;
    let f: RecipeFile = serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON recipe: {e}")))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let method = match (f.method, &f.fisher_base) {
        (Some(m), _) => m,
        (None, Some(_)) => MergeMethod::Ewr,
        (None, None) => return Err(err("no `method` (and no `fisher_base`, which would imply ewr)".into())),
    };
    let m = method.name();
    let uses_fisher = matches!(method, MergeMethod::Ewr | MergeMethod::Fisher);
    let uses_density = matches!(method, MergeMethod::Ties | MergeMethod::DareLinear);
    let only = |field: &str, used: bool, present: bool, by: &str| -> Result<(), AdapterError> {
        if present && !used {
            return Err(err(format!("`{field}` is only used by {by}, not by {m}")));
        }
        Ok(())
    };
    only("fisher_base", method == MergeMethod::Ewr, f.fisher_base.is_some(), "ewr")?;
    only("lambda_base", method == MergeMethod::Ewr, f.lambda_base.is_some(), "ewr")?;
    only("fisher_floor", uses_fisher, f.fisher_floor.is_some(), "ewr and fisher")?;
    only("density", uses_density, f.density.is_some(), "ties and dare_linear")?;
    only("seed", method == MergeMethod::DareLinear, f.seed.is_some(), "dare_linear")?;
    if f.components.is_empty() {
        return Err(err("`components` is empty".into()));
    }
    let lambda_base = f.lambda_base.unwrap_or(1.0);
    if method == MergeMethod::Ewr && !(lambda_base.is_finite() && lambda_base > 0.0) {
        return Err(err(format!("`lambda_base` must be finite and > 0, got {lambda_base}")));
    }
    let fisher_floor = f.fisher_floor.unwrap_or(1e-6);
    if !(fisher_floor.is_finite() && fisher_floor > 0.0) {
        return Err(err(format!("`fisher_floor` must be finite and > 0, got {fisher_floor}")));
    }
    if uses_density {
        match f.density {
            Some(d) if d > 0.0 && d <= 1.0 => {}
            Some(d) => return Err(err(format!("`density` must be in (0, 1], got {d}"))),
            None => return Err(err(format!("{m} needs `density`"))),
        }
    }
    match f.compress {
        Some(Compression::LowRank(0)) => return Err(err("`compress.low_rank` must be >= 1".into())),
        Some(Compression::TopK(k)) if !(k > 0.0 && k <= 1.0) => return Err(err(format!("`compress.top_k` must be in (0, 1], got {k}"))),
        _ => {}
    }
    let fisher_base = match &f.fisher_base {
        Some(p) => Some(resolve(&dir, p, "fisher_base", path)?),
        None if method == MergeMethod::Ewr => return Err(err("ewr needs `fisher_base`".into())),
        None => None,
    };
    let mut components = Vec::with_capacity(f.components.len());
    for (i, c) in f.components.into_iter().enumerate() {
        let lambda = c.lambda.unwrap_or(1.0);
        if !lambda.is_finite() {
            return Err(err(format!("component {i}: `lambda` must be finite, got {lambda}")));
        }
        if uses_fisher && lambda < 0.0 {
            return Err(err(format!("component {i}: {m} needs `lambda` >= 0 (use `negate` for anti-experts), got {lambda}")));
        }
        let fisher = match (&c.fisher, uses_fisher) {
            (Some(p), true) => Some(resolve(&dir, p, &format!("component {i} fisher"), path)?),
            (None, true) => return Err(err(format!("component {i}: {m} needs a `fisher` file"))),
            (Some(_), false) => return Err(err(format!("component {i}: `fisher` is only used by ewr and fisher, not by {m}"))),
            (None, false) => None,
        };
        let task_vector = resolve(&dir, &c.task_vector, &format!("component {i} task_vector"), path)?;
        components.push(Component { task_vector, fisher, lambda, negate: c.negate });
    }
    let sum: f64 = components.iter().map(|c| c.lambda).sum();
    if matches!(method, MergeMethod::Fisher | MergeMethod::Linear) && sum.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(err(format!("{m} needs lambdas with a positive sum, got {sum}")));
    }
    if method == MergeMethod::Linear && components.iter().any(|c| c.lambda < 0.0) {
        return Err(err("linear is a weighted average: lambdas must be >= 0".into()));
    }
    Ok(Recipe {
        path: path.into(),
        method,
        lambda_base,
        fisher_base,
        fisher_floor,
        density: f.density,
        seed: f.seed.unwrap_or(0),
        components,
        compress: f.compress,
    })
}

/// `dir/rel`, refusing absolute paths, `..` and anything (symbolic links included) outside `dir`.
fn resolve(dir: &Path, rel: &str, what: &str, recipe: &Path) -> Result<PathBuf, AdapterError> {
    let err = |reason: String| AdapterError::Recipe { path: recipe.into(), reason: format!("{what} `{rel}`: {reason}") };
    let p = Path::new(rel);
    if rel.is_empty() {
        return Err(err("empty path".into()));
    }
    for part in p.components() {
        match part {
            PathPart::Normal(_) | PathPart::CurDir => {}
            PathPart::ParentDir => return Err(err("`..` may not leave the recipe folder".into())),
            PathPart::RootDir | PathPart::Prefix(_) => return Err(err("must be relative to the recipe folder".into())),
        }
    }
    let joined = dir.join(p);
    let canon = joined.canonicalize().map_err(|e| err(format!("not found ({}: {e})", joined.display())))?;
    let canon_dir = dir.canonicalize().map_err(|e| err(format!("recipe folder unreadable: {e}")))?;
    if !canon.starts_with(&canon_dir) {
        return Err(err("resolves outside the recipe folder".into()));
    }
    Ok(canon)
}
