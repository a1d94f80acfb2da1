//! The AVX-512 quantized addition (PyTorch's vectorized formula).

use std::arch::x86_64::*;

use crate::frame::gemm::REQUANT_LIMIT;

/// PyTorch's vectorized quantized add, as constants in registers: dequantize each input
/// (`fma(s, q, s * -z)`), add, optional `max(.., 0)`, and quantize
/// (`zo + round_half_even(c * (1 / so))`, clamped to `u8`).
struct AddConsts {
    sa: __m512,
    pa: __m512,
    sb: __m512,
    pb: __m512,
    inv: __m512,
    lim: __m512,
    nlim: __m512,
    zo: __m512i,
    order: __m512i,
    relu: bool,
}

impl AddConsts {
    /// # Safety
    /// AVX-512 F available.
    #[inline(always)]
    unsafe fn new((sa, za): (f32, i32), (sb, zb): (f32, i32), (so, zo): (f32, i32), relu: bool) -> Self {
        // SAFETY: AVX-512 F (precondition).
        unsafe {
            AddConsts {
                sa: _mm512_set1_ps(sa),
                pa: _mm512_set1_ps(sa * -(za as f32)),
                sb: _mm512_set1_ps(sb),
                pb: _mm512_set1_ps(sb * -(zb as f32)),
                inv: _mm512_set1_ps(1.0 / so),
                lim: _mm512_set1_ps(REQUANT_LIMIT),
                nlim: _mm512_set1_ps(-REQUANT_LIMIT),
                zo: _mm512_set1_epi16(zo as i16),
                // As in `Requant`: after the packs, dword 4l + v holds lanes 4l..4l + 4 of
                // vector v; put it at dword 4v + l.
                order: _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                relu,
            }
        }
    }

    /// `round_half_even(c * (1 / so))` of 16 pairs of bytes, before the zero point.
    ///
    /// # Safety
    /// AVX-512 F available.
    #[inline(always)]
    unsafe fn sixteen(&self, xa: __m128i, xb: __m128i) -> __m512i {
        // SAFETY: AVX-512 F (precondition).
        unsafe {
            let fa = _mm512_fmadd_ps(self.sa, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(xa)), self.pa);
            let fb = _mm512_fmadd_ps(self.sb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(xb)), self.pb);
            let mut c = _mm512_add_ps(fa, fb);
            if self.relu {
                c = _mm512_max_ps(c, _mm512_setzero_ps());
            }
            let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(c, self.inv), self.nlim), self.lim);
            // Rounds half to even: Rust code never changes MXCSR from its default.
            _mm512_cvtps_epi32(t)
        }
    }

    /// The sums of the `n <= 64` bytes at `a` and `b`, stored at `out` (which may be `a`):
    /// four vectors narrowed together as `Requant::row` does (signed saturation to i16, the
    /// zero point, unsigned saturation to u8: `clamp(q + zo, 0, 255)`), one store.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; `n` bytes readable at `a` and `b` and writable at `out`.
    #[inline(always)]
    unsafe fn up_to_64(&self, a: *const u8, b: *const u8, out: *mut u8, n: usize) {
        // SAFETY: AVX-512 F/BW/VL (precondition); loads and the store touch the first n bytes.
        unsafe {
            let mut q = [_mm512_setzero_si512(); 4];
            for (v, qv) in q.iter_mut().enumerate() {
                let lanes = n.saturating_sub(16 * v).min(16);
                if lanes == 16 {
                    *qv = self.sixteen(_mm_loadu_si128(a.add(16 * v).cast()), _mm_loadu_si128(b.add(16 * v).cast()));
                } else if lanes > 0 {
                    let m = ((1u32 << lanes) - 1) as __mmask16;
                    *qv = self.sixteen(
                        _mm_maskz_loadu_epi8(m, a.add(16 * v).cast()),
                        _mm_maskz_loadu_epi8(m, b.add(16 * v).cast()),
                    );
                }
            }
            let lo = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), self.zo);
            let hi = _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), self.zo);
            let bytes = _mm512_permutexvar_epi32(self.order, _mm512_packus_epi16(lo, hi));
            if n == 64 {
                _mm512_storeu_si512(out.cast(), bytes);
            } else {
                _mm512_mask_storeu_epi8(out.cast(), (1u64 << n) - 1, bytes);
            }
        }
    }
}

/// PyTorch's vectorized quantized add ([`AddConsts`]) over `rows` rows of `ncols` bytes, row
/// `r` at `a + r * ld`, `b + r * ld` and `out + r * ld`, 64 bytes at a time (a row's last
/// ones masked). Each group of bytes is read before it is written, so `out` may be `a`.
///
/// # Safety
/// AVX-512 F/BW/VL available; those bytes are readable at `a` and `b` and writable at `out`;
/// `out` is exactly `a` or overlaps neither input.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8_avx512(
    a: *const u8,
    qa: (f32, i32),
    b: *const u8,
    qb: (f32, i32),
    out: *mut u8,
    qo: (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    // Rows that fill their stride are one run of bytes: 64 at a time across row ends (each
    // element's formula does not depend on its neighbours).
    let (rows, ncols, ld) = if ncols == ld && rows > 1 { (1, rows * ncols, rows * ncols) } else { (rows, ncols, ld) };
    // SAFETY: AVX-512 F/BW/VL (this function's features); every group of n bytes lies in
    // its row (or the run of whole rows), in bounds (caller's precondition).
    unsafe {
        let k = AddConsts::new(qa, qb, qo, relu);
        for r in 0..rows {
            let row = r * ld;
            let mut j = 0;
            while j < ncols {
                let n = (ncols - j).min(64);
                k.up_to_64(a.add(row + j), b.add(row + j), out.add(row + j), n);
                j += n;
            }
        }
    }
}
