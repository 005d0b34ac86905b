//! Dense task vectors and diagonal Fisher files: safetensors files keyed by Hugging Face parameter
//! names (`model.layers.3.self_attn.q_proj.weight`, `model.embed_tokens.weight`, ...), each tensor
//! the shape of the weight it belongs to.
//!
//! Invariants: every tensor names a base parameter and has its shape; values are finite; results
//! are float32 on the CPU (F16 / BF16 / F64 files are converted on load); Fisher values are also
//! non-negative (a diagonal Fisher is an expectation of squared gradients). A truncated or
//! otherwise unreadable file is `Malformed`, naming the file. The safetensors `__metadata__` is
//! ignored, except that a native sparse delta (`modserve-sparse-v1`) is refused with a pointer to
//! the right loader.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::safetensors_io::{metadata, parse, read_bytes, view_to_f32};
use crate::adapters::error::AdapterError;
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::target::{BaseShapes, Target};

/// A diagonal Fisher information estimate: one non-negative f32 tensor `[out, in]` per parameter.
#[derive(Debug, Clone, Default)]
pub struct Fisher {
    pub tensors: BTreeMap<Target, Tensor>,
}

/// Loads a dense task vector `tau = theta_finetuned - theta_base` as one `MatrixDelta::Dense` per
/// tensor.
pub fn load_task_vector(path: &Path, base: &BaseShapes) -> Result<ModuleDeltas, AdapterError> {
    let mut out = ModuleDeltas::default();
    for (t, tensor) in load_checked(path, base)? {
        out.targets.insert(t, MatrixDelta::Dense(tensor));
    }
    out.validate(base, path)?;
    Ok(out)
}

/// Loads a diagonal Fisher file; refuses non-finite and negative values.
pub fn load_fisher(path: &Path, base: &BaseShapes) -> Result<Fisher, AdapterError> {
    let mut tensors = BTreeMap::new();
    for (t, tensor) in load_checked(path, base)? {
        let v = tensor.flatten_all()?.to_vec1::<f32>()?;
        if let Some(what) = crate::adapters::module_deltas::non_finite(&v) {
            return Err(AdapterError::NonFinite { path: path.into(), tensor: t.hf_name(), what });
        }
        if let Some(x) = v.iter().copied().find(|x| *x < 0.0) {
            return Err(AdapterError::Malformed {
                path: path.into(),
                reason: format!("Fisher tensor `{}` has a negative value ({x}); a diagonal Fisher is non-negative", t.hf_name()),
            });
        }
        tensors.insert(t, tensor);
    }
    Ok(Fisher { tensors })
}

/// Every tensor of the file as f32, mapped to its target and checked against the base shape.
fn load_checked(path: &Path, base: &BaseShapes) -> Result<Vec<(Target, Tensor)>, AdapterError> {
    let bytes = read_bytes(path)?;
    if let Some(md) = metadata(&bytes, path)? {
        if md.get("format").is_some_and(|f| f.starts_with("modserve-sparse")) {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                reason: "this is a native sparse delta (modserve-sparse-v1), not a dense tensor file".into(),
            });
        }
    }
    let st = parse(&bytes, path)?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let view = st.tensor(&name).map_err(|e| AdapterError::Malformed { path: path.into(), reason: format!("`{name}`: {e}") })?;
        let target = Target::from_hf_name(&name).ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: name.clone() })?;
        let want = base.shape(target).ok_or_else(|| AdapterError::UnknownTarget { path: path.into(), target: name.clone() })?;
        if view.shape() != [want.0, want.1] {
            return Err(AdapterError::Shape {
                path: path.into(),
                tensor: name,
                expected: vec![want.0, want.1],
                got: view.shape().to_vec(),
            });
        }
        out.push((target, view_to_f32(&view, path, &name)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::testing::{tiny_base, write_f32};
    use crate::model::linear::{LinearId, Proj};
    use safetensors::Dtype;

    const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

    #[test]
    fn task_vector_loads_dense_f32_and_converts_f16() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tv.safetensors");
        write_f32(&p, &[(Q0, vec![8, 8], (0..64).map(|i| i as f32 * 0.5).collect())]);
        let d = load_task_vector(&p, &tiny_base()).unwrap();
        let t = Target::Linear(LinearId { layer: 0, proj: Proj::Q });
        let v = d.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[3], 1.5);
        assert_eq!(v[63], 31.5);

        // F16 values 1.0, -2.5 (0x3C00, 0xC100) for a 4x8 k_proj.
        let mut bytes = Vec::new();
        for i in 0..32 {
            bytes.extend_from_slice(&(if i % 2 == 0 { 0x3C00u16 } else { 0xC100u16 }).to_le_bytes());
        }
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![4, 8], &bytes).unwrap();
        let p16 = dir.path().join("tv16.safetensors");
        safetensors::serialize_to_file(vec![("model.layers.1.self_attn.k_proj.weight", view)], None, &p16).unwrap();
        let d = load_task_vector(&p16, &tiny_base()).unwrap();
        let t = Target::Linear(LinearId { layer: 1, proj: Proj::K });
        let v = d.targets[&t].to_dense().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[..2], &[1.0, -2.5]);
    }

    #[test]
    fn task_vector_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tv.safetensors");
        write_f32(&p, &[(Q0, vec![4, 8], vec![0.0; 32])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::Shape { .. })));
        write_f32(&p, &[("model.layers.5.self_attn.q_proj.weight", vec![8, 8], vec![0.0; 64])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::UnknownTarget { .. })));
        write_f32(&p, &[(Q0, vec![8, 8], vec![f32::NAN; 64])]);
        assert!(matches!(load_task_vector(&p, &tiny_base()), Err(AdapterError::NonFinite { .. })));
        write_f32(&p, &[(Q0, vec![8, 8], vec![1.0; 64])]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = load_task_vector(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("tv.safetensors"), "{e}");
        let e = load_task_vector(&dir.path().join("missing.safetensors"), &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Io { .. }), "{e}");
    }

    #[test]
    fn fisher_rejects_negative_and_non_finite_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        write_f32(&p, &[(Q0, vec![8, 8], vec![0.25; 64])]);
        let f = load_fisher(&p, &tiny_base()).unwrap();
        assert_eq!(f.tensors.len(), 1);
        let mut v = vec![0.25; 64];
        v[7] = -1e-3;
        write_f32(&p, &[(Q0, vec![8, 8], v.clone())]);
        let e = load_fisher(&p, &tiny_base()).unwrap_err();
        assert!(matches!(e, AdapterError::Malformed { .. }) && e.to_string().contains("negative"), "{e}");
        v[7] = f32::INFINITY;
        write_f32(&p, &[(Q0, vec![8, 8], v)]);
        assert!(matches!(load_fisher(&p, &tiny_base()), Err(AdapterError::NonFinite { .. })));
    }
}
