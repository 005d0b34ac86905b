//! Shapes shared by the kernel-timing examples: SmolLM2-135M's decoder (the reference model).
use modserve::model::linear::Proj;

/// Decoder layers of SmolLM2-135M.
pub const LAYERS: usize = 30;

/// `(in, out)` of a projection of SmolLM2-135M.
pub fn dims(p: Proj) -> (usize, usize) {
    match p {
        Proj::Q | Proj::O => (576, 576),
        Proj::K | Proj::V => (576, 192),
        Proj::Gate | Proj::Up => (576, 1536),
        Proj::Down => (1536, 576),
        Proj::Qkv => (576, 960),
        Proj::GateUp => (576, 3072),
    }
}
