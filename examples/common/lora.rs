//! The random LoRA modules of the LoRA kernel examples (`lora_row_kernel`, `lora_gap`): rank
//! `rank` on all 7 projections of SmolLM2-135M's 30 layers, uniform factors in [-0.5, 0.5).
use candle_core::{Device, Tensor};
use modserve::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use modserve::adapters::target::Target;
use modserve::model::linear::{LinearId, Proj};
use rand::{rngs::StdRng, Rng};

use super::common::{dims, LAYERS};

/// One module, held as the server holds it: `compact` 8-bit factors, or f32 ones.
pub fn adapter(rng: &mut StdRng, compact: bool, rank: usize) -> ModuleDeltas {
    let mut m = ModuleDeltas::default();
    for layer in 0..LAYERS {
        for proj in Proj::UNFUSED {
            let (inp, out) = dims(proj);
            let a: Vec<f32> = (0..rank * inp).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let b: Vec<f32> = (0..out * rank).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let a = Tensor::from_vec(a, (rank, inp), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(b, (out, rank), &Device::Cpu).unwrap();
            m.targets.insert(Target::Linear(LinearId { layer, proj }), MatrixDelta::LowRank { a, b });
        }
    }
    m.into_host(compact).unwrap()
}
