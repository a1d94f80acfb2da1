//! Float elementwise functions for the float paths (dynamic quantization's float ops,
//! calibration, float fallbacks): `e^x`, GELU, softmax and layer normalization on `f32` slices, written so the
//! compiler vectorises them (no branches, no calls) and compiled per tier by `multiversion!`.
//! Every tier gives the same bits: the code is the same, and Rust neither fuses nor reorders
//! float operations (no fused multiply-adds here: without FMA they would be library calls).

use qtensor::multiversion;

/// `e^x` in f32, within 3 ulp for `x` in `[-87, 88]`; below, `e^-87`; above, `e^88`; NaN
/// stays NaN. Cody-Waite reduction `x = n ln 2 + r`, `|r| <= ln 2 / 2`, then Cephes' degree-6
/// polynomial for `e^r`, scaled by `2^n` through the exponent bits.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Rounds to nearest (even) by adding and taking away 1.5 * 2^23.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2's high part, 355 / 512 (0.693359375, written as its shortest f32 spelling): n times
    // it is exact, a 9-bit constant times an 8-bit whole number.
    let r = x - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = (p * r) * r + r + 1.0;
    // n is a whole number in [-126, 127], held in t's low mantissa bits (t's other bits are
    // shifted out): 2^n is a normal number built from its exponent field.
    y * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// `erf(z)` by Abramowitz-Stegun 7.1.26 (absolute error under 1.5e-7), as PyTorch's vectorised
/// GELU computes it, with [`exp_f32`].
#[inline(always)]
fn erf_f32(z: f32) -> f32 {
    let t = 1.0 / (0.327_591_1f32 * z.abs() + 1.0);
    let mut r = 1.061_405_4f32 * t - 1.453_152;
    r = r * t + 1.421_413_8;
    r = r * t - 0.284_496_74;
    r = r * t + 0.254_829_6;
    let e = exp_f32(-(z * z));
    ((-e * t) * r + 1.0).copysign(z)
}

/// `tanh(u)` as `1 - 2 / (e^2u + 1)`: within 1e-7 of tanh in absolute terms, which is what
/// GELU's `1 + tanh` needs.
#[inline(always)]
fn tanh_f32(u: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

/// GELU of one value: `x Φ(x)` through `erf` (Abramowitz-Stegun 7.1.26, with [`exp_f32`]), or the tanh approximation
/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
#[inline(always)]
pub fn gelu_f32(x: f32, tanh: bool) -> f32 {
    if tanh {
        let u = 0.797_884_6 * (0.044_715f32 * (x * x * x) + x);
        (0.5 * x) * (1.0 + tanh_f32(u))
    } else {
        (x * 0.5) * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
    }
}

/// Values per piece when a call is shared between threads.
const PIECE: usize = 1 << 14;

/// `f` over `x` in pieces of whole units of `unit` values, on up to `threads` threads of the
/// current rayon pool (one piece on the caller's thread when that is all there is).
fn shared(x: &mut [f32], unit: usize, threads: usize, f: impl Fn(&mut [f32]) + Send + Sync) {
    let units = x.len() / unit.max(1);
    if threads <= 1 || x.len() < 2 * PIECE || units < 2 {
        return f(x);
    }
    use rayon::prelude::*;
    let per = (PIECE / unit.max(1)).max(1).max(units.div_ceil(threads * 4));
    x.par_chunks_mut(per * unit).for_each(f);
}

/// GELU in place over `x`, vectorised ([`gelu_f32`] on each value), shared out between
/// `threads` threads of the current rayon pool for large slices; the same bits on any count.
pub fn gelu_in_place(x: &mut [f32], tanh: bool, threads: usize) {
    let isa = qtensor::isa::selected();
    shared(x, 1, threads, |p| gelu_slice(isa, p, tanh));
}

multiversion! {
    fn gelu_slice(x: &mut [f32], tanh: bool) {
        if tanh {
            x.iter_mut().for_each(|v| *v = gelu_f32(*v, true));
        } else {
            x.iter_mut().for_each(|v| *v = gelu_f32(*v, false));
        }
    }
}

/// Softmax in place over lanes of `len` values `inner` apart: `x` is whole blocks of
/// `len * inner` values, the tensor `[outer, len, inner]` in row-major order, and each lane
/// `x[o, :, i]` becomes `e^(v - max) / sum`. Exponentials by [`exp_f32`]; sums in a fixed order.
///
/// Blocks are shared out between `threads` threads of the current rayon pool; the bits do not
/// depend on the count.
///
/// # Panics
/// `len` or `inner` zero, or `x` not whole blocks (a caller's broken invariant).
pub fn softmax_in_place(x: &mut [f32], len: usize, inner: usize, threads: usize) {
    assert!(
        len > 0 && inner > 0 && x.len().is_multiple_of(len * inner),
        "softmax lanes of {len} x {inner} over {} values",
        x.len()
    );
    let isa = qtensor::isa::selected();
    shared(x, len * inner, threads, |p| softmax_blocks(isa, p, len, inner));
}

multiversion! {
    fn softmax_blocks(x: &mut [f32], len: usize, inner: usize) {
        if inner == 1 {
            for row in x.chunks_exact_mut(len) {
                // Sixteen partial maxima and sixteen partial sums (one AVX-512 vector, two of
                // AVX2): one chain of dependent steps would bound the speed.
                let mut tops = [f32::NEG_INFINITY; 16];
                let mut chunks = row.chunks_exact(16);
                for c in &mut chunks {
                    tops.iter_mut().zip(c).for_each(|(t, &v)| *t = t.max(v));
                }
                let top = chunks.remainder().iter().chain(&tops).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut part = [0f32; 16];
                let mut chunks = row.chunks_exact_mut(16);
                for c in &mut chunks {
                    for (p, v) in part.iter_mut().zip(c.iter_mut()) {
                        *v = exp_f32(*v - top);
                        *p += *v;
                    }
                }
                let mut tail = 0f32;
                for v in chunks.into_remainder() {
                    *v = exp_f32(*v - top);
                    tail += *v;
                }
                let r = 1.0 / (part.iter().sum::<f32>() + tail);
                row.iter_mut().for_each(|v| *v *= r);
            }
            return;
        }
        // Lanes `inner` apart: each step works on a row of `inner` lanes at once.
        let (mut top, mut sum) = (vec![0f32; inner], vec![0f32; inner]);
        for block in x.chunks_exact_mut(len * inner) {
            top.fill(f32::NEG_INFINITY);
            for row in block.chunks_exact(inner) {
                top.iter_mut().zip(row).for_each(|(t, &v)| *t = t.max(v));
            }
            sum.fill(0.0);
            for row in block.chunks_exact_mut(inner) {
                for ((v, &t), s) in row.iter_mut().zip(&top).zip(sum.iter_mut()) {
                    *v = exp_f32(*v - t);
                    *s += *v;
                }
            }
            sum.iter_mut().for_each(|s| *s = 1.0 / *s);
            for row in block.chunks_exact_mut(inner) {
                row.iter_mut().zip(&sum).for_each(|(v, &r)| *v *= r);
            }
        }
    }
}

/// Sum of `x` in sixteen partial sums, then those in order: a fixed order on every tier.
#[inline(always)]
fn sum16(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut part = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        part.iter_mut().zip(c).for_each(|(p, &v)| *p += f(v));
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    part.iter().sum::<f32>() + tail
}

/// Layer normalization in place over rows of `gamma.len()` values: each row becomes
/// `(v - mean) / sqrt(var + eps) * gamma + beta`, with the mean and the (biased) variance of
/// the row in f32, the variance from the row minus its mean.
///
/// Rows are shared out between `threads` threads of the current rayon pool; the bits do not
/// depend on the count.
///
/// # Panics
/// `gamma` and `beta` of different lengths, or `x` not whole rows (a caller's broken
/// invariant).
pub fn layer_norm_in_place(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32, threads: usize) {
    let n = gamma.len();
    assert!(n > 0 && beta.len() == n && x.len().is_multiple_of(n), "layer norm rows of {n} over {} values", x.len());
    let isa = qtensor::isa::selected();
    shared(x, n, threads, |p| layer_norm_rows(isa, p, gamma, beta, eps));
}

multiversion! {
    fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let n = gamma.len();
        for row in x.chunks_exact_mut(n) {
            let mean = sum16(row, |v| v) / n as f32;
            let var = sum16(row, |v| (v - mean) * (v - mean)) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), want));
            x += 0.000_731;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-1e4), exp_f32(-87.0));
        assert!(exp_f32(1e4).is_finite());
    }

    #[test]
    fn every_tier_gives_the_same_bits() {
        use qtensor::isa::Isa;
        let mut seed = 0x9e37_79b9u32;
        let x: Vec<f32> = (0..4099)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed as f32 / u32::MAX as f32 - 0.5) * 24.0
            })
            .collect();
        let tiers: Vec<Isa> =
            crate::registry::tiers(Isa::host_arch()).iter().copied().filter(|t| t.is_supported()).collect();
        let run = |isa: Isa| {
            let (mut g, mut t, mut s, mut c) = (x.clone(), x.clone(), x[..4096].to_vec(), x[..4096].to_vec());
            gelu_slice(isa, &mut g, false);
            gelu_slice(isa, &mut t, true);
            softmax_blocks(isa, &mut s, 197 - 69, 1);
            softmax_blocks(isa, &mut c, 16, 8);
            let mut l = x[..4096].to_vec();
            layer_norm_rows(isa, &mut l, &x[..64], &x[64..128], 1e-5);
            [g, t, s, c, l].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let want = run(Isa::Scalar);
        for isa in tiers {
            assert_eq!(run(isa), want, "{isa:?}");
        }
    }

    #[test]
    fn thread_counts_give_the_same_bits() {
        let x: Vec<f32> = (0..197 * 768).map(|i| ((i * 7919) % 1013) as f32 / 101.0 - 5.0).collect();
        let g: Vec<f32> = (0..768).map(|i| 1.0 + (i % 7) as f32 * 0.01).collect();
        let run = |threads: usize| {
            crate::with_threads(threads, || {
                let (mut a, mut b, mut c) = (x.clone(), x.clone(), x.clone());
                gelu_in_place(&mut a, false, threads);
                softmax_in_place(&mut b, 197, 1, threads);
                layer_norm_in_place(&mut c, &g, &g, 1e-6, threads);
                [a, b, c].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(2), run(1));
        assert_eq!(run(3), run(1));
    }

    #[test]
    fn softmax_lanes_sum_to_one_and_follow_the_formula() {
        // [2, 5, 3]: lanes along the middle axis, and the same values as rows.
        let x: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.9 - 4.0).collect();
        let mut strided = x.clone();
        softmax_in_place(&mut strided, 5, 3, 1);
        for o in 0..2 {
            for i in 0..3 {
                let lane: Vec<f64> = (0..5).map(|k| x[o * 15 + k * 3 + i] as f64).collect();
                let top = lane.iter().cloned().fold(f64::MIN, f64::max);
                let sum: f64 = lane.iter().map(|v| (v - top).exp()).sum();
                for k in 0..5 {
                    let want = (lane[k] - top).exp() / sum;
                    assert!((strided[o * 15 + k * 3 + i] as f64 - want).abs() < 3e-7, "lane {o},{i} at {k}");
                }
            }
        }
        let mut rows = x.clone();
        softmax_in_place(&mut rows, 10, 1, 1);
        for r in rows.chunks(10) {
            assert!((r.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }

    /// Rows long enough for the vector loops (and their tails) follow the formula, and every
    /// tier gives the scalar twin's bits.
    #[test]
    fn softmax_rows_follow_the_formula_on_every_tier() {
        for len in [1, 15, 16, 17, 40, 197] {
            let x: Vec<f32> = (0..3 * len).map(|i| ((i * 7919) % 61) as f32 * 0.21 - 6.0).collect();
            let mut want = x.clone();
            softmax_blocks(qtensor::isa::Isa::Scalar, &mut want, len, 1);
            for (r, row) in x.chunks(len).enumerate() {
                let top = row.iter().map(|&v| v as f64).fold(f64::MIN, f64::max);
                let sum: f64 = row.iter().map(|&v| (v as f64 - top).exp()).sum();
                for (k, &v) in row.iter().enumerate() {
                    let exact = (v as f64 - top).exp() / sum;
                    let got = want[r * len + k] as f64;
                    assert!((got - exact).abs() < 3e-7, "len {len}, row {r} at {k}: {got} against {exact}");
                }
            }
            for isa in qtensor::isa::Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut got = x.clone();
                softmax_blocks(isa, &mut got, len, 1);
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa}, rows of {len}: bits differ from the scalar twin's");
            }
        }
    }

    #[test]
    fn layer_norm_follows_the_formula() {
        let x: Vec<f32> = (0..3 * 37).map(|i| ((i * 13) % 29) as f32 * 0.37 - 3.0).collect();
        let g: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 * 0.03).collect();
        let b: Vec<f32> = (0..37).map(|i| i as f32 * 0.01 - 0.2).collect();
        let mut y = x.clone();
        layer_norm_in_place(&mut y, &g, &b, 1e-5, 1);
        for (r, (xr, yr)) in x.chunks(37).zip(y.chunks(37)).enumerate() {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 37.0;
            for i in 0..37 {
                let want = (xr[i] as f64 - mean) / (var + 1e-5).sqrt() * g[i] as f64 + b[i] as f64;
                assert!((yr[i] as f64 - want).abs() < 2e-6, "row {r} at {i}: {} against {want}", yr[i]);
            }
        }
    }

    #[test]
    fn gelu_is_near_the_exact_function() {
        for i in -4000..4000 {
            let x = i as f32 / 400.0;
            let xd = x as f64;
            let exact = xd * 0.5 * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            assert!((gelu_f32(x, false) as f64 - exact).abs() <= 2e-7 * xd.abs().max(1.0), "erf form at {x}");
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let exact = 0.5 * xd * (1.0 + u.tanh());
            assert!((gelu_f32(x, true) as f64 - exact).abs() <= 2e-7 * xd.abs().max(1.0), "tanh form at {x}");
        }
    }
}
