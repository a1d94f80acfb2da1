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
