//! The f32 kernels against a naive f64 reference.

use proptest::prelude::*;
use qkernels::{
    conv2d_f32, conv2d_f32_with, linear_f32, matmul_f32, matmul_f32_bt, matmul_f32_bt_with, matmul_f32_with,
    Activation, Conv2dGeometry, PackedConv2dF32, WeightLayout,
};

/// A convolution output summed in f32, one term after another, against the exact sum `b` of
/// `k` terms whose magnitudes add up to `abs_sum`: rounding errors of a sequential sum grow
/// like `sqrt(k) * u * Σ|terms|` (u = 2^-24) with random signs (Higham and Mary's
/// probabilistic bound); four times that is a margin no correct sum exceeds in practice, and
/// far below what a wrong tap or channel would add.
fn close_to_sum(a: f32, b: f64, k: usize, abs_sum: f64) -> bool {
    (a as f64 - b).abs() <= 4.0 * (k as f64).sqrt() * (f32::EPSILON as f64 / 2.0) * abs_sum + 1e-6
}

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
            let mut abs_sum = s.abs();
            for ky in 0..case.kh { for kx in 0..case.kw {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                if iy < 0 || ix < 0 || iy >= case.h as isize || ix >= case.w as isize { continue; }
                for ci in 0..icg {
                    let t = x[((b * case.h + iy as usize) * case.w + ix as usize) * case.c + gi * icg + ci] as f64
                        * w[((o * case.kh + ky) * case.kw + kx) * icg + ci] as f64;
                    s += t;
                    abs_sum += t.abs();
                }
            }}
            let got = out[((b * oh + oy) * ow + ox) * case.oc + o];
            prop_assert!(close_to_sum(got, s, case.kh * case.kw * icg + 1, abs_sum), "{} vs {}", got, s);
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

/// A long reduction (36864 terms) in two groups: every group lands in its own columns, and
/// the sequential f32 sum stays within rounding of the exact one.
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
                let mut abs_sum = s.abs();
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = ((oy + ky) as isize - 1, (ox + kx) as isize - 1);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let px = (iy as usize * w + ix as usize) * c + gi * icg;
                        let wr = ((o * k + ky) * k + kx) * icg;
                        for ci in 0..icg {
                            let t = x[px + ci] as f64 * wts[wr + ci] as f64;
                            s += t;
                            abs_sum += t.abs();
                        }
                    }
                }
                let got = out[(oy * w + ox) * oc + o];
                assert!(close_to_sum(got, s, k * k * icg + 1, abs_sum), "pixel ({oy}, {ox}) channel {o}: {got} vs {s}");
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
    let e = matmul_f32(&[0.0; 6], &[0.0; 5], (2, 3, 2), &mut out).unwrap_err().to_string();
    assert!(e.contains("[3, 2]") && e.contains("[5]") && e.contains("right operand"), "{e}");
    let e = matmul_f32(&[0.0; 6], &[0.0; 6], (2, 3, 2), &mut out[..3]).unwrap_err().to_string();
    assert!(e.contains("[2, 2]") && e.contains("[3]") && e.contains("output"), "{e}");
    let e = matmul_f32_bt(&[0.0; 6], &[0.0; 5], (2, 3, 2), &mut out).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[5]") && e.contains("transposed"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(48)))]

    /// The product of two run-time matrices, on every tier, with the right operand as is or
    /// given transposed: each output exactly the in-order fused multiply-add sum of its `k`
    /// products from 0 (then + 0.0), with blocks cut at any row and column (8 x 32 tiles) and
    /// `k` from 0 up; and within rounding of the exact sum.
    #[test]
    fn matmul_f32_is_the_in_order_fma_sum_on_every_tier(
        m in 1usize..30, k in 0usize..80, n in 1usize..75, seed in any::<u32>(),
    ) {
        let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
        let a: Vec<f32> = (0..m * k).map(f).collect();
        let b: Vec<f32> = (0..k * n).map(|i| f(i + 7919)).collect();
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                let (mut exact, mut abs_sum) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    acc = a[i * k + kk].mul_add(b[kk * n + j], acc);
                    let t = a[i * k + kk] as f64 * b[kk * n + j] as f64;
                    exact += t;
                    abs_sum += t.abs();
                }
                want[i * n + j] = acc + 0.0;
                prop_assert!(close_to_sum(want[i * n + j], exact, k.max(1), abs_sum));
            }
        }
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        for isa in qkernels::isa::Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            for transposed in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                if transposed {
                    matmul_f32_bt_with(isa, &a, &bt, (m, k, n), &mut out).unwrap();
                } else {
                    matmul_f32_with(isa, &a, &b, (m, k, n), &mut out).unwrap();
                }
                prop_assert!(
                    out.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa} m {m} k {k} n {n} transposed {transposed}: first difference at {:?}",
                    out.iter().zip(&want).position(|(x, y)| x.to_bits() != y.to_bits())
                );
            }
        }
    }
}

/// Every output of a packed f32 convolution, as its kernels promise to compute it: the
/// products of every tap (padding reads 0) and input channel, in that order, accumulated with
/// fused multiply-adds from 0, then the bias, then the activation. Depthwise layers (one
/// input channel per group, one group per output) instead add the products of the taps inside
/// the image to the bias, unfused, in tap order.
#[allow(clippy::too_many_arguments)]
fn fma_in_order(
    x: &[f32],
    (n, h, w, c): (usize, usize, usize, usize),
    w_oihw: &[f32],
    (oc, kh, kw): (usize, usize, usize),
    bias: Option<&[f32]>,
    g: Conv2dGeometry,
    act: Activation,
) -> Vec<f32> {
    let span = |k: usize, d: usize| d * (k - 1) + 1;
    let oh = (h + 2 * g.padding[0] - span(kh, g.dilation[0])) / g.stride[0] + 1;
    let ow = (w + 2 * g.padding[1] - span(kw, g.dilation[1])) / g.stride[1] + 1;
    let (icg, ocg) = (c / g.groups, oc / g.groups);
    let mut out = vec![0.0f32; n * oh * ow * oc];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..oc {
                    let gi = o / ocg;
                    let depthwise = icg == 1 && g.groups == oc;
                    let mut acc = if depthwise { bias.map_or(0.0, |bb| bb[o]) } else { 0.0 };
                    for ky in 0..kh {
                        for kx in 0..kw {
                            for ci in 0..icg {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                                let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                                let a = if inside {
                                    x[((b * h + iy as usize) * w + ix as usize) * c + gi * icg + ci]
                                } else {
                                    0.0
                                };
                                let wv = w_oihw[((o * icg + ci) * kh + ky) * kw + kx];
                                if !depthwise {
                                    acc = a.mul_add(wv, acc);
                                } else if inside {
                                    acc += a * wv;
                                }
                            }
                        }
                    }
                    let v = if depthwise { acc } else { acc + bias.map_or(0.0, |bb| bb[o]) };
                    out[((b * oh + oy) * ow + ox) * oc + o] = match act {
                        Activation::None => v,
                        // PyTorch's relu and relu6: NaN passes through.
                        Activation::Relu => {
                            if v < 0.0 {
                                0.0
                            } else {
                                v
                            }
                        }
                        // `clamp` keeps NaN and -0.0, as the kernels do.
                        Activation::Relu6 => v.clamp(0.0, 6.0),
                    };
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(48)))]

    /// A packed f32 convolution, on every tier and thread count and from either weight
    /// layout, gives exactly the in-order fused multiply-add sums: register tiles cut at any
    /// row and column, gathered (few input channels) and implicit rows, groups, and every
    /// activation.
    #[test]
    fn packed_f32_conv_is_the_in_order_fma_sum_everywhere(
        n in 1usize..3, h in 1usize..11, w in 1usize..11, icg in prop_oneof![1usize..5, 14usize..40],
        ocg in 1usize..70, groups in 1usize..3, kh in 1usize..4, kw in 1usize..4,
        stride in 1usize..3, dilation in 1usize..3, pad in 0usize..3,
        with_bias in any::<bool>(), act in 0usize..3, seed in any::<u32>(),
    ) {
        let span = |k: usize| dilation * (k - 1) + 1;
        prop_assume!(h + 2 * pad >= span(kh) && w + 2 * pad >= span(kw));
        let (c, oc) = (icg * groups, ocg * groups);
        let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
        let x: Vec<f32> = (0..n * h * w * c).map(f).collect();
        let w_oihw: Vec<f32> = (0..oc * icg * kh * kw).map(|i| 4.0 * f(i + 7919)).collect();
        let mut w_ohwi = vec![0.0f32; w_oihw.len()];
        for o in 0..oc { for ci in 0..icg { for t in 0..kh * kw {
            w_ohwi[(o * kh * kw + t) * icg + ci] = w_oihw[(o * icg + ci) * kh * kw + t];
        }}}
        let bias: Vec<f32> = (0..oc).map(|i| f(i + 104_729)).collect();
        let bias = with_bias.then_some(&bias[..]);
        let act = [Activation::None, Activation::Relu, Activation::Relu6][act];
        let geom = Conv2dGeometry { stride: [stride; 2], padding: [pad; 2], dilation: [dilation; 2], groups };
        let want = fma_in_order(&x, (n, h, w, c), &w_oihw, (oc, kh, kw), bias, geom, act);
        for isa in crate::isas_under_test() {
            for (wts, layout) in [(&w_oihw, WeightLayout::Oihw), (&w_ohwi, WeightLayout::Ohwi)] {
                let p = PackedConv2dF32::with_isa(isa, wts, layout, (oc, icg, kh, kw), bias, geom, act).unwrap();
                for threads in [1, 3] {
                    let mut out = vec![f32::NAN; want.len()];
                    p.forward(&x, (n, h, w, c), &mut out, threads).unwrap();
                    let bad = out.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                    prop_assert!(bad.is_none(), "{isa:?} {layout:?} {threads} threads: output {:?} is {} not {}",
                        bad, bad.map_or(0.0, |i| out[i]), bad.map_or(0.0, |i| want[i]));
                }
            }
        }
    }
}

/// A large layer's rows split over threads in several chunks, each a whole number of tiles
/// but the last, against the one-thread result bit for bit.
#[test]
fn packed_f32_conv_threads_split_rows_into_the_same_outputs() {
    let (n, h, w, c, oc) = (2, 23, 19, 48, 40);
    let geom = Conv2dGeometry { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 };
    let f = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
    let x: Vec<f32> = (0..n * h * w * c).map(f).collect();
    let wts: Vec<f32> = (0..oc * c * 9).map(|i| f(i + 7919)).collect();
    let p = PackedConv2dF32::new(&wts, WeightLayout::Oihw, (oc, c, 3, 3), None, geom, Activation::Relu).unwrap();
    let want = fma_in_order(&x, (n, h, w, c), &wts, (oc, 3, 3), None, geom, Activation::Relu);
    for threads in [1, 2, 4] {
        let mut out = vec![f32::NAN; want.len()];
        p.forward(&x, (n, h, w, c), &mut out, threads).unwrap();
        assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads");
    }
}

#[test]
fn packed_f32_conv_names_what_does_not_fit() {
    let geom = Conv2dGeometry::default();
    let e =
        PackedConv2dF32::new(&[0.0; 5], WeightLayout::Oihw, (2, 3, 1, 1), None, geom, Activation::None).unwrap_err();
    assert!(e.to_string().contains("in_channels"), "{e}");
    let p = PackedConv2dF32::new(&[0.0; 6], WeightLayout::Oihw, (2, 3, 1, 1), None, geom, Activation::None).unwrap();
    let e = p.forward(&[0.0; 8], (1, 2, 2, 2), &mut [0.0; 8], 1).unwrap_err();
    assert!(e.to_string().contains("NHWC"), "{e}");
}
