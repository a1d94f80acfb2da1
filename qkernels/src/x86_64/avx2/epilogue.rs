//! The AVX2 requantization epilogue of one row of raw sums.

use std::arch::x86_64::*;
use std::ptr;

use crate::frame::gemm::{Plan, REQUANT_LIMIT};

/// Requantizes one row of raw sums to u8, 8 columns at a time; returns how many columns it
/// wrote (a multiple of 8), leaving the tail to the scalar reference. Bit-identical to
/// `requantize_scalar`: the same f32 add, then multiply (no FMA), then round half to even
/// (`cvtps_epi32` under the default MXCSR), clamp.
///
/// # Safety
/// AVX2 available; `acc.len() == out.len()`; the plan covers columns j0..j0+acc.len().
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn epilogue_u8_avx2(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) -> usize {
    let n = acc.len().min(out.len());
    let vrow = _mm256_set1_epi32(rowsum);
    let vzo = _mm256_set1_epi32(plan.zo);
    let vlo = _mm256_set1_epi32(plan.lo);
    let vhi = _mm256_set1_epi32(plan.hi);
    let lim = _mm256_set1_ps(REQUANT_LIMIT);
    let nlim = _mm256_set1_ps(-REQUANT_LIMIT);
    // Byte 0 of each i32 lane, gathered into the low 4 bytes of each 128-bit half.
    let gather = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1,
    );
    let mut c = 0;
    while c + 8 <= n {
        let j = j0 + c;
        // SAFETY: c + 8 <= n <= acc.len(); the plan's vectors have at least j0 + n entries.
        let (x, colterm, bias, bscale, mult) = unsafe {
            (
                _mm256_loadu_si256(acc.as_ptr().add(c).cast()),
                _mm256_loadu_si256(plan.colterm.as_ptr().add(j).cast()),
                _mm256_loadu_ps(plan.bias_term.as_ptr().add(j)),
                _mm256_loadu_ps(plan.bias_scale.as_ptr().add(j)),
                _mm256_loadu_ps(plan.mult.as_ptr().add(j)),
            )
        };
        let mut raw = _mm256_sub_epi32(x, colterm);
        if plan.has_zw {
            // SAFETY: as above.
            let zw = unsafe { _mm256_loadu_si256(plan.zw.as_ptr().add(j).cast()) };
            raw = _mm256_sub_epi32(raw, _mm256_mullo_epi32(vrow, zw));
        }
        let f = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
        let f = _mm256_min_ps(_mm256_max_ps(f, nlim), lim);
        let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), vzo);
        let q = _mm256_min_epi32(_mm256_max_epi32(q, vlo), vhi);
        let bytes = _mm256_shuffle_epi8(q, gather);
        let lo = _mm256_cvtsi256_si32(bytes) as u32 as u64;
        let hi = _mm256_extract_epi32::<4>(bytes) as u32 as u64;
        // SAFETY: c + 8 <= n <= out.len().
        unsafe { ptr::write_unaligned(out.as_mut_ptr().add(c).cast::<u64>(), lo | (hi << 32)) };
        c += 8;
    }
    c
}

/// The table's entry: [`epilogue_u8_avx2`], the tail through the scalar reference.
///
/// # Safety
/// AVX2 and FMA available; as `Kernels::epilogue_u8`.
pub(crate) unsafe fn requantize_row(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) {
    // SAFETY: forwarded preconditions.
    let done = unsafe { epilogue_u8_avx2(plan, acc, rowsum, j0, out) };
    crate::generic::epilogue::requantize_row(plan, &acc[done..], rowsum, j0 + done, &mut out[done..]);
}
