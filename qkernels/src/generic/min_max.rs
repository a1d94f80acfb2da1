//! The minimum, maximum and NaN count of `f32`s (dynamic quantization's range).

// Minimum, maximum and the count of NaNs, compiled per tier (the scalar twin of
// `x86_64::avx512vnni::min_max`, and the AVX2 path): sixteen running lanes of
// compare-and-select, which become vector min / max instructions (a NaN never wins a
// comparison, so it is counted apart; infinities show in the extremes).
use qtensor::multiversion;

multiversion! {
    pub(crate) fn min_max_lanes(x: &[f32]) -> (f32, f32, usize) {
        let (mut lo, mut hi, mut nan) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16], [0u32; 16]);
        let chunks = x.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                let v = c[l];
                lo[l] = if v < lo[l] { v } else { lo[l] };
                hi[l] = if v > hi[l] { v } else { hi[l] };
                nan[l] += u32::from(v.is_nan());
            }
        }
        let (mut l, mut h) = (f32::INFINITY, f32::NEG_INFINITY);
        let mut n: usize = nan.iter().map(|&c| c as usize).sum();
        for (&a, &b) in lo.iter().zip(&hi) {
            l = if a < l { a } else { l };
            h = if b > h { b } else { h };
        }
        for &v in rest {
            l = if v < l { v } else { l };
            h = if v > h { v } else { h };
            n += usize::from(v.is_nan());
        }
        (l, h, n)
    }
}
