//! conv2d on every instruction set and thread count equals a naive reference, on random
//! shapes: odd spatial sizes, strides, padding, dilation, groups, depthwise, fused ReLU.

use proptest::prelude::*;
use qkernels::{
    bias_operands, requantize_scalar, Activation, BiasForm, Conv2dGeometry, OutputQuant, PackedConv2d, QImage, QuantU8,
    ResidualAdd,
};
use qtensor::{QParams, QTensor, QuantRange};

#[derive(Debug, Clone)]
pub struct ConvCase {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oc: usize,
    pub kh: usize,
    pub kw: usize,
    pub geom: Conv2dGeometry,
    pub x: Vec<u8>,
    pub za: i32,
    pub sa: f32,
    pub wt: Vec<i8>,
    pub sw: Vec<f32>,
    pub zw: Vec<i32>,
    pub bias: Option<Vec<f32>>,
    pub out: OutputQuant,
}

impl ConvCase {
    pub fn weights(&self) -> QTensor<i8> {
        let icg = self.c / self.geom.groups;
        let params = if self.sw.len() == 1 {
            QParams::per_tensor(self.sw[0], self.zw[0]).unwrap()
        } else {
            QParams::per_channel(self.sw.clone(), self.zw.clone(), 0).unwrap()
        };
        let arr = ndarray::Array4::from_shape_vec((self.oc, self.kh, self.kw, icg), self.wt.clone()).unwrap();
        QTensor::from_int_repr(arr, params, QuantRange::full(qtensor::DType::I8)).unwrap()
    }

    pub fn image(&self) -> QImage<'_> {
        QImage { data: &self.x, n: self.n, h: self.h, w: self.w, c: self.c, scale: self.sa, zero_point: self.za }
    }

    /// Direct convolution in i64 over NHWC / OHWI, padding as real zeros, then the FBGEMM
    /// requantization.
    pub fn reference(&self) -> Option<Vec<u8>> {
        let g = &self.geom;
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        if self.h + 2 * g.padding[0] < span(self.kh, g.dilation[0])
            || self.w + 2 * g.padding[1] < span(self.kw, g.dilation[1])
        {
            return None;
        }
        let oh = (self.h + 2 * g.padding[0] - span(self.kh, g.dilation[0])) / g.stride[0] + 1;
        let ow = (self.w + 2 * g.padding[1] - span(self.kw, g.dilation[1])) / g.stride[1] + 1;
        let (icg, ocg) = (self.c / g.groups, self.oc / g.groups);
        let (lo, hi) = self.out.bounds();
        let mut out = vec![0u8; self.n * oh * ow * self.oc];
        for b in 0..self.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..self.oc {
                        let gi = o / ocg;
                        let pc = if self.sw.len() == 1 { 0 } else { o };
                        let mut raw = 0i64;
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.padding[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
                                    continue;
                                }
                                for ci in 0..icg {
                                    let xv = self.x
                                        [((b * self.h + iy as usize) * self.w + ix as usize) * self.c + gi * icg + ci]
                                        as i64;
                                    let wv = self.wt[((o * self.kh + ky) * self.kw + kx) * icg + ci] as i64;
                                    raw += (xv - self.za as i64) * (wv - self.zw[pc] as i64);
                                }
                            }
                        }
                        let ab = self.sa * self.sw[pc];
                        let depthwise = g.groups == self.c && g.groups == self.oc;
                        let form = match (self.sw.len() > 1, depthwise) {
                            (true, _) => BiasForm::PerChannel,
                            (false, false) => BiasForm::PerTensorFused,
                            (false, true) => BiasForm::PerTensorDepthwise,
                        };
                        let (bx, by) = bias_operands(self.bias.as_ref().map_or(0.0, |bb| bb[o]), ab, form);
                        out[((b * oh + oy) * ow + ox) * self.oc + o] =
                            requantize_scalar(raw as i32, bx, by, ab / self.out.scale, self.out.zero_point, lo, hi)
                                as u8;
                    }
                }
            }
        }
        Some(out)
    }
}

pub fn conv_case() -> impl Strategy<Value = ConvCase> {
    let kind = prop_oneof![Just("dense"), Just("grouped"), Just("depthwise"), Just("pointwise")];
    (
        kind,
        1usize..3,
        1usize..10,
        1usize..10,
        1usize..4,
        0usize..3,
        1usize..3,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(kind, n, h, w, stride, pad, dil, per_channel, symmetric, seed)| {
            let mut next = crate::xorshift(seed | 1);
            let (c, oc, groups, k) = match kind {
                "dense" => (1 + (next() % 20) as usize, 1 + (next() % 40) as usize, 1, 1 + (next() % 4) as usize),
                "grouped" => {
                    let g = 2 + (next() % 3) as usize;
                    (g * (1 + (next() % 5) as usize), g * (1 + (next() % 6) as usize), g, 1 + (next() % 3) as usize)
                }
                "depthwise" => {
                    let c = 1 + (next() % 150) as usize;
                    (c, c, c, 1 + (next() % 5) as usize)
                }
                _ => (1 + (next() % 70) as usize, 1 + (next() % 70) as usize, 1, 1),
            };
            let (kh, kw) = (k, if next().is_multiple_of(3) { 1 + (next() % 3) as usize } else { k });
            let pad = if kind == "pointwise" { 0 } else { pad };
            let geom = Conv2dGeometry {
                stride: [stride, [1, 2, 1][(next() % 3) as usize]],
                padding: [pad, pad],
                dilation: [dil, dil],
                groups,
            };
            let icg = c / groups;
            let chans = if per_channel { oc } else { 1 };
            let zw: Vec<i32> = (0..chans).map(|_| if symmetric { 0 } else { (next() % 41) as i32 - 20 }).collect();
            let sw: Vec<f32> = (0..chans).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect();
            let activation = [Activation::None, Activation::Relu, Activation::Relu6][(next() % 3) as usize];
            let typical = ((kh * kw * icg) as f32).sqrt() * 70.0 * 70.0 * 0.02 * 0.01;
            ConvCase {
                n,
                h,
                w,
                c,
                oc,
                kh,
                kw,
                geom,
                x: (0..n * h * w * c).map(|_| next() as u8).collect(),
                za: (next() % 256) as i32,
                sa: 0.02,
                wt: (0..oc * kh * kw * icg).map(|_| next() as i8).collect(),
                sw,
                zw,
                bias: (next().is_multiple_of(2))
                    .then(|| (0..oc).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
                out: OutputQuant {
                    scale: typical * (0.2 + (next() % 100) as f32 / 100.0),
                    zero_point: (next() % 256) as i32,
                    activation,
                },
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(128)))]

    #[test]
    fn conv2d_matches_reference_on_every_isa_and_thread_count(case in conv_case()) {
        let Some(expected) = case.reference() else {
            // The kernel must say so too.
            let p = PackedConv2d::new(&case.weights(), case.bias.as_deref(), case.geom).unwrap();
            prop_assert!(p.output_hw(case.h, case.w).is_err());
            return Ok(());
        };
        for isa in crate::isas_under_test() {
            let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
            for threads in 1..=3 {
                let mut out = vec![0u8; expected.len()];
                packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
                prop_assert_eq!(&out, &expected, "{} threads={} depthwise={}", isa, threads, packed.is_depthwise());
            }
        }
    }
}

/// A residual operand of `len` random bytes, its parameters, the sum's and a ReLU or not,
/// scaled to an output of scale `scale`.
fn residual(len: usize, scale: f32, seed: u64) -> (Vec<u8>, QuantU8, QuantU8, bool) {
    let mut next = crate::xorshift(seed | 1);
    let other: Vec<u8> = (0..len).map(|_| next() as u8).collect();
    let other_q = QuantU8 { scale: scale * (0.5 + (next() % 100) as f32 / 50.0), zero_point: (next() % 256) as i32 };
    let out_q = QuantU8 { scale: scale * (1.0 + (next() % 100) as f32 / 50.0), zero_point: (next() % 256) as i32 };
    (other, other_q, out_q, next().is_multiple_of(2))
}

/// Whether `add` gives some element of the scalar tail (past [`qkernels::vector_prefix`])
/// another byte than the vector loop would: then only an addition that knows each element's
/// position in the whole tensor gets every byte right.
fn tail_formula_matters(
    y: &[u8],
    yq: QuantU8,
    (other, other_q, out_q, relu): &(Vec<u8>, QuantU8, QuantU8, bool),
) -> bool {
    let n = y.len();
    let padded = n.next_multiple_of(64);
    let (mut yp, mut op) = (y.to_vec(), other.clone());
    yp.resize(padded, 0);
    op.resize(padded, 0);
    let (mut tail, mut vector) = (vec![0u8; n], vec![0u8; padded]);
    qkernels::add(y, yq, other, *other_q, &mut tail, *out_q, *relu).unwrap();
    qkernels::add(&yp, yq, &op, *other_q, &mut vector, *out_q, *relu).unwrap();
    tail[..] != vector[..n]
}

/// `forward_u8_add` on every ISA and thread count gives the bytes of `forward_u8` followed by
/// `add` (the unfused pair).
fn fused_add_matches_the_pair(
    case: &ConvCase,
    (other, other_q, out_q, relu): &(Vec<u8>, QuantU8, QuantU8, bool),
) -> Result<(), TestCaseError> {
    let Some(y) = case.reference() else { return Ok(()) };
    let yq = QuantU8 { scale: case.out.scale, zero_point: case.out.zero_point };
    let mut expected = vec![0u8; y.len()];
    qkernels::add(&y, yq, other, *other_q, &mut expected, *out_q, *relu).unwrap();
    let add = ResidualAdd { other, other_q: *other_q, out_q: *out_q, relu: *relu };
    for isa in crate::isas_under_test() {
        let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
        for threads in 1..=3 {
            let mut out = vec![0u8; y.len()];
            packed.forward_u8_add(&case.image(), case.out, add, &mut out, threads).unwrap();
            prop_assert_eq!(&out, &expected, "{} threads={} relu={}", isa, threads, relu);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(48)))]

    #[test]
    fn fused_residual_add_equals_conv_then_add(case in conv_case(), seed in any::<u64>()) {
        let len = case.reference().map_or(0, |y| y.len());
        fused_add_matches_the_pair(&case, &residual(len, case.out.scale, seed))?;
    }
}

/// The fused addition on layers large enough for several row and column blocks, im2col
/// chunks, and outputs whose length is not a multiple of 64 (PyTorch's scalar tail): every
/// path (pointwise, implicit and chunked im2col, grouped, depthwise).
#[test]
fn fused_residual_add_on_blocked_layers() {
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
    // (n, h, w, c, oc, k, stride, pad, groups, symmetric)
    type Shape = (usize, usize, usize, usize, usize, usize, usize, usize, usize, bool);
    let shapes: &[Shape] = &[
        (1, 13, 11, 24, 200, 1, 1, 0, 1, true),
        (2, 7, 7, 64, 72, 1, 1, 0, 1, false),
        (1, 15, 13, 16, 40, 3, 1, 1, 1, true),
        (1, 13, 12, 120, 36, 3, 1, 1, 1, false),
        (1, 11, 11, 12, 21, 3, 2, 1, 3, true),
        (1, 11, 11, 40, 40, 3, 1, 1, 40, true),
    ];
    for &(n, h, w, c, oc, k, stride, pad, groups, symmetric) in shapes {
        let icg = c / groups;
        let case = ConvCase {
            n,
            h,
            w,
            c,
            oc,
            kh: k,
            kw: k,
            geom: Conv2dGeometry { stride: [stride, stride], padding: [pad, pad], dilation: [1, 1], groups },
            x: (0..n * h * w * c).map(|_| next() as u8).collect(),
            za: (next() % 256) as i32,
            sa: 0.02,
            wt: (0..oc * k * k * icg).map(|_| next() as i8).collect(),
            sw: (0..oc).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
            zw: (0..oc).map(|_| if symmetric { 0 } else { (next() % 41) as i32 - 20 }).collect(),
            bias: Some((0..oc).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
            out: OutputQuant {
                scale: ((k * k * icg) as f32).sqrt() * 70.0 * 70.0 * 0.02 * 0.01 * 0.5,
                zero_point: (next() % 256) as i32,
                activation: Activation::None,
            },
        };
        let y = case.reference().unwrap();
        assert!(!y.len().is_multiple_of(64), "a scalar tail in every shape");
        let yq = QuantU8 { scale: case.out.scale, zero_point: case.out.zero_point };
        // Parameters for which the tail's formula changes some byte, then any others.
        let telling = (0..2000u64)
            .map(|s| residual(y.len(), case.out.scale, s + 1))
            .find(|r| tail_formula_matters(&y, yq, r))
            .unwrap_or_else(|| {
                panic!("no parameters whose scalar tail differs from the vector loop for {:?}", (n, h, w, c, oc))
            });
        fused_add_matches_the_pair(&case, &telling).unwrap();
        fused_add_matches_the_pair(&case, &residual(y.len(), case.out.scale, next())).unwrap();
    }
}

/// An im2col layer of five chunks of rows: on two threads they are evened out to six, on
/// three they run one after the other with the GEMM's blocks shared; every thread count and
/// instruction set gives the reference's bytes.
#[test]
fn im2col_chunks_shared_between_threads_match_the_reference() {
    let mut next = crate::xorshift(0x5151_2727_9393_1313);
    let (n, h, w, c, oc) = (1, 32, 32, 64, 24);
    let case = ConvCase {
        n,
        h,
        w,
        c,
        oc,
        kh: 3,
        kw: 3,
        geom: Conv2dGeometry { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 },
        x: (0..n * h * w * c).map(|_| (next() % 128) as u8).collect(),
        za: 3,
        sa: 0.02,
        wt: (0..oc * 9 * c).map(|_| next() as i8).collect(),
        sw: (0..oc).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
        zw: vec![0; oc],
        bias: Some((0..oc).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
        out: OutputQuant { scale: 0.6, zero_point: 128, activation: Activation::None },
    };
    let expected = case.reference().unwrap();
    for isa in crate::isas_under_test() {
        let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
        for threads in 1..=3 {
            let mut out = vec![0u8; expected.len()];
            packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
            assert_eq!(out, expected, "{isa} threads={threads}");
        }
    }
}

/// A wrong residual operand is an error naming the lengths.
#[test]
fn fused_residual_add_refuses_a_short_operand() {
    let case = ConvCase {
        n: 1,
        h: 4,
        w: 4,
        c: 8,
        oc: 8,
        kh: 1,
        kw: 1,
        geom: Conv2dGeometry { stride: [1, 1], padding: [0, 0], dilation: [1, 1], groups: 1 },
        x: vec![3; 128],
        za: 0,
        sa: 0.02,
        wt: vec![1; 64],
        sw: vec![0.01],
        zw: vec![0],
        bias: None,
        out: OutputQuant { scale: 0.1, zero_point: 0, activation: Activation::None },
    };
    let packed = PackedConv2d::new(&case.weights(), None, case.geom).unwrap();
    let other = vec![0u8; 127];
    let q = QuantU8 { scale: 0.1, zero_point: 0 };
    let add = ResidualAdd { other: &other, other_q: q, out_q: q, relu: false };
    let mut out = vec![0u8; 128];
    let e = packed.forward_u8_add(&case.image(), case.out, add, &mut out, 1).unwrap_err().to_string();
    assert!(e.contains("128") && e.contains("127") && e.contains("residual"), "{e}");
}

/// A depthwise case of random bytes: weights symmetric three times in four, a bias half the
/// time, an output scale that keeps most sums in range and a random activation.
fn random_depthwise_case(
    next: &mut impl FnMut() -> u64,
    (n, h, w, c): (usize, usize, usize, usize),
    (kh, kw): (usize, usize),
    geom: Conv2dGeometry,
) -> ConvCase {
    let symmetric = !next().is_multiple_of(4);
    ConvCase {
        n,
        h,
        w,
        c,
        oc: c,
        kh,
        kw,
        geom,
        x: (0..n * h * w * c).map(|_| next() as u8).collect(),
        za: (next() % 256) as i32,
        sa: 0.02,
        wt: (0..c * kh * kw).map(|_| next() as i8).collect(),
        sw: (0..c).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
        zw: (0..c).map(|_| if symmetric { 0 } else { (next() % 41) as i32 - 20 }).collect(),
        bias: (next().is_multiple_of(2)).then(|| (0..c).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
        out: OutputQuant {
            scale: ((kh * kw) as f32).sqrt() * 70.0 * 70.0 * 0.02 * 0.01 * 0.5,
            zero_point: (next() % 256) as i32,
            activation: [Activation::None, Activation::Relu, Activation::Relu6][(next() % 3) as usize],
        },
    }
}

/// Packs `case` as a depthwise layer on every ISA and runs it on 1-3 threads, asserting the
/// reference's bytes each time; false when the case has no reference (skipped).
fn case_matches_on_every_isa(case: &ConvCase, label: &str) -> bool {
    let Some(expected) = case.reference() else { return false };
    for isa in crate::isas_under_test() {
        let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
        assert!(packed.is_depthwise());
        for threads in 1..=3 {
            let mut out = vec![0u8; expected.len()];
            packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
            assert_eq!(out, expected, "{isa} threads={threads} {label}");
        }
    }
    true
}

/// Depthwise convolutions with stride 2 along the width (the flat AVX-512 kernel over rows
/// split into even and odd pixels; the per-pixel kernel with horizontal dilation) on channel
/// counts that do and do not divide 64, kernels up to 5 wide, odd and even widths and
/// paddings, every ISA and 1-3 threads.
#[test]
fn depthwise_stride_two_shapes_match_the_reference() {
    let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
    let channels: &[usize] = if cfg!(miri) { &[3, 16] } else { &[1, 3, 16, 24, 40, 96, 144, 150] };
    let mut checked = 0;
    for &c in channels {
        for (kh, kw, pad) in [(3, 3, 1), (5, 5, 2), (3, 3, 0), (1, 2, 0), (3, 4, 1)] {
            for (sh, dil) in [(2, 1), (1, 1), (2, 2)] {
                let (n, h, w) = (2, 5 + (next() % 6) as usize, 5 + (next() % 12) as usize);
                let geom = Conv2dGeometry { stride: [sh, 2], padding: [pad, pad], dilation: [dil, dil], groups: c };
                let case = random_depthwise_case(&mut next, (n, h, w, c), (kh, kw), geom);
                if case_matches_on_every_isa(
                    &case,
                    &format!("c={c} k={kh}x{kw} pad={pad} h={h} w={w} sh={sh} dil={dil}"),
                ) {
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > channels.len() * 10, "{checked}");
}

/// Depthwise convolutions with stride 1 along the width (the row-interleaved and flat AVX-512
/// kernels, the per-pixel kernel otherwise) on channel counts that do and do not divide 64,
/// kernels up to 7 wide, both vertical strides and dilations, every ISA and 1-3 threads.
#[test]
fn depthwise_unit_stride_shapes_match_the_reference() {
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
    let channels: &[usize] = if cfg!(miri) { &[3, 16] } else { &[1, 3, 16, 24, 32, 48, 96, 144, 150] };
    let mut checked = 0;
    for &c in channels {
        for (kh, kw) in [(3, 3), (1, 1), (3, 1), (2, 4), (5, 3), (3, 5), (5, 5), (7, 7)] {
            for (sh, dil) in [(1, 1), (2, 1), (1, 2)] {
                let (n, h, w) = (2, 4 + (next() % 6) as usize, 4 + (next() % 9) as usize);
                let geom = Conv2dGeometry { stride: [sh, 1], padding: [1, kw / 2], dilation: [dil, dil], groups: c };
                let case = random_depthwise_case(&mut next, (n, h, w, c), (kh, kw), geom);
                if case_matches_on_every_isa(&case, &format!("c={c} k={kh}x{kw} stride={sh} dil={dil}")) {
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > channels.len() * 12, "{checked}");
    // Rows long enough for several tiles of chunks per channel class (the kernel takes 32
    // chunks of a class at a time); and kernels taller or larger than the row-interleaved and
    // flat kernels take (17 rows, 81 taps), which must fall back, not truncate or panic.
    for (c, w, kh, kw) in [(8, 300, 3, 3), (48, 300, 3, 3), (144, 90, 3, 3), (24, 20, 17, 1), (16, 12, 9, 9)] {
        let (n, h) = (1, kh + 2);
        let case = ConvCase {
            n,
            h,
            w,
            c,
            oc: c,
            kh,
            kw,
            geom: Conv2dGeometry { stride: [1, 1], padding: [1, kw / 2], dilation: [1, 1], groups: c },
            x: (0..n * h * w * c).map(|_| next() as u8).collect(),
            za: 100,
            sa: 0.02,
            wt: (0..c * kh * kw).map(|_| next() as i8).collect(),
            sw: (0..c).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
            zw: vec![0; c],
            bias: Some((0..c).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
            out: OutputQuant { scale: 0.2, zero_point: 120, activation: Activation::Relu6 },
        };
        let expected = case.reference().unwrap();
        for isa in crate::isas_under_test() {
            let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
            for threads in [1, 2] {
                let mut out = vec![0u8; expected.len()];
                packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
                assert_eq!(out, expected, "{isa} threads={threads} c={c} w={w} k={kh}x{kw}");
            }
        }
    }
}

/// Depthwise blocks of 32 channels on AVX2 multiply tap pairs with `vpmaddubsw` where their
/// input rows' codes are within the block's bound: 7-bit inputs with two rows per image of
/// codes up to 255 in one block (every channel's first two taps 127, the others random, so
/// some pairs of taps would saturate 16 bits in those rows, however the block pairs them),
/// channel counts with and without a partial block, 3 x 3 (unrolled), 5 x 5 and 2 x 3
/// kernels, strides 1 and 2; every ISA and 1-3 threads against the reference.
#[test]
fn depthwise_byte_pairs_match_the_reference_around_their_bounds() {
    let mut next = crate::xorshift(0x51_7cc1_b727_220au64);
    let mut checked = 0;
    let channels: &[usize] = if cfg!(miri) { &[32] } else { &[32, 72, 96, 160] };
    for &c in channels {
        for (kh, kw) in [(3, 3), (5, 5), (2, 3)] {
            for stride in [1, 2] {
                let (n, h, w) = (2, 9 + (next() % 4) as usize, 10 + (next() % 6) as usize);
                let geom =
                    Conv2dGeometry { stride: [stride, stride], padding: [kh / 2, kw / 2], dilation: [1, 1], groups: c };
                let mut case = random_depthwise_case(&mut next, (n, h, w, c), (kh, kw), geom);
                case.zw = vec![0; c];
                for ch in 0..c {
                    case.wt[ch * kh * kw] = 127;
                    case.wt[ch * kh * kw + 1] = 127;
                }
                let (hot_rows, hot_block) =
                    ([next() as usize % h, next() as usize % h], next() as usize % c.div_ceil(32));
                for (i, v) in case.x.iter_mut().enumerate() {
                    let (row, ch) = ((i / (w * c)) % h, i % c);
                    *v = if hot_rows.contains(&row) && ch / 32 == hot_block {
                        next() as u8
                    } else {
                        (next() % 128) as u8
                    };
                }
                if qtensor::isa::Isa::Avx2.is_supported() {
                    let packed =
                        PackedConv2d::with_isa(qtensor::isa::Isa::Avx2, &case.weights(), None, case.geom).unwrap();
                    assert!(
                        packed.kernel().contains("vpmaddubsw on tap pairs of 32-channel blocks"),
                        "{}",
                        packed.kernel()
                    );
                }
                let label = format!("c={c} k={kh}x{kw} stride={stride} hot rows {hot_rows:?} block {hot_block}");
                if case_matches_on_every_isa(&case, &label) {
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 5 * channels.len(), "{checked}");
    // 3 x 3 weights whose taps in order pair two large positive weights (bound 129), while
    // pairing each positive tap with a negative one never saturates (bound 255): inputs of
    // any code then take the byte pairs in every row.
    for c in [32usize, 96] {
        let geom = Conv2dGeometry { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: c };
        let mut case = random_depthwise_case(&mut next, (2, 7, 9, c), (3, 3), geom);
        case.zw = vec![0; c];
        for ch in 0..c {
            for tap in 0..9 {
                let big = 100 + (next() % 28) as i8;
                case.wt[ch * 9 + tap] = match tap {
                    0..=3 => big,
                    4..=7 => -big,
                    _ => (next() % 11) as i8 - 5,
                };
            }
        }
        if qtensor::isa::Isa::Avx2.is_supported() {
            let packed = PackedConv2d::with_isa(qtensor::isa::Isa::Avx2, &case.weights(), None, case.geom).unwrap();
            assert!(packed.kernel().contains("bound (255)"), "{}", packed.kernel());
        }
        assert!(case_matches_on_every_isa(&case, &format!("c={c} paired across signs")));
    }
}

/// Dense convolutions whose kernel rows (`kw * c` bytes) are not whole quads: the implicit
/// im2col kernel reads 1- and 2-byte row tails gathered into shared quads (a 7x7 RGB input
/// layer among them), rows with no whole quad at all, and the padded layouts it falls back to
/// for 3-byte tails and for more tails than it gathers. Every ISA, 1-3 threads, batch 2, both
/// vertical dilations.
#[test]
fn dense_rows_with_tails_match_the_reference() {
    let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
    // (c, kh, kw, stride, padding, vertical dilation)
    let shapes = [
        (3, 7, 7, 2, 3, 1),  // ResNet's first layer: 21-byte rows, 1-byte tails, 2 tail quads
        (1, 3, 1, 1, 1, 1),  // 1-byte rows: tails only
        (6, 3, 3, 1, 1, 2),  // 18-byte rows: 2-byte tails, dilated
        (5, 5, 2, 2, 2, 1),  // 10-byte rows: 2-byte tails over 3 quads
        (1, 16, 1, 1, 0, 1), // 16 tails of 1 byte: the most the kernel gathers
        (1, 17, 1, 1, 0, 1), // one more: padded rows instead
        (2, 9, 2, 1, 1, 1),  // 4-byte rows, no tail
        (1, 3, 3, 1, 1, 1),  // 3-byte rows: padded to a quad
    ];
    for (c, kh, kw, stride, pad, dil) in shapes {
        let (n, h, w, oc) = (2, kh * dil + 3, 11, 70);
        let case = ConvCase {
            n,
            h,
            w,
            c,
            oc,
            kh,
            kw,
            geom: Conv2dGeometry { stride: [stride, stride], padding: [pad, pad], dilation: [dil, 1], groups: 1 },
            x: (0..n * h * w * c).map(|_| next() as u8).collect(),
            za: 37,
            sa: 0.02,
            wt: (0..oc * kh * kw * c).map(|_| next() as i8).collect(),
            sw: (0..oc).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
            zw: vec![0; oc],
            bias: Some((0..oc).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
            out: OutputQuant {
                scale: ((kh * kw * c) as f32).sqrt() * 70.0 * 70.0 * 0.02 * 0.01 * 0.5,
                zero_point: 90,
                activation: Activation::Relu,
            },
        };
        let expected = case.reference().unwrap();
        for isa in crate::isas_under_test() {
            let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
            for threads in 1..=3 {
                let mut out = vec![0u8; expected.len()];
                packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
                assert_eq!(out, expected, "{isa} threads={threads} c={c} k={kh}x{kw} stride={stride} dil={dil}");
            }
        }
    }
}

/// Convolutions whose kernel rows are whole chunks of 64 bytes (channels a multiple of 64, as
/// in ResNets), which the AMX tier reads in place where 16 output pixels of a tile lie in one
/// output row and gathers where a tile crosses a row's end or the block's last tile is short:
/// output widths below, at and above 16, strides 1 and 2, batch 2, every tier, 1-3 threads.
#[test]
fn convolutions_of_whole_chunks_match_the_reference() {
    let mut next = crate::xorshift(0x0dd5_4c3b_a2f1_9e77);
    // (n, c, oc, k, stride, pad, h, w)
    let shapes = [
        (2, 64, 64, 3, 1, 1, 9, 16),
        (2, 64, 70, 3, 1, 1, 7, 23),
        (2, 128, 40, 3, 2, 1, 11, 35),
        (2, 64, 130, 1, 1, 0, 5, 37),
        (2, 192, 16, 3, 1, 0, 6, 20),
        // 33 output pixels: tiles of 16, 16 and 1 rows
        (1, 64, 32, 3, 1, 1, 3, 11),
    ];
    for (n, c, oc, k, stride, pad, h, w) in shapes {
        let case = ConvCase {
            n,
            h,
            w,
            c,
            oc,
            kh: k,
            kw: k,
            geom: Conv2dGeometry { stride: [stride, stride], padding: [pad, pad], dilation: [1, 1], groups: 1 },
            x: (0..n * h * w * c).map(|_| next() as u8).collect(),
            za: 61,
            sa: 0.02,
            wt: (0..oc * k * k * c).map(|_| next() as i8).collect(),
            sw: (0..oc).map(|_| 0.002 + (next() % 100) as f32 * 1e-4).collect(),
            zw: vec![0; oc],
            bias: Some((0..oc).map(|_| ((next() % 201) as f32 - 100.0) * 1e-2).collect()),
            out: OutputQuant {
                scale: ((k * k * c) as f32).sqrt() * 70.0 * 70.0 * 0.02 * 0.01 * 0.5,
                zero_point: 70,
                activation: Activation::None,
            },
        };
        let expected = case.reference().unwrap();
        for isa in crate::isas_under_test() {
            let packed = PackedConv2d::with_isa(isa, &case.weights(), case.bias.as_deref(), case.geom).unwrap();
            for threads in 1..=3 {
                let mut out = vec![0u8; expected.len()];
                packed.forward_u8(&case.image(), case.out, &mut out, threads).unwrap();
                assert_eq!(out, expected, "{isa} threads={threads} c={c} oc={oc} k={k} stride={stride} w={w}");
            }
        }
    }
}

/// Layers split over the same cached thread pool, called at once from several threads: a pool
/// worker waiting on one layer's parallel work runs another's jobs, so no per-thread buffer may
/// stay borrowed across that wait (this once panicked with "RefCell already borrowed").
#[test]
fn concurrent_callers_sharing_a_pool_get_the_single_threaded_bits() {
    let mk = |c: usize, oc: usize, groups: usize, k: usize, symmetric: bool, seed: u64| {
        let mut next = crate::xorshift(seed);
        let (n, h, w) = (2, 23, 19);
        ConvCase {
            n,
            h,
            w,
            c,
            oc,
            kh: k,
            kw: k,
            geom: Conv2dGeometry { stride: [1, 1], padding: [k / 2, k / 2], dilation: [1, 1], groups },
            x: (0..n * h * w * c).map(|_| next() as u8).collect(),
            za: 7,
            sa: 0.02,
            wt: (0..oc * k * k * (c / groups)).map(|_| next() as i8).collect(),
            sw: vec![0.004; oc],
            zw: vec![if symmetric { 0 } else { 3 }; oc],
            bias: None,
            out: OutputQuant { scale: 0.5, zero_point: 9, activation: Activation::Relu },
        }
    };
    // Depthwise (row-interleaved and flat), implicit im2col and chunked im2col.
    let cases = [
        mk(32, 32, 32, 3, true, 1),
        mk(117, 117, 117, 5, true, 2),
        mk(16, 24, 1, 3, true, 3),
        mk(16, 24, 1, 3, false, 4),
    ];
    let expected: Vec<Vec<u8>> = cases.iter().map(|c| c.reference().unwrap()).collect();
    let layers: Vec<PackedConv2d> =
        cases.iter().map(|c| PackedConv2d::new(&c.weights(), c.bias.as_deref(), c.geom).unwrap()).collect();
    let rounds = if cfg!(miri) { 1 } else { 40 };
    std::thread::scope(|s| {
        for t in 0..4 {
            let (cases, layers, expected) = (&cases, &layers, &expected);
            s.spawn(move || {
                for r in 0..rounds {
                    let i = (t + r) % cases.len();
                    let mut out = vec![0u8; expected[i].len()];
                    layers[i].forward_u8(&cases[i].image(), cases[i].out, &mut out, 3).unwrap();
                    assert_eq!(out, expected[i], "caller {t}, round {r}, layer {i}");
                }
            });
        }
    });
}

/// On AVX2 the plan names the largest input code each layer's `vpmaddubsw` tiles take; a
/// grouped layer, whose groups have bounds of their own, names their range.
#[test]
fn avx2_kernel_names_give_the_pair_bound_of_each_group() {
    if !qtensor::isa::Isa::Avx2.is_supported() {
        return;
    }
    // OHWI [4, 1, 1, 4], two groups of two outputs: group 0's weights are all 127 (pairs of
    // 254 saturate 16 bits above code 129), group 1's all 1 (nothing saturates).
    let w: Vec<i8> = (0..16).map(|i| if i < 8 { 127 } else { 1 }).collect();
    let q = QTensor::from_int_repr(
        ndarray::Array4::from_shape_vec((4, 1, 1, 4), w).unwrap(),
        QParams::per_tensor(0.01, 0).unwrap(),
        QuantRange::full(qtensor::DType::I8),
    )
    .unwrap();
    let isa = qtensor::isa::Isa::Avx2;
    let grouped = PackedConv2d::with_isa(isa, &q, None, Conv2dGeometry { groups: 2, ..Default::default() }).unwrap();
    assert!(
        grouped.kernel().ends_with("avx2: vpmaddubsw for input codes <= 129..=255 (per group), above it vpmaddubsw on the codes clamped to it plus their excess on exact vpmaddwd (rows with at most K/8 such codes), else exact vpmaddwd"),
        "{}",
        grouped.kernel()
    );
    // One group of group 0's weights alone.
    let q4 = QTensor::from_int_repr(
        ndarray::Array4::from_shape_vec((2, 1, 1, 4), vec![127i8; 8]).unwrap(),
        QParams::per_tensor(0.01, 0).unwrap(),
        QuantRange::full(qtensor::DType::I8),
    )
    .unwrap();
    let one = PackedConv2d::with_isa(isa, &q4, None, Conv2dGeometry::default()).unwrap();
    assert!(
        one.kernel().ends_with("avx2: vpmaddubsw for input codes <= 129, above it vpmaddubsw on the codes clamped to it plus their excess on exact vpmaddwd (rows with at most K/8 such codes), else exact vpmaddwd"),
        "{}",
        one.kernel()
    );
}
