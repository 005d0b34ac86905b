//! CPU kernels: the only room of the crate with `unsafe` and SIMD.
//!
//! Role: the inner loops of a batch step that the compiler does not vectorise well on its own: the
//! int8 GEMM of the base weights ([`int8_gemm`]), the per-row low-rank (LoRA / Poly) kernels and
//! their host layout ([`lowrank`], packed one buffer per module by [`lowrank_pack`]), the sparse
//! delta layout and its tile kernel ([`sparse_layout`], [`sparse_tile`]), the attention inner loop
//! ([`attention`]), guided sharing of a parallel loop between the pool's threads ([`claim`]), the
//! shared-output helper for parallel tasks that write disjoint parts of one buffer
//! ([`shared_out`]), a vectorisable `tanh` for soft-capping ([`tanh`]), the vocabulary-wide max and
//! exponential sum of sampling ([`softmax`]), the gated MLP's `silu(g) * u` ([`activation`]), host
//! views of candle tensors ([`host`]) and the process's allocator settings ([`alloc`]). GPU kernels
//! and their CPU references will live beside these, in `cuda/`.
//!
//! Invariants:
//! - `unsafe` appears nowhere else in the crate (`grep -rn unsafe src | grep -v src/kernels` is
//!   empty).
//! - [`cpu`] is the one CPU-feature probe: every kernel compiled with `#[target_feature]` runs only
//!   after it reported every feature that kernel enables.
//! - Safe wrappers check the sizes the kernels rely on with `assert!` (in release builds too), and
//!   the layouts the kernels trust ([`lowrank::HostLowRank`], [`sparse_layout::SparseMatrix`])
//!   keep their dimensions private, so safe code cannot make a kernel read out of bounds.
pub mod activation;
pub mod alloc;
pub mod attention;
pub mod claim;
pub mod host;
pub mod int8_gemm;
pub mod lowrank;
pub mod lowrank_int8;
pub mod lowrank_pack;
pub mod norm;
pub mod shared_out;
pub mod softmax;
pub mod sparse_layout;
pub mod sparse_tile;
pub mod tanh;

/// What this CPU can run, probed once. Each flag covers every feature the kernels of its tier
/// enable with `#[target_feature]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX: the 8-lane transposes and the scaled adds of the sparse step.
    pub avx: bool,
    /// AVX, AVX2, FMA and F16C (every AVX2 CPU has it): the attention kernel (f32 or f16 cache),
    /// the f32 low-rank row kernel, the sparse tile.
    pub avx2_fma: bool,
    /// AVX-512 F/BW/VL/VNNI, F16C, AVX2 and FMA, and not switched off with
    /// `MODSERVE_INT8_GEMM=0`: the int8 GEMM over Q8_0 panels and the compact (8-bit) low-rank
    /// factors.
    pub int8: bool,
    /// AVX, AVX2, FMA and F16C, and not switched off with `MODSERVE_INT8_GEMM=0`: the AVX2
    /// variants of the int8 GEMM (8-row panels, `vpmaddubsw` / `vpmaddwd`) and of the compact
    /// low-rank kernel, used where the VNNI tier is absent. Every CPU with `int8` has it too.
    pub int8_avx2: bool,
    /// Q4_1 weights are kept at 4 bits and multiplied by the int8 GEMM's Q4_1 variants (VNNI
    /// where `int8` holds, else AVX2) instead of being re-blocked as Q8_0 at load. Needs
    /// `int8_avx2`. Default: on where the VNNI tier is absent (measured faster there, single
    /// stream and batch); on VNNI CPUs off unless `MODSERVE_Q4_1=native`, until the VNNI Q4_1
    /// tile has been measured against the VNNI Q8_0 one on such a CPU
    /// (`MODSERVE_Q4_1=requantize` turns it off everywhere).
    pub q4_1: bool,
    /// Software prefetch of compact low-rank factors ahead of the row kernel's reads and of the
    /// next decode row's factors (x86-64; `MODSERVE_PREFETCH=0` turns it off, to measure it).
    pub prefetch: bool,
}

/// The CPU-feature probe (run once; later calls read the cached answer).
pub fn cpu() -> &'static CpuFeatures {
    static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
    FEATURES.get_or_init(|| {
        // A switch's value, or None when unset or not one of `known` (said once, in the log).
        let switch = |var: &str, known: &[&'static str]| -> Option<&'static str> {
            let v = std::env::var(var).ok()?;
            let hit = known.iter().copied().find(|k| *k == v);
            if hit.is_none() {
                tracing::warn!("{var}={v:?} is not one of {known:?}; using the default");
            }
            hit
        };
        let off = |var: &str| matches!(switch(var, &["0", "off", "1", "on"]), Some("0" | "off"));
        let mut c = probe(off("MODSERVE_INT8_GEMM"), off("MODSERVE_PREFETCH"));
        c.q4_1 = c.int8_avx2
            && match switch("MODSERVE_Q4_1", &["native", "requantize"]) {
                Some("native") => true,
                Some("requantize") => false,
                _ => !c.int8,
            };
        c
    })
}

#[cfg(target_arch = "x86_64")]
fn probe(int8_off: bool, prefetch_off: bool) -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    let avx = has!("avx");
    let avx2_fma = avx && has!("avx2") && has!("fma") && has!("f16c");
    let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni");
    let int8_avx2 = !int8_off && avx2_fma;
    CpuFeatures { avx, avx2_fma, int8: int8_avx2 && avx512, int8_avx2, q4_1: false, prefetch: !prefetch_off }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe(_int8_off: bool, _prefetch_off: bool) -> CpuFeatures {
    CpuFeatures { avx: false, avx2_fma: false, int8: false, int8_avx2: false, q4_1: false, prefetch: false }
}

/// True when this CPU runs the int8 kernels (the int8 GEMM and compact low-rank factors), with
/// VNNI or with AVX2.
pub fn int8_available() -> bool {
    cpu().int8_avx2
}
