//! The f32 kernels against a naive f64 reference.

use proptest::prelude::*;
use qkernels::{conv2d_f32, conv2d_f32_with, linear_f32, Conv2dGeometry};

/// sgemm sums in a different order than the naive loop: allow float rounding of a K-term sum.
fn close(a: f32, b: f64, k: usize, scale: f64) -> bool {
    (a as f64 - b).abs() <= 1e-5 * (k as f64).sqrt() * scale + 1e-6
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(64)))]

    #[test]
    fn conv2d_f32_matches_naive(case in crate::conv::conv_case()) {
        let Some(_) = case.reference() else { return Ok(()) };
        let x: Vec<f32> = case.x.iter().map(|&v| v as f32 / 255.0 - 0.5).collect();
        let w: Vec<f32> = case.wt.iter().map(|&v| v as f32 / 128.0).collect();
        let g = case.geom;
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let oh = (case.h + 2 * g.padding[0] - span(case.kh, g.dilation[0])) / g.stride[0] + 1;
        let ow = (case.w + 2 * g.padding[1] - span(case.kw, g.dilation[1])) / g.stride[1] + 1;
        let mut out = vec![0.0f32; case.n * oh * ow * case.oc];
        conv2d_f32(&x, (case.n, case.h, case.w, case.c), &w, (case.oc, case.kh, case.kw), case.bias.as_deref(), g, &mut out).unwrap();
        let (icg, ocg) = (case.c / g.groups, case.oc / g.groups);
        for b in 0..case.n { for oy in 0..oh { for ox in 0..ow { for o in 0..case.oc {
            let gi = o / ocg;
            let mut s = case.bias.as_ref().map_or(0.0, |bb| bb[o] as f64);
            for ky in 0..case.kh { for kx in 0..case.kw {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                if iy < 0 || ix < 0 || iy >= case.h as isize || ix >= case.w as isize { continue; }
                for ci in 0..icg {
                    s += x[((b * case.h + iy as usize) * case.w + ix as usize) * case.c + gi * icg + ci] as f64
                        * w[((o * case.kh + ky) * case.kw + kx) * icg + ci] as f64;
                }
            }}
            let got = out[((b * oh + oy) * ow + ox) * case.oc + o];
            prop_assert!(close(got, s, case.kh * case.kw * icg, 1.0), "{} vs {}", got, s);
        }}}}
    }

    #[test]
    fn linear_f32_matches_naive(m in 1usize..9, k in 1usize..70, n in 1usize..40, seed in any::<u32>()) {
        let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
        let x: Vec<f32> = (0..m * k).map(f).collect();
        let w: Vec<f32> = (0..n * k).map(|i| f(i + 7919)).collect();
        let bias: Vec<f32> = (0..n).map(|i| f(i + 104_729)).collect();
        let mut out = vec![0.0f32; m * n];
        linear_f32(&x, m, k, &w, n, Some(&bias), &mut out).unwrap();
        for i in 0..m { for j in 0..n {
            let s: f64 = bias[j] as f64 + (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum::<f64>();
            prop_assert!(close(out[i * n + j], s, k, 0.25));
        }}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(48)))]

    /// Depthwise f32 on every tier equals, bit for bit, the bias plus the products added tap
    /// by tap in row-major tap order: what calibration relies on to be the same everywhere.
    #[test]
    fn depthwise_f32_is_the_same_sum_on_every_tier(
        n in 1usize..3, h in 1usize..12, w in 1usize..12, c in 1usize..70,
        kh in 1usize..6, kw in 1usize..6, stride in 1usize..3, dilation in 1usize..3,
        pad in 0usize..3, with_bias in any::<bool>(), seed in any::<u32>(),
    ) {
        let span = |k: usize| dilation * (k - 1) + 1;
        prop_assume!(h + 2 * pad >= span(kh) && w + 2 * pad >= span(kw));
        let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
        let x: Vec<f32> = (0..n * h * w * c).map(f).collect();
        let wts: Vec<f32> = (0..c * kh * kw).map(|i| f(i + 7919)).collect();
        let bias: Vec<f32> = (0..c).map(|i| f(i + 104_729)).collect();
        let bias = with_bias.then_some(&bias[..]);
        let geom = Conv2dGeometry { stride: [stride; 2], padding: [pad; 2], dilation: [dilation; 2], groups: c };
        let (oh, ow) = ((h + 2 * pad - span(kh)) / stride + 1, (w + 2 * pad - span(kw)) / stride + 1);
        let mut want = vec![0.0f32; n * oh * ow * c];
        for b in 0..n { for oy in 0..oh { for ox in 0..ow { for ch in 0..c {
            let mut s = bias.map_or(0.0, |bb| bb[ch]);
            for ky in 0..kh { for kx in 0..kw {
                let iy = (oy * stride + ky * dilation) as isize - pad as isize;
                let ix = (ox * stride + kx * dilation) as isize - pad as isize;
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize { continue; }
                s += x[((b * h + iy as usize) * w + ix as usize) * c + ch] * wts[(ch * kh + ky) * kw + kx];
            }}
            want[((b * oh + oy) * ow + ox) * c + ch] = s;
        }}}}
        for isa in crate::isas_under_test() {
            let mut out = vec![f32::NAN; want.len()];
            conv2d_f32_with(isa, &x, (n, h, w, c), &wts, (c, kh, kw), bias, geom, &mut out).unwrap();
            let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same, "{isa:?}: depthwise f32 differs from the in-order sum");
        }
    }
}

/// A reduction long enough that the im2col rows go to sgemm in several chunks (of 28 rows
/// here), with two groups: every chunk and group lands in its own rows and columns.
#[test]
fn conv2d_f32_splits_long_reductions_into_row_chunks() {
    let (n, h, w, c, oc, k) = (1, 8, 8, 8192, 6, 3);
    let geom = Conv2dGeometry { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 2 };
    let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
    let x: Vec<f32> = (0..n * h * w * c).map(f).collect();
    let icg = c / 2;
    let wts: Vec<f32> = (0..oc * k * k * icg).map(|i| f(i + 7919)).collect();
    let bias: Vec<f32> = (0..oc).map(|i| i as f32 - 2.5).collect();
    let mut out = vec![f32::NAN; n * h * w * oc];
    conv2d_f32(&x, (n, h, w, c), &wts, (oc, k, k), Some(&bias), geom, &mut out).unwrap();
    for oy in 0..h {
        for ox in 0..w {
            for o in 0..oc {
                let gi = o / (oc / 2);
                let mut s = bias[o] as f64;
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = ((oy + ky) as isize - 1, (ox + kx) as isize - 1);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let px = (iy as usize * w + ix as usize) * c + gi * icg;
                        let wr = ((o * k + ky) * k + kx) * icg;
                        s += (0..icg).map(|ci| x[px + ci] as f64 * wts[wr + ci] as f64).sum::<f64>();
                    }
                }
                let got = out[(oy * w + ox) * oc + o];
                assert!(close(got, s, k * k * icg, 0.5), "pixel ({oy}, {ox}) channel {o}: {got} vs {s}");
            }
        }
    }
}

#[test]
fn f32_shape_errors_name_the_shapes() {
    let mut out = vec![0.0; 4];
    let e = linear_f32(&[0.0; 6], 2, 3, &[0.0; 5], 2, None, &mut out).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[5]"), "{e}");
    let e = conv2d_f32(&[0.0; 8], (1, 2, 2, 2), &[0.0; 18], (1, 3, 3), None, Conv2dGeometry::default(), &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("smaller than the dilated kernel"), "{e}");
}
