//! Built-in probes of this machine's per-core ceilings: a loop of independent `vpdpbusd`
//! (int8), of independent `tdpbusd` where the AMX tier runs, and of independent FMAs (f32),
//! so benchmarks can report percent of peak measured on the machine they run on, not taken
//! from a data sheet.

/// Measured ceiling of one core, in GMAC/s (best of a few short runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// int8 multiply-accumulates per second (u8 x i8 into i32), in billions.
    pub int8_gmacs: f64,
    /// f32 multiply-accumulates per second, in billions.
    pub f32_gmacs: f64,
    /// int8 multiply-accumulates per second of the AMX tile unit (`tdpbusd`), in billions,
    /// on CPUs where the AMX tier runs.
    pub amx_int8_gmacs: Option<f64>,
}

impl Peak {
    /// The int8 ceiling of the kernels of tier `isa`: the tile unit's for the AMX tier, the
    /// `vpdpbusd` loop's otherwise.
    pub fn int8_for(&self, isa: qtensor::isa::Isa) -> f64 {
        match (isa, self.amx_int8_gmacs) {
            (qtensor::isa::Isa::Amx, Some(amx)) => amx,
            _ => self.int8_gmacs,
        }
    }
}

/// Runs the probes (`vpdpbusd`, FMA, and `tdpbusd` where the AMX tier runs) on the calling
/// thread (under a second). Returns `None` on CPUs without AVX-512 VNNI, where the probes'
/// instructions do not exist.
pub fn measure() -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if qtensor::isa::Isa::Avx512Vnni.is_supported() {
        let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(0.0, f64::max);
        // SAFETY: AVX-512 VNNI (and so AVX-512 F) was detected just above.
        let int8 = best(&|| unsafe { probe::int8() });
        // SAFETY: as above.
        let f32 = best(&|| unsafe { probe::f32() });
        let amx = qtensor::isa::Isa::Amx.is_supported().then(|| {
            const ROUNDS: usize = 50_000;
            let macs = best(&|| {
                // SAFETY: the AMX tier is supported: AMX-TILE, AMX-INT8 and the tile data
                // granted to this process.
                let secs = unsafe { probe::amx(ROUNDS) };
                (ROUNDS * probe::AMX_MACS) as f64 / secs
            });
            macs / 1e9
        });
        return Some(Peak { int8_gmacs: int8, f32_gmacs: f32, amx_int8_gmacs: amx });
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

    /// `LDTILECFG`'s operand: palette 1, eight tiles of 16 rows of 64 bytes (the entries of
    /// the tiles palette 1 lacks must be zero).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Multiply-accumulates of one round of [`amx`]: four `tdpbusd` of 16 x 16 x 64.
    pub(super) const AMX_MACS: usize = 4 * 16 * 16 * 64;

    /// Seconds taken by `rounds` rounds of four independent `tdpbusd` on tiles loaded once.
    ///
    /// # Safety
    /// The CPU supports AMX-TILE and AMX-INT8 and the process has the tile data.
    pub(super) unsafe fn amx(rounds: usize) -> f64 {
        use std::arch::asm;
        let (mut colsb, mut rows) = ([0u16; 16], [0u8; 16]);
        colsb[..8].fill(64);
        rows[..8].fill(16);
        let config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows };
        let data = [1u8; 16 * 64];
        // SAFETY: the precondition; a valid configuration; every load reads 16 rows of 64
        // bytes of `data`.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                p = in(reg) data.as_ptr(), s = in(reg) 64usize, options(nostack, readonly),
            );
            let start = Instant::now();
            for _ in 0..rounds {
                asm!(
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    options(nostack, nomem),
                );
            }
            let secs = start.elapsed().as_secs_f64();
            asm!("tilerelease", options(nostack, nomem));
            secs
        }
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
