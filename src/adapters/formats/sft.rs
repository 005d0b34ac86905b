//! Composable sparse fine-tunings (SFTs): sparse additive diffs of base parameters.
//!
//! Two formats become a [`ModuleDeltas`] of `MatrixDelta::Sparse` (CSR by output row):
//! - composable-sft's `pytorch_diff.bin`: `torch.save({"body": {name: {"size": torch.Size,
//!   "index_steps": [int...], "values": tensor}}})`, a zip whose `*/data.pkl` is read with
//!   `candle_core::pickle` (no Python) once [`super::pickle_guard`]'s pre-scan accepts it. Flat
//!   indices are the running sum of `index_steps`, with the FIRST dimension varying fastest
//!   (`row = flat % rows`, `col = flat / rows` for a 2-D weight); values are a float32 storage
//!   in `*/data/<key>`.
//! - the native `modserve-sparse-v1` safetensors format (`NAME.indices` row-major flat indices,
//!   `NAME.values` f32, shapes in `__metadata__`; see docs/ADAPTER_FORMATS.md), written by
//!   [`save_sparse_safetensors`] / [`convert_pytorch_diff`].
//!
//! Invariants: cost scales with the number of non-zeros (no dense copy is ever built); every
//! parameter is a base parameter with the base shape; indices lie inside it; values are finite.
//! Every error names the file; nothing on an input path panics.
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::pickle::Object;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::safetensors_io::{metadata, parse, read_bytes};
use crate::adapters::error::AdapterError;
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::target::{BaseShapes, Target};
use crate::kernels::sparse_layout::SparseMatrix;

/// `format` value of the native sparse safetensors metadata.
pub const SPARSE_FORMAT: &str = "modserve-sparse-v1";
/// Conventional file name of a native sparse delta inside a module folder.
pub const SPARSE_FILE: &str = "sparse_delta.safetensors";

fn malformed(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Malformed { path: path.into(), reason: reason.into() }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::Unsupported { path: path.into(), reason: reason.into() }
}

/// The base parameter `name` targets and its `(rows, cols)`.
fn target_of(name: &str, path: &Path, base: &BaseShapes) -> Result<(Target, (usize, usize)), AdapterError> {
    let unknown = || AdapterError::UnknownTarget { path: path.into(), target: name.into() };
    let t = Target::from_hf_name(name).ok_or_else(unknown)?;
    let shape = base.shape(t).ok_or_else(unknown)?;
    Ok((t, shape))
}

fn check_shape(name: &str, got: &[usize], want: (usize, usize), path: &Path) -> Result<(), AdapterError> {
    if got != [want.0, want.1] {
        return Err(AdapterError::Shape { path: path.into(), tensor: name.into(), expected: vec![want.0, want.1], got: got.to_vec() });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// composable-sft pytorch_diff.bin
// ---------------------------------------------------------------------------------------------

/// Loads composable-sft's `pytorch_diff.bin` (embedding diffs included).
pub fn load_pytorch_diff(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    let file = crate::adapters::source::open_regular(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| malformed(path, format!("not a zip archive ({e}); only the zip format of torch.save (torch >= 1.6) is supported")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(String::from))
        .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .ok_or_else(|| malformed(path, "no `data.pkl` entry in the archive"))?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let pickle = super::pickle_guard::read_zip_entry(&mut zip, &pkl, super::pickle_guard::MAX_PICKLE_BYTES, path)?;
    // Scanned for memo deep-copy bombs, deep nesting and truncation before candle parses it.
    let root = super::pickle_guard::parse(path, &pkl, &pickle)?;
    let body = dict_entry(root, "body").ok_or_else(|| malformed(path, "the pickled object has no `body` dict"))?;
    let Object::Dict(params) = body else { return Err(malformed(path, "`body` is not a dict")) };

    let mut out = ModuleDeltas::default();
    for (key, entry) in params {
        let Object::Unicode(name) = key else { return Err(malformed(path, format!("non-string parameter name {key:?}"))) };
        let (target, (rows, cols)) = target_of(&name, path, base)?;
        let bad = |what: &str| malformed(path, format!("parameter `{name}`: {what}"));
        let Object::Dict(fields) = entry else { return Err(bad("entry is not a dict")) };
        let mut fields: HashMap<String, Object> =
            fields.into_iter().filter_map(|(k, v)| if let Object::Unicode(k) = k { Some((k, v)) } else { None }).collect();
        let size = fields.remove("size").ok_or_else(|| bad("no `size`"))?;
        let size = ints(torch_size(size)).ok_or_else(|| bad("`size` is not a torch.Size"))?;
        let size: Vec<usize> = size.iter().map(|&s| usize::try_from(s).unwrap_or(usize::MAX)).collect();
        check_shape(&name, &size, (rows, cols), path)?;
        let steps = fields.remove("index_steps").ok_or_else(|| bad("no `index_steps`"))?;
        let steps = match steps {
            Object::List(_) | Object::Tuple(_) => ints(steps).ok_or_else(|| bad("`index_steps` holds non-integers"))?,
            t @ Object::Reduce { .. } => read_tensor(t, &mut zip, &prefix, path, &name, Kind::Index, rows * cols)?.into_ints(),
            _ => return Err(bad("`index_steps` is neither a list nor a tensor")),
        };
        let values = fields.remove("values").ok_or_else(|| bad("no `values`"))?;
        let values = read_tensor(values, &mut zip, &prefix, path, &name, Kind::Value, rows * cols)?.into_floats();
        if values.len() != steps.len() {
            return Err(bad(&format!("{} index steps but {} values", steps.len(), values.len())));
        }
        let total = (rows as u64) * (cols as u64);
        let mut flat = Vec::with_capacity(steps.len());
        let mut acc: i64 = 0;
        for &s in &steps {
            acc = acc.checked_add(s).ok_or_else(|| bad("index overflow"))?;
            if acc < 0 || acc as u64 >= total {
                return Err(bad(&format!("index {acc} is outside the parameter of size [{rows}, {cols}]")));
            }
            // First dimension fastest: row = f % rows, col = f / rows -> row-major r * cols + c.
            let f = acc as u64;
            flat.push((f % rows as u64) * cols as u64 + f / rows as u64);
        }
        let m = SparseMatrix::from_flat(rows, cols, &flat, &values).map_err(|e| bad(&e))?;
        if out.targets.insert(target, MatrixDelta::Sparse(m)).is_some() {
            return Err(bad("appears twice"));
        }
    }
    out.validate(base, path)?;
    Ok(out)
}

/// `dict[key]` for a pickled dict with string keys.
fn dict_entry(obj: Object, key: &str) -> Option<Object> {
    match obj {
        Object::Dict(items) => items.into_iter().find(|(k, _)| matches!(k, Object::Unicode(s) if s == key)).map(|(_, v)| v),
        _ => None,
    }
}

/// `torch.Size((a, b))` pickles as a Reduce of class `torch.Size` with args `((a, b),)`.
fn torch_size(obj: Object) -> Object {
    match obj {
        Object::Reduce { callable, args } if matches!(&*callable, Object::Class { class_name, .. } if class_name == "Size") => {
            match *args {
                Object::Tuple(mut a) if a.len() == 1 => a.remove(0),
                other => other,
            }
        }
        other => other,
    }
}

/// A list / tuple of pickled integers.
fn ints(obj: Object) -> Option<Vec<i64>> {
    let items = match obj {
        Object::List(v) | Object::Tuple(v) => v,
        _ => return None,
    };
    items.into_iter().map(|o| o.int_or_long().ok()).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Index,
    Value,
}

enum TensorData {
    Floats(Vec<f32>),
    Ints(Vec<i64>),
}

impl TensorData {
    fn into_floats(self) -> Vec<f32> {
        match self {
            Self::Floats(v) => v,
            Self::Ints(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }
    fn into_ints(self) -> Vec<i64> {
        match self {
            Self::Ints(v) => v,
            Self::Floats(v) => v.into_iter().map(|x| x as i64).collect(),
        }
    }
}

/// Reads a 1-D tensor pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
/// ...)` whose storage is the persistent id `("storage", <dtype>Storage, key, location, numel)`.
fn read_tensor<R: Read + std::io::Seek>(
    obj: Object,
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
    path: &Path,
    name: &str,
    kind: Kind,
    max_elems: usize,
) -> Result<TensorData, AdapterError> {
    let field = if kind == Kind::Value { "values" } else { "index_steps" };
    let bad = |what: String| malformed(path, format!("parameter `{name}`: `{field}` {what}"));
    let (callable, args) = obj.reduce().map_err(|_| bad("is not a tensor".into()))?;
    match &callable {
        Object::Class { module_name, class_name } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        other => {
            return Err(unsupported(
                path,
                format!("parameter `{name}`: `{field}` is built by {other:?}, expected torch._utils._rebuild_tensor_v2"),
            ))
        }
    }
    let mut args = args.tuple().map_err(|_| bad("has malformed rebuild arguments".into()))?;
    if args.len() < 4 {
        return Err(bad("has too few rebuild arguments".into()));
    }
    let stride = ints(args.remove(3)).ok_or_else(|| bad("has a malformed stride".into()))?;
    let size = ints(args.remove(2)).ok_or_else(|| bad("has a malformed size".into()))?;
    let offset = args.remove(1).int_or_long().map_err(|_| bad("has a malformed storage offset".into()))?;
    let storage = args.remove(0).persistent_load().map_err(|_| bad("has no storage reference".into()))?;
    let mut st = storage.tuple().map_err(|_| bad("has a malformed storage reference".into()))?;
    if st.len() < 5 {
        return Err(bad("has a malformed storage reference".into()));
    }
    let numel = st.remove(4).int_or_long().map_err(|_| bad("has a malformed storage size".into()))?;
    let key = st.remove(2).unicode().map_err(|_| bad("has a malformed storage key".into()))?;
    let (_, class) = st.remove(1).class().map_err(|_| bad("has a malformed storage type".into()))?;
    let (width, float) = match (class.as_str(), kind) {
        ("FloatStorage", _) => (4, true),
        ("LongStorage", Kind::Index) => (8, false),
        ("IntStorage", Kind::Index) => (4, false),
        (other, Kind::Value) => {
            return Err(unsupported(path, format!("parameter `{name}`: values are {other}; only float32 (FloatStorage) is supported")))
        }
        (other, Kind::Index) => return Err(unsupported(path, format!("parameter `{name}`: index_steps are {other}"))),
    };
    let (n, step) = match (size.as_slice(), stride.as_slice()) {
        ([n], [s]) => (*n, *s),
        ([], []) => (1, 1),
        _ => return Err(unsupported(path, format!("parameter `{name}`: `{field}` has size {size:?}, expected a 1-D tensor"))),
    };
    if n < 0 || offset < 0 || (n > 1 && step < 1) || numel < 0 {
        return Err(bad(format!("has an invalid layout (offset {offset}, size {n}, stride {step})")));
    }
    let overflow = || bad(format!("has an invalid layout (offset {offset}, size {n}, stride {step})"));
    let last =
        if n == 0 { Some(offset) } else { (n - 1).checked_mul(step).and_then(|x| x.checked_add(offset)).and_then(|x| x.checked_add(1)) };
    let last = last.ok_or_else(overflow)?;
    if last > numel {
        return Err(bad(format!("reads past its storage ({last} > {numel} elements)")));
    }
    // A parameter's diff has at most one entry per element: a larger storage is refused before
    // any of it is read, and the read stops at the declared size.
    if numel as u64 > max_elems as u64 {
        return Err(bad(format!("claims a storage of {numel} elements for a parameter of {max_elems}")));
    }
    let want = numel.checked_mul(width).ok_or_else(overflow)?;
    let bytes = super::pickle_guard::read_zip_entry(zip, &format!("{prefix}data/{key}"), want as u64, path)?;
    if (bytes.len() as i64) < want {
        return Err(bad(format!("storage `{key}` is truncated ({} bytes for {numel} elements)", bytes.len())));
    }
    let at = |i: i64| -> usize { ((offset + i * step) * width) as usize };
    Ok(match (width, float) {
        (4, true) => TensorData::Floats((0..n).map(|i| f32::from_le_bytes(word4(&bytes, at(i)))).collect()),
        (4, false) => TensorData::Ints((0..n).map(|i| i32::from_le_bytes(word4(&bytes, at(i))) as i64).collect()),
        _ => TensorData::Ints((0..n).map(|i| i64::from_le_bytes(word8(&bytes, at(i)))).collect()),
    })
}

fn word4(b: &[u8], at: usize) -> [u8; 4] {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    w
}

fn word8(b: &[u8], at: usize) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    w
}

// ---------------------------------------------------------------------------------------------
// Native modserve-sparse-v1 safetensors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
struct SparseHeader {
    format: String,
    shapes: BTreeMap<String, Vec<usize>>,
}

/// Loads a native `modserve-sparse-v1` safetensors file (see docs/ADAPTER_FORMATS.md).
pub fn load_sparse_safetensors(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    let bytes = read_bytes(path)?;
    let md = metadata(&bytes, path)?.unwrap_or_default();
    let fmt = md.get("format").ok_or_else(|| malformed(path, format!("no `format` in __metadata__ (expected \"{SPARSE_FORMAT}\")")))?;
    if fmt != SPARSE_FORMAT {
        return Err(unsupported(path, format!("format `{fmt}` (expected \"{SPARSE_FORMAT}\")")));
    }
    let shapes = md.get("shapes").ok_or_else(|| malformed(path, "no `shapes` in __metadata__"))?;
    let shapes: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(shapes).map_err(|e| malformed(path, format!("`shapes` metadata is not a JSON map of shapes: {e}")))?;
    let st = parse(&bytes, path)?;
    let mut seen = 0usize;
    let mut out = ModuleDeltas::default();
    for (name, shape) in &shapes {
        let (target, want) = target_of(name, path, base)?;
        check_shape(name, shape, want, path)?;
        let get = |suffix: &str| {
            st.tensor(&format!("{name}.{suffix}"))
                .map_err(|_| malformed(path, format!("`{name}` is listed in `shapes` but `{name}.{suffix}` is missing")))
        };
        let (iv, vv) = (get("indices")?, get("values")?);
        seen += 2;
        let bad = |what: String| malformed(path, format!("`{name}`: {what}"));
        if iv.shape().len() != 1 || vv.shape().len() != 1 || iv.shape() != vv.shape() {
            return Err(bad(format!("indices {:?} and values {:?} must be 1-D of equal length", iv.shape(), vv.shape())));
        }
        let flat: Vec<u64> = match iv.dtype() {
            Dtype::I64 => {
                let v: Vec<i64> = iv.data().chunks_exact(8).map(|c| i64::from_le_bytes(word8(c, 0))).collect();
                if let Some(x) = v.iter().find(|x| **x < 0) {
                    return Err(bad(format!("negative index {x}")));
                }
                v.into_iter().map(|x| x as u64).collect()
            }
            Dtype::U32 => iv.data().chunks_exact(4).map(|c| u32::from_le_bytes(word4(c, 0)) as u64).collect(),
            other => return Err(unsupported(path, format!("`{name}.indices` has dtype {other:?} (expected I64 or U32)"))),
        };
        if vv.dtype() != Dtype::F32 {
            return Err(unsupported(path, format!("`{name}.values` has dtype {:?} (expected F32)", vv.dtype())));
        }
        let values: Vec<f32> = vv.data().chunks_exact(4).map(|c| f32::from_le_bytes(word4(c, 0))).collect();
        let m = SparseMatrix::from_flat(want.0, want.1, &flat, &values).map_err(bad)?;
        out.targets.insert(target, MatrixDelta::Sparse(m));
    }
    if seen != st.len() {
        let extra = st.names().into_iter().find(|n| {
            let base_name = n.rsplit_once('.').map(|(b, _)| b).unwrap_or(n);
            !shapes.contains_key(base_name)
        });
        return Err(malformed(path, format!("tensor `{}` is not described in `shapes`", extra.unwrap_or("?"))));
    }
    out.validate(base, path)?;
    Ok(out)
}

/// Writes the sparse targets of `deltas` in the native format (U32 indices when every flat index
/// fits, else I64). Targets that are not `MatrixDelta::Sparse` are refused.
pub fn save_sparse_safetensors(path: &Path, deltas: &ModuleDeltas) -> Result<(), AdapterError> {
    let mut shapes = BTreeMap::new();
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (t, d) in &deltas.targets {
        let MatrixDelta::Sparse(m) = d else {
            return Err(unsupported(
                path,
                format!("`{}` is not a sparse delta; only sparse targets can be saved as {SPARSE_FORMAT}", t.hf_name()),
            ));
        };
        let name = t.hf_name();
        shapes.insert(name.clone(), vec![m.rows(), m.cols()]);
        let small = (m.rows() as u64) * (m.cols() as u64) <= u32::MAX as u64 + 1;
        let mut idx = Vec::with_capacity(m.nnz() * if small { 4 } else { 8 });
        let mut vals: Vec<u8> = Vec::with_capacity(m.nnz() * 4);
        for r in 0..m.rows() {
            let (cols, values) = m.row(r);
            for (&c, v) in cols.iter().zip(values) {
                let f = r as u64 * m.cols() as u64 + c as u64;
                if small {
                    idx.extend_from_slice(&(f as u32).to_le_bytes());
                } else {
                    idx.extend_from_slice(&(f as i64).to_le_bytes());
                }
                vals.extend_from_slice(&v.to_le_bytes());
            }
        }
        buffers.push((format!("{name}.indices"), if small { Dtype::U32 } else { Dtype::I64 }, vec![m.nnz()], idx));
        buffers.push((format!("{name}.values"), Dtype::F32, vec![m.nnz()], vals));
    }
    let header = SparseHeader { format: SPARSE_FORMAT.into(), shapes };
    let shapes_json = serde_json::to_string(&header.shapes).map_err(|e| AdapterError::Io { path: path.into(), reason: e.to_string() })?;
    let md = HashMap::from([("format".to_string(), header.format), ("shapes".to_string(), shapes_json)]);
    let mut views = Vec::with_capacity(buffers.len());
    for (n, dt, shape, data) in &buffers {
        let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
            .map_err(|e| AdapterError::Io { path: path.into(), reason: format!("cannot encode `{n}`: {e}") })?;
        views.push((n.clone(), v));
    }
    safetensors::serialize_to_file(views, Some(md), path)
        .map_err(|e| AdapterError::Io { path: path.into(), reason: format!("cannot write: {e}") })
}

/// Summary of a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertSummary {
    /// Parameters written.
    pub params: usize,
    /// Non-zeros written over all parameters.
    pub nnz: usize,
}

/// Converts composable-sft's `pytorch_diff.bin` at `src` to a native sparse file at `dst`,
/// validating it against `base` first.
pub fn convert_pytorch_diff(src: &Path, dst: &Path, base: &BaseShapes) -> Result<ConvertSummary, AdapterError> {
    let d = load_pytorch_diff(src, base)?;
    save_sparse_safetensors(dst, &d)?;
    let nnz = d.targets.values().map(|m| if let MatrixDelta::Sparse(s) = m { s.nnz() } else { 0 }).sum();
    Ok(ConvertSummary { params: d.targets.len(), nnz })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::testing::tiny_base;
    use crate::model::linear::{LinearId, Proj};

    fn k0() -> Target {
        Target::Linear(LinearId { layer: 0, proj: Proj::K })
    }

    #[test]
    fn native_format_round_trips_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(SPARSE_FILE);
        // k_proj is 4x8: entries (0,1)=2, (3,7)=-1.
        let m = SparseMatrix::from_flat(4, 8, &[31, 1], &[-1.0, 2.0]).unwrap();
        let mut d = ModuleDeltas::default();
        d.targets.insert(k0(), MatrixDelta::Sparse(m.clone()));
        save_sparse_safetensors(&p, &d).unwrap();
        let back = load_sparse_safetensors(&p, &tiny_base()).unwrap();
        match &back.targets[&k0()] {
            MatrixDelta::Sparse(s) => assert_eq!(s, &m),
            other => panic!("{other:?}"),
        }
        // A base with a different k_proj shape refuses it.
        let mut cfg = tiny_base().cfg;
        cfg.num_key_value_heads = 2;
        assert!(matches!(load_sparse_safetensors(&p, &BaseShapes::new(cfg)), Err(AdapterError::Shape { .. })));
        // A dense target cannot be saved in the sparse format.
        let mut dd = ModuleDeltas::default();
        dd.targets.insert(
            k0(),
            MatrixDelta::Dense(candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()),
        );
        assert!(matches!(save_sparse_safetensors(&dir.path().join("x.safetensors"), &dd), Err(AdapterError::Unsupported { .. })));
    }

    #[test]
    fn native_format_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        let write = |shapes: &str, idx: Vec<u32>, vals: Vec<f32>| {
            let ib: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
            let vb: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
            let views = vec![
                (
                    "model.layers.0.self_attn.k_proj.weight.indices",
                    safetensors::tensor::TensorView::new(Dtype::U32, vec![idx.len()], &ib).unwrap(),
                ),
                (
                    "model.layers.0.self_attn.k_proj.weight.values",
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![vals.len()], &vb).unwrap(),
                ),
            ];
            let md = HashMap::from([("format".to_string(), SPARSE_FORMAT.to_string()), ("shapes".to_string(), shapes.to_string())]);
            safetensors::serialize_to_file(views, Some(md), &p).unwrap();
        };
        let shapes = r#"{"model.layers.0.self_attn.k_proj.weight":[4,8]}"#;
        write(shapes, vec![32], vec![1.0]);
        let e = load_sparse_safetensors(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("outside"), "{e}");
        write(shapes, vec![3], vec![f32::NAN]);
        assert!(matches!(load_sparse_safetensors(&p, &tiny_base()), Err(AdapterError::NonFinite { .. })));
        write(r#"{"model.layers.9.self_attn.k_proj.weight":[4,8]}"#, vec![3], vec![1.0]);
        assert!(matches!(load_sparse_safetensors(&p, &tiny_base()), Err(AdapterError::UnknownTarget { .. })));
        write(r#"{}"#, vec![3], vec![1.0]);
        let e = load_sparse_safetensors(&p, &tiny_base()).unwrap_err();
        assert!(e.to_string().contains("not described"), "{e}");
        write(shapes, vec![3], vec![1.0]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = load_sparse_safetensors(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("bad.safetensors"), "{e}");
    }

    #[test]
    fn pytorch_diff_rejects_non_zip_and_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pytorch_diff.bin");
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        let e = load_pytorch_diff(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("pytorch_diff.bin"), "{e}");
        let e = load_pytorch_diff(&dir.path().join("nope.bin"), &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Io { .. }), "{e}");
    }
}
