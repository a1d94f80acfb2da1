//! The 256-entry lookup table with AVX-512 VBMI (`vpermi2b`).

use std::arch::x86_64::*;

/// `out[i] = table[x[i]]`, 64 bytes at a time with two `vpermi2b` lookups (entries 0..128 and
/// 128..256) and a blend on each index's top bit; returns how many bytes it did (a multiple
/// of 64), leaving the tail to the caller.
///
/// # Safety
/// AVX-512 F/BW and VBMI available.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn lut_avx512vbmi(table: &[u8; 256], x: &[u8], out: &mut [u8]) -> usize {
    // SAFETY: the table holds 256 bytes: four 64-byte loads.
    let t: [__m512i; 4] = std::array::from_fn(|i| unsafe { _mm512_loadu_si512(table.as_ptr().add(64 * i).cast()) });
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n: in bounds of both slices.
        let idx = unsafe { _mm512_loadu_si512(x.as_ptr().add(i).cast()) };
        let lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
        let hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
        let r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
        // SAFETY: as above.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), r) };
        i += 64;
    }
    i
}

/// The table's entry: [`lut_avx512vbmi`], the tail a byte at a time.
pub(crate) fn lut(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    // SAFETY: registered only on a CPU with AVX-512 F/BW (the tier) and VBMI (checked).
    let done = unsafe { lut_avx512vbmi(table, x, out) };
    crate::generic::lut::lut(table, &x[done..], &mut out[done..]);
}

/// `out[i] = table[top - x[i]]`, 16 values at a time: the 256 entries held in 16 registers,
/// eight `vpermt2ps` lookups of 32 entries each, then blends on bits 5, 6 and 7 of each
/// distance; returns how many values it did (a multiple of 16), leaving the tail to the
/// caller.
///
/// # Safety
/// AVX-512 F available. (A code above `top` reads some entry of the table: only the low
/// eight bits of each distance choose one.)
#[target_feature(enable = "avx512f")]
unsafe fn lookup_below_avx512(table: &[f32; 256], x: &[u8], top: u8, out: &mut [f32]) -> usize {
    // SAFETY: the table holds 256 values: sixteen 16-value loads.
    let t: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(table.as_ptr().add(16 * i)) });
    let top = _mm512_set1_epi32(i32::from(top));
    let bit = |b: i32| _mm512_set1_epi32(1 << b);
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n: 16 codes inside `x`.
        let codes = unsafe { _mm_loadu_si128(x.as_ptr().add(i).cast()) };
        let d = _mm512_sub_epi32(top, _mm512_cvtepu8_epi32(codes));
        // Entries 32g..32g + 32 by the distance's low five bits.
        let r: [__m512; 8] = std::array::from_fn(|g| _mm512_permutex2var_ps(t[2 * g], d, t[2 * g + 1]));
        let (b5, b6, b7) =
            (_mm512_test_epi32_mask(d, bit(5)), _mm512_test_epi32_mask(d, bit(6)), _mm512_test_epi32_mask(d, bit(7)));
        let a: [__m512; 4] = std::array::from_fn(|h| _mm512_mask_blend_ps(b5, r[2 * h], r[2 * h + 1]));
        let b = [_mm512_mask_blend_ps(b6, a[0], a[1]), _mm512_mask_blend_ps(b6, a[2], a[3])];
        // SAFETY: as above, 16 values inside `out`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mask_blend_ps(b7, b[0], b[1])) };
        i += 16;
    }
    i
}

/// The table's entry: [`lookup_below_avx512`], the tail one value at a time.
pub(crate) fn lookup_below(table: &[f32; 256], x: &[u8], top: u8, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "lookup_below: as many outputs as codes");
    // SAFETY: registered only for the AVX-512 VNNI tier, on a CPU that has it (so AVX-512 F).
    let done = unsafe { lookup_below_avx512(table, x, top, out) };
    crate::generic::lut::lookup_below(table, &x[done..], top, &mut out[done..]);
}
