//! qtensor's integration tests: one binary, one module per concern.

mod errors;
mod golden;
mod props;
mod simd;

/// Every instruction set this CPU supports; conformance tests run each of them explicitly.
/// Under `QUANT_REQUIRE_ISA=1` the tier forced by `QUANT_FORCE_ISA` must exist (selection
/// panics otherwise), so a CI run cannot pass while silently skipping a SIMD path.
pub fn isas_under_test() -> Vec<qtensor::isa::Isa> {
    use qtensor::isa::{self, Isa};
    let selected = isa::selected();
    let all: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.is_supported()).collect();
    assert!(all.contains(&selected));
    all
}

/// A small deterministic generator for bulk test data (proptest drives the shapes).
#[derive(Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
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
