//! Folding per-channel affine maps into the convolution before or after them: the folded
//! layer computes what the pair computes, on a plain convolution written here.

use ndarray::{ArrayD, IxDyn};

/// A plain convolution, stride 1, no padding: `x` is `[c, h, w]`, `w` OIHW in `groups`.
fn conv(x: &ArrayD<f32>, w: &ArrayD<f32>, b: &[f32], groups: usize) -> ArrayD<f32> {
    let (c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let (oc, per, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    assert_eq!(per * groups, c);
    let (oh, ow) = (h - kh + 1, wd - kw + 1);
    let mut y = ArrayD::zeros(IxDyn(&[oc, oh, ow]));
    for o in 0..oc {
        let first = o / (oc / groups) * per;
        for r in 0..oh {
            for s in 0..ow {
                let mut acc = f64::from(b[o]);
                for i in 0..per {
                    for p in 0..kh {
                        for q in 0..kw {
                            acc += f64::from(w[[o, i, p, q]]) * f64::from(x[[first + i, r + p, s + q]]);
                        }
                    }
                }
                y[[o, r, s]] = acc as f32;
            }
        }
    }
    y
}

/// Deterministic values in about [-1, 1].
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn affine(x: &ArrayD<f32>, scale: &[f32], shift: &[f32]) -> ArrayD<f32> {
    let mut y = x.clone();
    for (c, mut plane) in y.axis_iter_mut(ndarray::Axis(0)).enumerate() {
        plane.mapv_inplace(|v| v * scale[c] + shift[c]);
    }
    y
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn an_affine_map_after_a_convolution_folds_into_it() {
    for (c, oc, groups, k) in [(4, 6, 1, 3), (4, 6, 2, 1), (6, 6, 6, 3)] {
        let x = ArrayD::from_shape_vec(IxDyn(&[c, 5, 5]), values(c * 25, 1)).unwrap();
        let w = ArrayD::from_shape_vec(IxDyn(&[oc, c / groups, k, k]), values(oc * c / groups * k * k, 2)).unwrap();
        let b = values(oc, 3);
        let (scale, shift) = (values(oc, 4), values(oc, 5));
        let (fw, fb) = qfuse::fold_output_affine(w.view(), Some(&b), &scale, &shift).unwrap();
        let want = affine(&conv(&x, &w, &b, groups), &scale, &shift);
        let got = conv(&x, &fw, &fb, groups);
        assert!(max_diff(&want, &got) < 1e-5, "groups {groups}: {}", max_diff(&want, &got));
    }
}

#[test]
fn an_affine_map_before_an_unpadded_convolution_folds_into_it() {
    for (c, oc, groups, k) in [(4, 6, 1, 3), (4, 6, 2, 1), (6, 12, 6, 3), (5, 3, 1, 1)] {
        let x = ArrayD::from_shape_vec(IxDyn(&[c, 5, 5]), values(c * 25, 6)).unwrap();
        let w = ArrayD::from_shape_vec(IxDyn(&[oc, c / groups, k, k]), values(oc * c / groups * k * k, 7)).unwrap();
        let b = values(oc, 8);
        let (scale, shift) = (values(c, 9), values(c, 10));
        let (fw, fb) = qfuse::fold_input_affine(w.view(), Some(&b), groups, &scale, &shift).unwrap();
        let want = conv(&affine(&x, &scale, &shift), &w, &b, groups);
        let got = conv(&x, &fw, &fb, groups);
        assert!(max_diff(&want, &got) < 1e-5, "groups {groups}: {}", max_diff(&want, &got));
        // Without a bias the folded one is the shifts' sum alone.
        let (_, fb0) = qfuse::fold_input_affine(w.view(), None, groups, &scale, &shift).unwrap();
        let want0 = conv(&affine(&x, &scale, &shift), &w, &vec![0.0; oc], groups);
        assert!(max_diff(&want0, &conv(&x, &fw, &fb0, groups)) < 1e-5);
    }
}

#[test]
fn affine_maps_of_the_wrong_length_or_not_finite_are_errors() {
    let w = ArrayD::from_shape_vec(IxDyn(&[2, 3, 1, 1]), values(6, 11)).unwrap();
    let e = qfuse::fold_output_affine(w.view(), None, &[1.0; 3], &[0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("fold_output_affine") && e.contains('2') && e.contains('3'), "{e}");
    let e = qfuse::fold_input_affine(w.view(), None, 1, &[1.0; 2], &[0.0; 2]).unwrap_err().to_string();
    assert!(e.contains("fold_input_affine") && e.contains("per channel"), "{e}");
    let e = qfuse::fold_input_affine(w.view(), None, 1, &[1.0, f32::NAN, 1.0], &[0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("position 1"), "{e}");
    let e = qfuse::fold_input_affine(w.view(), None, 4, &[1.0; 3], &[0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("4 groups"), "{e}");
    let flat = ArrayD::from_shape_vec(IxDyn(&[2, 3]), values(6, 12)).unwrap();
    assert!(qfuse::fold_input_affine(flat.view(), None, 1, &[1.0; 3], &[0.0; 3]).is_err());
}
