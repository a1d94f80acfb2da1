//! The AVX-512 min / max / NaN scan of `f32` values (dynamic quantization's range).

use std::arch::x86_64::*;

/// The minimum and maximum of `x` and whether it holds a NaN, 64 values at a time (four
/// running vectors), the tail through the scalar loop; the same extremes as
/// `generic::min_max::min_max_lanes` wherever there is no NaN (comparisons are exact; a zero's sign may
/// differ, which no caller looks at).
///
/// # Safety
/// AVX-512 F available.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn min_max_avx512(x: &[f32]) -> (f32, f32, bool) {
    let (mut lo, mut hi) = ([_mm512_set1_ps(f32::INFINITY); 4], [_mm512_set1_ps(f32::NEG_INFINITY); 4]);
    let mut nan: __mmask16 = 0;
    let chunks = x.chunks_exact(64);
    let rest = chunks.remainder();
    for c in chunks {
        for v in 0..4 {
            // SAFETY: 16 of the chunk's 64 values.
            let a = unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * v)) };
            lo[v] = _mm512_min_ps(lo[v], a);
            hi[v] = _mm512_max_ps(hi[v], a);
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
        }
    }
    let l = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let h = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    let (mut l, mut h) = (_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h));
    let mut any_nan = nan != 0;
    for &v in rest {
        l = if v < l { v } else { l };
        h = if v > h { v } else { h };
        any_nan |= v.is_nan();
    }
    (l, h, any_nan)
}

/// The table's entry (the tier argument is the table's own).
pub(crate) fn min_max(_isa: qtensor::isa::Isa, x: &[f32]) -> (f32, f32, usize) {
    // SAFETY: registered only for the AVX-512 VNNI tier, on a CPU that has it (so AVX-512 F).
    let (lo, hi, nan) = unsafe { min_max_avx512(x) };
    (lo, hi, usize::from(nan))
}
