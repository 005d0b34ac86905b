//! Adapter file formats, each turned into the one data model ([`super::module_deltas::ModuleDeltas`])
//! or, for Poly, an inventory mixed into one per routing: PEFT LoRA and Poly (with their shared
//! PEFT helpers), composable-sft sparse diffs and the native sparse format, dense task vectors and
//! Fisher files, the safetensors reading they share, and the pickle pre-scan that guards every
//! pickled file.
//!
//! Invariant: formats depend on the data model and on [`super::source`] only (never on the store
//! or the cache); every loader validates against the base shapes and names the file in errors.
pub mod lora;
pub mod peft;
pub mod pickle_guard;
pub mod poly;
pub mod safetensors_io;
pub mod sft;
pub mod task_vector;
