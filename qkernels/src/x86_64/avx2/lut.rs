//! The 256-entry lookup table with AVX2: sixteen 16-entry `vpshufb` lookups by each byte's
//! low nibble, one per value of the high nibble, narrowed to the right one by a tree of
//! blends on the high nibble's four bits (15 `vpblendvb`).

use std::arch::x86_64::*;

/// The table's sixteen rows of 16 entries, each in both 128-bit lanes.
///
/// # Safety
/// AVX2 available.
#[inline(always)]
unsafe fn rows(table: &[u8; 256]) -> [__m256i; 16] {
    // SAFETY: AVX2 (precondition); row h is bytes 16h..16h + 16 of the 256.
    unsafe {
        let mut r = [_mm256_setzero_si256(); 16];
        for (h, row) in r.iter_mut().enumerate() {
            *row = _mm256_broadcastsi128_si256(_mm_loadu_si128(table.as_ptr().add(16 * h).cast()));
        }
        r
    }
}

/// `table[v]` for each byte of `v`: the lookups, then blends on bits 4, 5, 6 and 7 (each moved
/// to its byte's top bit, which is all `vpblendvb` reads; shifting 16-bit words leaves every
/// byte's top bit from that byte).
///
/// # Safety
/// AVX2 available.
#[inline(always)]
unsafe fn lookup(rows: &[__m256i; 16], v: __m256i) -> __m256i {
    // SAFETY: AVX2 (precondition); register operations only.
    unsafe {
        let lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
        let mut level = [_mm256_setzero_si256(); 16];
        for (l, row) in level.iter_mut().zip(rows) {
            *l = _mm256_shuffle_epi8(*row, lo);
        }
        let masks = [_mm256_slli_epi16::<3>(v), _mm256_slli_epi16::<2>(v), _mm256_slli_epi16::<1>(v), v];
        let mut width = 16;
        for m in masks {
            width /= 2;
            for j in 0..width {
                level[j] = _mm256_blendv_epi8(level[2 * j], level[2 * j + 1], m);
            }
        }
        level[0]
    }
}

/// `out[i] = table[x[i]]`, 32 bytes at a time, then one step of 16 where at least 16 are
/// left; returns how many bytes it did, leaving the last (fewer than 16) to the caller.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn lut_avx2(table: &[u8; 256], x: &[u8], out: &mut [u8]) -> usize {
    // SAFETY: AVX2 (precondition).
    let rows = unsafe { rows(table) };
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n: in bounds of both slices; AVX2 (precondition).
        unsafe {
            let v = _mm256_loadu_si256(x.as_ptr().add(i).cast());
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), lookup(&rows, v));
        }
        i += 32;
    }
    if i + 16 <= n {
        // SAFETY: i + 16 <= n: in bounds; the upper lane's lookups are of zero bytes and
        // are dropped.
        unsafe {
            let v = _mm256_castsi128_si256(_mm_loadu_si128(x.as_ptr().add(i).cast()));
            _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), _mm256_castsi256_si128(lookup(&rows, v)));
        }
        i += 16;
    }
    i
}

/// The table's entry: [`lut_avx2`], the tail a byte at a time.
pub(crate) fn lut(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    // SAFETY: registered only in tiers that include AVX2, built on CPUs that have it.
    let done = unsafe { lut_avx2(table, x, out) };
    crate::generic::lut::lut(table, &x[done..], &mut out[done..]);
}
