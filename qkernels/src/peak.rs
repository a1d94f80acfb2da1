//! Built-in probes of this machine's per-core ceilings: a loop of independent `vpdpbusd`
//! (int8) and of independent FMAs (f32), so benchmarks can report percent of peak measured
//! on the machine they run on, not taken from a data sheet.

/// Measured ceiling of one core, in GMAC/s (best of a few short runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// int8 multiply-accumulates per second (u8 x i8 into i32), in billions.
    pub int8_gmacs: f64,
    /// f32 multiply-accumulates per second, in billions.
    pub f32_gmacs: f64,
}

/// Runs both probes on the calling thread (about 0.3 s). Returns `None` on CPUs without
/// AVX-512 VNNI, where the probe's instructions do not exist.
pub fn measure() -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if qtensor::isa::Isa::Avx512Vnni.is_supported() {
        let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(0.0, f64::max);
        // SAFETY: AVX-512 VNNI (and so AVX-512 F) was detected just above.
        let int8 = best(&|| unsafe { probe::int8() });
        // SAFETY: as above.
        let f32 = best(&|| unsafe { probe::f32() });
        return Some(Peak { int8_gmacs: int8, f32_gmacs: f32 });
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::*;
    use std::time::Instant;

    const ITERS: usize = 200_000;
    const ACCS: usize = 16;

    /// # Safety
    /// AVX-512 F/BW/VNNI available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8() -> f64 {
        let a = std::hint::black_box(_mm512_set1_epi8(3));
        let b = std::hint::black_box(_mm512_set1_epi8(-2));
        let mut acc = [_mm512_setzero_si512(); ACCS];
        let start = Instant::now();
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (ITERS * ACCS * 64) as f64 / secs / 1e9
    }

    /// # Safety
    /// AVX-512 F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32() -> f64 {
        let a = std::hint::black_box(_mm512_set1_ps(1.000_001));
        let b = std::hint::black_box(_mm512_set1_ps(0.999_999));
        let mut acc = [_mm512_setzero_ps(); ACCS];
        let start = Instant::now();
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (ITERS * ACCS * 16) as f64 / secs / 1e9
    }
}
