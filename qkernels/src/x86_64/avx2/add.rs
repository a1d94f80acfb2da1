//! The AVX2 quantized addition (PyTorch's vectorized formula, eight lanes at a time).

use std::arch::x86_64::*;

use crate::frame::gemm::REQUANT_LIMIT;

/// The constants of PyTorch's vectorized quantized addition, eight lanes at a time (the
/// AVX-512 kernel's `AddConsts`, on 256-bit vectors).
struct AddConsts {
    sa: __m256,
    pa: __m256,
    sb: __m256,
    pb: __m256,
    inv: __m256,
    lim: __m256,
    nlim: __m256,
    zo: __m256i,
    order: __m256i,
    relu: bool,
}

impl AddConsts {
    /// # Safety
    /// AVX2 available.
    #[inline(always)]
    unsafe fn new((sa, za): (f32, i32), (sb, zb): (f32, i32), (so, zo): (f32, i32), relu: bool) -> Self {
        // SAFETY: AVX (precondition).
        unsafe {
            AddConsts {
                sa: _mm256_set1_ps(sa),
                pa: _mm256_set1_ps(sa * -(za as f32)),
                sb: _mm256_set1_ps(sb),
                pb: _mm256_set1_ps(sb * -(zb as f32)),
                inv: _mm256_set1_ps(1.0 / so),
                lim: _mm256_set1_ps(REQUANT_LIMIT),
                nlim: _mm256_set1_ps(-REQUANT_LIMIT),
                zo: _mm256_set1_epi16(zo as i16),
                // After the packs, dword 4h + v holds lanes 4h..4h + 4 of vector v (h the
                // 128-bit half); put it at dword 2v + h.
                order: _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                relu,
            }
        }
    }

    /// `round_half_even(c * (1 / so))` of eight pairs of bytes, before the zero point.
    ///
    /// # Safety
    /// AVX2 and FMA available; 8 bytes readable at `a` and `b`.
    #[inline(always)]
    unsafe fn eight(&self, a: *const u8, b: *const u8) -> __m256i {
        // SAFETY: AVX2 + FMA (precondition); the loads read 8 bytes each.
        unsafe {
            let xa = _mm256_cvtepu8_epi32(_mm_loadl_epi64(a.cast()));
            let xb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.cast()));
            let fa = _mm256_fmadd_ps(self.sa, _mm256_cvtepi32_ps(xa), self.pa);
            let fb = _mm256_fmadd_ps(self.sb, _mm256_cvtepi32_ps(xb), self.pb);
            let mut c = _mm256_add_ps(fa, fb);
            if self.relu {
                c = _mm256_max_ps(c, _mm256_setzero_ps());
            }
            let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(c, self.inv), self.nlim), self.lim);
            // Rounds half to even: Rust code never changes MXCSR from its default.
            _mm256_cvtps_epi32(t)
        }
    }

    /// The sums of the 32 bytes at `a` and `b`, stored at `out` (which may be `a`): narrowed
    /// as the AVX-512 kernel narrows (signed saturation to i16, the zero point with signed
    /// saturation, unsigned saturation to u8: `clamp(q + zo, 0, 255)`).
    ///
    /// # Safety
    /// AVX2 and FMA available; 32 bytes readable at `a` and `b` and writable at `out`.
    #[inline(always)]
    unsafe fn thirty_two(&self, a: *const u8, b: *const u8, out: *mut u8) {
        // SAFETY: AVX2 + FMA (precondition); every access lies in the 32 bytes.
        unsafe {
            // A loop, not `array::from_fn`: a closure would not inherit the target features.
            let mut q = [_mm256_setzero_si256(); 4];
            for (v, qv) in q.iter_mut().enumerate() {
                *qv = self.eight(a.add(8 * v), b.add(8 * v));
            }
            let lo = _mm256_adds_epi16(_mm256_packs_epi32(q[0], q[1]), self.zo);
            let hi = _mm256_adds_epi16(_mm256_packs_epi32(q[2], q[3]), self.zo);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), self.order);
            _mm256_storeu_si256(out.cast(), bytes);
        }
    }
}

/// PyTorch's vectorized quantized add over `rows` rows of `ncols` bytes, row `r` at
/// `a + r * ld`, `b + r * ld` and `out + r * ld`, 32 bytes at a time; a row's last `< 32`
/// bytes go through a stack copy with the same formula. Each group of bytes is read before it
/// is written, so `out` may be `a`. The twin of `avx512vnni::add::add_u8_avx512` and of
/// `generic::add::add_u8` (the vector-prefix formula).
///
/// # Safety
/// AVX2 and FMA available; those bytes are readable at `a` and `b` and writable at `out`;
/// `out` is exactly `a` or overlaps neither input.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8_avx2(
    a: *const u8,
    qa: (f32, i32),
    b: *const u8,
    qb: (f32, i32),
    out: *mut u8,
    qo: (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    // Rows that fill their stride are one run of bytes.
    let (rows, ncols, ld) = if ncols == ld && rows > 1 { (1, rows * ncols, rows * ncols) } else { (rows, ncols, ld) };
    // SAFETY: AVX2 + FMA (this function's features); every group of bytes lies in its row
    // (or the run of whole rows), in bounds (caller's precondition).
    unsafe {
        let k = AddConsts::new(qa, qb, qo, relu);
        for r in 0..rows {
            let row = r * ld;
            let mut j = 0;
            while j + 32 <= ncols {
                k.thirty_two(a.add(row + j), b.add(row + j), out.add(row + j));
                j += 32;
            }
            let rest = ncols - j;
            if rest > 0 {
                let (mut ta, mut tb) = ([0u8; 32], [0u8; 32]);
                std::ptr::copy_nonoverlapping(a.add(row + j), ta.as_mut_ptr(), rest);
                std::ptr::copy_nonoverlapping(b.add(row + j), tb.as_mut_ptr(), rest);
                let mut to = [0u8; 32];
                k.thirty_two(ta.as_ptr(), tb.as_ptr(), to.as_mut_ptr());
                std::ptr::copy_nonoverlapping(to.as_ptr(), out.add(row + j), rest);
            }
        }
    }
}
