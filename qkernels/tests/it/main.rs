//! qkernels' integration tests: one binary, one module per concern.

mod conv;
mod errors;
mod float;
mod gemm;
mod golden;
mod golden_dynamic;
mod golden_ops;
mod layout;
mod ops;

/// Every instruction set this CPU supports (conformance tests run each explicitly). Under
/// `QUANT_REQUIRE_ISA=1` the forced tier must exist: selection panics otherwise.
pub fn isas_under_test() -> Vec<qtensor::isa::Isa> {
    let selected = qtensor::isa::selected();
    let all: Vec<_> = qkernels::registry::tiers(qtensor::isa::Isa::host_arch())
        .iter()
        .copied()
        .filter(|i| i.is_supported())
        .collect();
    assert!(all.contains(&selected));
    all
}

/// Proptest cases: `n`, or a handful under Miri (`cargo xtask miri`), where every case costs
/// an interpreter's time.
pub const fn cases(n: u32) -> u32 {
    if cfg!(miri) {
        3
    } else {
        n
    }
}

/// A xorshift64 generator from `seed` (which must not be 0): the tests' source of random
/// shapes and values, reproducible from the seed.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}
