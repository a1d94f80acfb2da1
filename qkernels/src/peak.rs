//! Built-in probes of this machine's per-core ceilings: a loop of independent `vpdpbusd`
//! (int8), of independent `tdpbusd` where the AMX tier runs, of AVX2's int8 sequence
//! (`vpmaddubsw`, `vpmaddwd` by ones, `vpaddd`: 32 products in three instructions, as the AVX2
//! pair kernel runs them; and two quads at a time, 64 products in five), and of independent
//! FMAs (f32), so benchmarks can report percent of peak measured on the machine they run on,
//! not taken from a data sheet.

/// Measured ceiling of one core, in GMAC/s (best of a few short runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// int8 multiply-accumulates per second (u8 x i8 into i32), in billions, of the CPU's
    /// widest int8 instruction below AMX: `vpdpbusd` on AVX-512 VNNI CPUs, AVX2's
    /// three-instruction sequence on the others.
    pub int8_gmacs: f64,
    /// f32 multiply-accumulates per second, in billions (512-bit FMAs on AVX-512 VNNI CPUs,
    /// 256-bit ones on the others).
    pub f32_gmacs: f64,
    /// int8 multiply-accumulates per second of AVX2's sequence, in billions (`int8_gmacs` on
    /// CPUs without AVX-512 VNNI): the ceiling of AVX2 layers whose quads run one at a time.
    pub avx2_int8_gmacs: f64,
    /// The same two quads at a time (two `vpmaddubsw` added in i16 before one `vpmaddwd` by
    /// ones: 64 products in five instructions), as the AVX2 tier runs weights whose pairs of
    /// quads fit in i16: that tier's ceiling.
    pub avx2_paired_int8_gmacs: f64,
    /// int8 multiply-accumulates per second of the AMX tile unit (`tdpbusd`), in billions,
    /// on CPUs where the AMX tier runs.
    pub amx_int8_gmacs: Option<f64>,
}

impl Peak {
    /// The int8 ceiling of the kernels of tier `isa`: the tile unit's for the AMX tier, AVX2's
    /// sequence on pairs of quads for the AVX2 tier, the CPU's widest int8 instruction
    /// otherwise.
    pub fn int8_for(&self, isa: qtensor::isa::Isa) -> f64 {
        match (isa, self.amx_int8_gmacs) {
            (qtensor::isa::Isa::Amx, Some(amx)) => amx,
            (qtensor::isa::Isa::Avx2, _) => self.avx2_paired_int8_gmacs,
            _ => self.int8_gmacs,
        }
    }
}

/// Runs the probes (AVX2's int8 sequence; `vpdpbusd` and 512-bit FMAs on AVX-512 VNNI CPUs,
/// 256-bit FMAs on the others; `tdpbusd` where the AMX tier runs) on the calling thread
/// (under a second). Returns `None` on CPUs without AVX2 and FMA (and on other
/// architectures), where the probes' instructions do not exist.
pub fn measure() -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if qtensor::isa::Isa::Avx2.is_supported() {
        let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(0.0, f64::max);
        // SAFETY: AVX2 and FMA were detected just above.
        let avx2 = best(&|| unsafe { probe::avx2_int8() });
        // SAFETY: as above.
        let paired = best(&|| unsafe { probe::avx2_int8_paired() });
        if !qtensor::isa::Isa::Avx512Vnni.is_supported() {
            // SAFETY: as above.
            let f32 = best(&|| unsafe { probe::avx2_f32() });
            return Some(Peak {
                int8_gmacs: avx2,
                f32_gmacs: f32,
                amx_int8_gmacs: None,
                avx2_int8_gmacs: avx2,
                avx2_paired_int8_gmacs: paired,
            });
        }
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
        return Some(Peak {
            int8_gmacs: int8,
            f32_gmacs: f32,
            amx_int8_gmacs: amx,
            avx2_int8_gmacs: avx2,
            avx2_paired_int8_gmacs: paired,
        });
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

    /// AVX2's int8 sequence on independent accumulators: `vpmaddubsw` (32 u8 x i8 products
    /// summed in pairs), `vpmaddwd` by ones (into i32), `vpaddd`.
    ///
    /// # Safety
    /// AVX2 available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_int8() -> f64 {
        // Six chains, each with its own weights (one shared product would be computed once):
        // with the activations and the ones, 14 of the 16 registers.
        const N: usize = 6;
        let a = _mm256_set1_epi8(3);
        let b: [__m256i; N] = std::hint::black_box(std::array::from_fn(|i| _mm256_set1_epi8(-2 - i as i8)));
        let ones = _mm256_set1_epi16(1);
        // Longer than the other probes: a core that lowered its clock for other work takes
        // a few milliseconds of this loop to raise it again.
        const ROUNDS: usize = 20 * ITERS;
        let mut acc = [_mm256_setzero_si256(); N];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            // A fresh operand per round, so the products cannot be hoisted out of the loop.
            let a = std::hint::black_box(a);
            for (x, &b) in acc.iter_mut().zip(&b) {
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (ROUNDS * N * 32) as f64 / secs / 1e9
    }

    /// AVX2's int8 sequence two quads at a time, as the kernel runs weights whose pairs of
    /// quads fit in i16: two `vpmaddubsw`, `vpaddw` of their outputs, `vpmaddwd` by ones,
    /// `vpaddd` (64 products).
    ///
    /// # Safety
    /// AVX2 available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_int8_paired() -> f64 {
        // Four chains of two weight vectors each: with two activations and the ones, 15 of the
        // 16 registers.
        const N: usize = 4;
        let (a0, a1) = (_mm256_set1_epi8(3), _mm256_set1_epi8(5));
        let b: [[__m256i; 2]; N] = std::hint::black_box(std::array::from_fn(|i| {
            [_mm256_set1_epi8(-2 - i as i8), _mm256_set1_epi8(1 + i as i8)]
        }));
        let ones = _mm256_set1_epi16(1);
        const ROUNDS: usize = 20 * ITERS;
        let mut acc = [_mm256_setzero_si256(); N];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            let (a0, a1) = std::hint::black_box((a0, a1));
            for (x, b) in acc.iter_mut().zip(&b) {
                let s = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b[0]), _mm256_maddubs_epi16(a1, b[1]));
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(s, ones));
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (ROUNDS * N * 64) as f64 / secs / 1e9
    }

    /// # Safety
    /// AVX and FMA available.
    #[target_feature(enable = "avx,fma")]
    pub(super) unsafe fn avx2_f32() -> f64 {
        let a = std::hint::black_box(_mm256_set1_ps(1.000_001));
        let b = std::hint::black_box(_mm256_set1_ps(0.999_999));
        let mut acc = [_mm256_setzero_ps(); ACCS / 2];
        let start = Instant::now();
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(acc);
        (ITERS * ACCS / 2 * 8) as f64 / secs / 1e9
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
