//! The mix file of `modserve loadgen --mix`: its JSON schema ([`MixFile`]), validation into a
//! [`Mix`], and drawing requests from it (entries by weight, in Zipf mode one module by
//! popularity rank). The format is documented in [`super`].
//!
//! Invariants: a [`Mix`] has at least one entry, every entry exactly one prompt form, at least
//! one positive weight; drawing is deterministic for a seeded RNG (one stream per worker, see
//! `worker_seed`).
use std::path::Path;

use anyhow::{bail, Context};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::Rng;
use serde::Deserialize;

use crate::pb;

/// The mix file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixFile {
    pub entries: Vec<MixEntry>,
    #[serde(default)]
    pub zipf: Option<ZipfSpec>,
}

/// One kind of request and its weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixEntry {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub chat_user: Option<String>,
    #[serde(default)]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub deltas: Vec<MixDelta>,
    #[serde(default)]
    pub route: Option<MixRoute>,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: u32,
    #[serde(default)]
    pub min_new_tokens: u32,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: u32,
    #[serde(default)]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A delta of an entry's composition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixDelta {
    pub id: String,
    #[serde(default = "one_f32")]
    pub scale: f32,
}

/// Poly routing of an entry: a task id or explicit skill weights.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixRoute {
    pub inventory: String,
    #[serde(default)]
    pub task: Option<i64>,
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
}

/// Zipf-popular single-module mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZipfSpec {
    #[serde(default = "one")]
    pub s: f64,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub start: usize,
    #[serde(default = "one_f32")]
    pub scale: f32,
}

fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn default_max_new() -> u32 {
    64
}

/// A validated mix, ready to draw requests from.
#[derive(Debug, Clone)]
pub struct Mix {
    entries: Vec<MixEntry>,
    picker: WeightedPicker,
    zipf: Option<(Zipf, Vec<String>, f32)>,
}

impl Mix {
    /// Reads and validates a mix file.
    pub fn load(path: &Path) -> anyhow::Result<Mix> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--mix {}", path.display()))?;
        Mix::parse(&text).with_context(|| format!("--mix {}", path.display()))
    }

    /// Parses and validates mix JSON.
    pub fn parse(text: &str) -> anyhow::Result<Mix> {
        let file: MixFile = serde_json::from_str(text)?;
        Mix::from_file(file)
    }

    /// Validates a parsed mix file.
    pub fn from_file(file: MixFile) -> anyhow::Result<Mix> {
        if file.entries.is_empty() {
            bail!("`entries` is empty");
        }
        for (i, e) in file.entries.iter().enumerate() {
            let label = e.name.clone().unwrap_or_else(|| format!("entries[{i}]"));
            let forms = [e.prompt.is_some(), e.chat_user.is_some(), e.token_ids.is_some()].iter().filter(|b| **b).count();
            if forms != 1 {
                bail!("{label}: exactly one of `prompt`, `chat_user`, `token_ids` is required (found {forms})");
            }
            if matches!(&e.token_ids, Some(ids) if ids.is_empty()) {
                bail!("{label}: `token_ids` is empty");
            }
            if !(e.weight.is_finite() && e.weight >= 0.0) {
                bail!("{label}: `weight` must be a finite number >= 0");
            }
            for d in &e.deltas {
                if d.id.is_empty() || !d.scale.is_finite() {
                    bail!("{label}: every delta needs a non-empty `id` and a finite `scale`");
                }
            }
            if let Some(r) = &e.route {
                if r.task.is_some() == r.weights.is_some() {
                    bail!("{label}: `route` needs exactly one of `task` and `weights`");
                }
            }
            if !(e.temperature.is_finite() && e.temperature >= 0.0) {
                bail!("{label}: `temperature` must be >= 0");
            }
        }
        let picker = WeightedPicker::new(&file.entries.iter().map(|e| e.weight).collect::<Vec<_>>())
            .ok_or_else(|| anyhow::anyhow!("the entry weights must not all be 0"))?;
        let zipf = match file.zipf {
            None => None,
            Some(z) => {
                let modules = zipf_modules(&z)?;
                if !(z.s.is_finite() && z.s >= 0.0) {
                    bail!("zipf: `s` must be a finite number >= 0");
                }
                if !z.scale.is_finite() {
                    bail!("zipf: `scale` must be finite");
                }
                Some((Zipf::new(modules.len(), z.s), modules, z.scale))
            }
        };
        Ok(Mix { entries: file.entries, picker, zipf })
    }

    /// Label of each entry: its `name`, or `entries[i]`.
    pub fn entry_names(&self) -> Vec<String> {
        self.entries.iter().enumerate().map(|(i, e)| e.name.clone().unwrap_or_else(|| format!("entries[{i}]"))).collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the mix has no entries (never true for a validated mix).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Draws the next request: an entry by weight, and in Zipf mode its one module.
    pub fn draw(&self, rng: &mut impl Rng) -> (usize, pb::GenerateRequest) {
        let i = self.picker.pick(rng);
        let e = &self.entries[i];
        let deltas = match &self.zipf {
            Some((z, modules, scale)) => vec![delta(&modules[z.sample(rng)], *scale)],
            None => e.deltas.iter().map(|d| delta(&d.id, d.scale)).collect(),
        };
        (i, build_request(e, deltas))
    }
}

fn zipf_modules(z: &ZipfSpec) -> anyhow::Result<Vec<String>> {
    let modules = match (&z.template, z.count) {
        (Some(t), Some(n)) => {
            if !z.modules.is_empty() {
                bail!("zipf: give either `modules` or `template` + `count`, not both");
            }
            if !t.contains("{}") {
                bail!("zipf: `template` must contain `{{}}`");
            }
            (z.start..z.start + n).map(|i| t.replace("{}", &i.to_string())).collect()
        }
        (None, None) => z.modules.clone(),
        _ => bail!("zipf: `template` and `count` go together"),
    };
    if modules.is_empty() {
        bail!("zipf: the module list is empty");
    }
    Ok(modules)
}

fn delta(id: &str, scale: f32) -> pb::DeltaRef {
    pb::DeltaRef { module_id: id.to_string(), scale, scale_is_set: true }
}

fn build_request(e: &MixEntry, deltas: Vec<pb::DeltaRef>) -> pb::GenerateRequest {
    use pb::generate_request::Prompt;
    let prompt = if let Some(t) = &e.prompt {
        Prompt::Text(t.clone())
    } else if let Some(u) = &e.chat_user {
        Prompt::ChatUser(u.clone())
    } else {
        Prompt::TokenIds(pb::TokenIds { ids: e.token_ids.clone().unwrap_or_default() })
    };
    let route = e.route.as_ref().map(|r| pb::PolyRoute {
        inventory_id: r.inventory.clone(),
        routing: Some(match (&r.task, &r.weights) {
            (Some(t), _) => pb::poly_route::Routing::TaskId(*t),
            (None, w) => pb::poly_route::Routing::Weights(pb::RoutingWeights { values: w.clone().unwrap_or_default() }),
        }),
    });
    pb::GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: e.max_new_tokens,
        min_new_tokens: e.min_new_tokens,
        temperature: e.temperature,
        top_k: e.top_k,
        top_p: e.top_p,
        seed: e.seed,
        stop: e.stop.clone(),
        deltas,
        route,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Random choices
// ---------------------------------------------------------------------------------------------

/// Picks an index with probability proportional to its weight (rand's `WeightedIndex`; weights
/// that are not finite and positive count as 0).
#[derive(Debug, Clone)]
pub struct WeightedPicker {
    index: WeightedIndex<f64>,
}

impl WeightedPicker {
    /// None when no weight is positive.
    pub fn new(weights: &[f64]) -> Option<Self> {
        let clean = weights.iter().map(|w| if w.is_finite() && *w > 0.0 { *w } else { 0.0 });
        WeightedIndex::new(clean).ok().map(|index| Self { index })
    }

    /// Draws one index; indexes of weight 0 are never drawn.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        self.index.sample(rng)
    }
}

pub use crate::tools::stats::Zipf;

/// Seed of worker `i`: distinct, deterministic streams from one `--seed`.
pub(super) fn worker_seed(seed: u64, i: u64) -> u64 {
    // SplitMix64 finalizer over seed + i * golden gamma.
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn mix_parsing_and_validation() {
        let m = Mix::parse(
            r#"{"entries":[
                {"weight":3,"prompt":"hi","deltas":[{"id":"lora_a","scale":0.0}],"max_new_tokens":8},
                {"chat_user":"q","route":{"inventory":"poly","task":1},"temperature":0.5},
                {"weight":0,"token_ids":[1,2],"route":{"inventory":"poly","weights":[0.5,0.5]}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        let e = &m.entries[1];
        assert_eq!((e.weight, e.max_new_tokens), (1.0, 64));
        let r = build_request(&m.entries[0], m.entries[0].deltas.iter().map(|d| delta(&d.id, d.scale)).collect());
        assert_eq!(r.prompt, Some(pb::generate_request::Prompt::Text("hi".into())));
        assert_eq!(r.deltas, vec![pb::DeltaRef { module_id: "lora_a".into(), scale: 0.0, scale_is_set: true }]);
        assert_eq!(r.max_new_tokens, 8);
        let r = build_request(&m.entries[2], vec![]);
        assert_eq!(r.prompt, Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2] })));
        assert_eq!(r.route.unwrap().routing, Some(pb::poly_route::Routing::Weights(pb::RoutingWeights { values: vec![0.5, 0.5] })));
        let r = build_request(&m.entries[1], vec![]);
        assert_eq!(r.route.unwrap().routing, Some(pb::poly_route::Routing::TaskId(1)));

        for bad in [
            r#"{"entries":[]}"#,
            r#"{"entries":[{"prompt":"a","chat_user":"b"}]}"#,
            r#"{"entries":[{"weight":1}]}"#,
            r#"{"entries":[{"prompt":"a","weight":0}]}"#,
            r#"{"entries":[{"prompt":"a","weight":-1}]}"#,
            r#"{"entries":[{"prompt":"a","typo":1}]}"#,
            r#"{"entries":[{"token_ids":[]}]}"#,
            r#"{"entries":[{"prompt":"a","route":{"inventory":"p"}}]}"#,
            r#"{"entries":[{"prompt":"a","route":{"inventory":"p","task":1,"weights":[1]}}]}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"modules":[]}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"template":"m_{}"}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"template":"m","count":3}}"#,
            r#"{"entries":[{"prompt":"a"}],"zipf":{"s":-1,"modules":["a"]}}"#,
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn weighted_picking_follows_weights_and_skips_zero() {
        let p = WeightedPicker::new(&[3.0, 0.0, 1.0]).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0usize; 3];
        for _ in 0..40_000 {
            counts[p.pick(&mut rng)] += 1;
        }
        assert_eq!(counts[1], 0);
        let frac = counts[0] as f64 / 40_000.0;
        assert!((frac - 0.75).abs() < 0.01, "{frac}");
        assert!(WeightedPicker::new(&[0.0, 0.0]).is_none());
        // A trailing zero weight is never picked either.
        let p = WeightedPicker::new(&[1.0, 0.0]).unwrap();
        assert!((0..1000).all(|_| p.pick(&mut rng) == 0));
    }

    #[test]
    fn zipf_popularity_and_seeded_determinism() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = StdRng::seed_from_u64(42);
        let n = 100_000;
        let mut counts = vec![0usize; 1000];
        for _ in 0..n {
            counts[z.sample(&mut rng)] += 1;
        }
        let h: f64 = (1..=1000).map(|k| 1.0 / k as f64).sum();
        let p0 = counts[0] as f64 / n as f64;
        assert!((p0 - 1.0 / h).abs() < 0.01, "rank 1: {p0} vs {}", 1.0 / h);
        let p1 = counts[1] as f64 / n as f64;
        assert!((p1 - 0.5 / h).abs() < 0.01, "rank 2: {p1}");
        assert!(counts[0] > counts[9] && counts[9] > counts[99]);
        // s = 0 is uniform.
        let u = Zipf::new(4, 0.0);
        let mut c = [0usize; 4];
        for _ in 0..40_000 {
            c[u.sample(&mut rng)] += 1;
        }
        assert!(c.iter().all(|x| (*x as f64 / 40_000.0 - 0.25).abs() < 0.01), "{c:?}");

        // The same seed draws the same request sequence.
        let mix =
            Mix::parse(r#"{"entries":[{"prompt":"a"},{"prompt":"b","weight":2}],"zipf":{"s":1.1,"template":"lora_{}","count":1000}}"#)
                .unwrap();
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            (0..50).map(|_| mix.draw(&mut r).1).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        for r in draw(7) {
            assert_eq!(r.deltas.len(), 1);
            let id = &r.deltas[0].module_id;
            let k: usize = id.strip_prefix("lora_").unwrap().parse().unwrap();
            assert!(k < 1000);
        }
        assert_ne!(worker_seed(0, 0), worker_seed(0, 1));
    }

    #[test]
    fn fixture_mixes_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loadgen");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                Mix::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "fixture mixes in {}", dir.display());
    }
}
