//! qtensor's integration tests: one binary, one module per concern.

mod errors;
mod golden;
mod props;
mod simd;

/// Every instruction set this CPU supports. With `QUANT_REQUIRE_ISA=1` the run fails if any
/// tier is missing, so CI cannot pass while silently skipping a SIMD path.
pub fn isas_under_test() -> Vec<qtensor::isa::Isa> {
    use qtensor::isa::{Isa, REQUIRE_ENV};
    let require = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    let all = Isa::ALL.to_vec();
    if require {
        for isa in &all {
            assert!(
                isa.is_supported(),
                "{REQUIRE_ENV}=1 but this CPU lacks {isa}"
            );
        }
    }
    all.into_iter().filter(|i| i.is_supported()).collect()
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
