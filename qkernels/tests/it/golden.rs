//! Against PyTorch's own quantized linear and conv2d (FBGEMM engine), on fixtures PyTorch
//! wrote (`scripts/golden/qkernels_golden.py`; f32 values as bit patterns).
//!
//! Every element must be identical, with one explained exception: FBGEMM's depthwise fast
//! path (groups == C, OC in {C, 2C}, C % 8 == 0, square 3/5/7 kernel, stride 1 or 2, no
//! dilation, "same" padding) sums the raw `u8 x i8` products of consecutive taps in pairs
//! with int16 saturation, so with activations spread over the whole u8 range its sums are
//! wrong. Our kernels are exact. For such a case the test recomputes FBGEMM's saturating
//! sums and accepts a difference only where PyTorch's value equals that model's.

use qkernels::{
    bias_operands, gemm, requantize_scalar, Activation, BiasForm, Conv2dGeometry, GemmOutput, OutputQuant,
    PackedConv2d, PackedWeights, QImage, QMatrix,
};
use qtensor::{QParams, QTensor, QuantRange};
use serde::Deserialize;

const LINEAR: &str = include_str!("../golden/qlinear.json");
const CONV: &str = include_str!("../golden/qconv.json");

fn f(b: u32) -> f32 {
    f32::from_bits(b)
}

#[derive(Deserialize)]
struct File<C> {
    cases: Vec<C>,
}

#[derive(Deserialize)]
struct LinearCase {
    name: String,
    m: usize,
    k: usize,
    n: usize,
    x_scale: u32,
    x_zp: i32,
    x: Vec<u8>,
    w: Vec<i8>,
    w_scales: Vec<u32>,
    w_zps: Vec<i32>,
    bias: Option<Vec<u32>>,
    y_scale: u32,
    y_zp: i32,
    relu: bool,
    y: Vec<u8>,
}

#[derive(Deserialize)]
struct ConvCase {
    name: String,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    x_scale: u32,
    x_zp: i32,
    x: Vec<u8>,
    oc: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    weight: Vec<i8>,
    w_scales: Vec<u32>,
    w_zps: Vec<i32>,
    bias: Option<Vec<u32>>,
    y_scale: u32,
    y_zp: i32,
    relu: bool,
    oh: usize,
    ow: usize,
    y: Vec<u8>,
}

fn params(scales: &[u32], zps: &[i32]) -> QParams {
    if scales.len() == 1 {
        QParams::per_tensor(f(scales[0]), zps[0]).unwrap()
    } else {
        QParams::per_channel(scales.iter().map(|&s| f(s)).collect(), zps.to_vec(), 0).unwrap()
    }
}

fn quant(scale: u32, zp: i32, relu: bool) -> OutputQuant {
    OutputQuant { scale: f(scale), zero_point: zp, activation: if relu { Activation::Relu } else { Activation::None } }
}

/// FBGEMM's depthwise fast path with (`saturate`) or without its int16 saturation (see the
/// module docs), or `None` when the case does not take that path.
fn fbgemm_depthwise_model(c: &ConvCase, saturate: bool) -> Option<Vec<u8>> {
    let eligible = c.groups == c.c
        && (c.oc == c.c || c.oc == 2 * c.c)
        && c.c.is_multiple_of(8)
        && c.kh == c.kw
        && [3, 5, 7].contains(&c.kh)
        && c.stride[0] == c.stride[1]
        && [1, 2].contains(&c.stride[0])
        && c.dilation == [1, 1]
        && c.padding == [c.kh / 2, c.kw / 2];
    if !eligible {
        return None;
    }
    let per_channel = c.w_scales.len() > 1;
    let mult = c.oc / c.c;
    let t = c.kh * c.kw;
    let q = quant(c.y_scale, c.y_zp, c.relu);
    let (lo, hi) = q.bounds();
    let mut out = vec![0u8; c.n * c.oh * c.ow * c.oc];
    for b in 0..c.n {
        for oy in 0..c.oh {
            for ox in 0..c.ow {
                for o in 0..c.oc {
                    let ic = o / mult;
                    let pc = if per_channel { o } else { 0 };
                    let zw = c.w_zps[pc];
                    let xs: Vec<i32> = (0..t)
                        .map(|tap| {
                            let iy = (oy * c.stride[0] + tap / c.kw) as isize - c.padding[0] as isize;
                            let ix = (ox * c.stride[1] + tap % c.kw) as isize - c.padding[1] as isize;
                            if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize {
                                c.x_zp
                            } else {
                                c.x[((b * c.h + iy as usize) * c.w + ix as usize) * c.c + ic] as i32
                            }
                        })
                        .collect();
                    let ws: Vec<i32> = (0..t).map(|tap| c.weight[o * t + tap] as i32).collect();
                    let acc: i32 = (0..t)
                        .step_by(2)
                        .map(|p| {
                            let pair = xs[p] * ws[p] + if p + 1 < t { xs[p + 1] * ws[p + 1] } else { 0 };
                            if saturate {
                                pair.clamp(i16::MIN as i32, i16::MAX as i32)
                            } else {
                                pair
                            }
                        })
                        .sum();
                    let (sx, sw): (i32, i32) = (xs.iter().sum(), ws.iter().sum());
                    let raw = acc - c.x_zp * sw - zw * sx + t as i32 * c.x_zp * zw;
                    let ab = f(c.x_scale) * f(c.w_scales[pc]);
                    let form = if per_channel { BiasForm::PerChannel } else { BiasForm::PerTensorDepthwise };
                    let (bx, by) = bias_operands(c.bias.as_ref().map_or(0.0, |v| f(v[o])), ab, form);
                    out[((b * c.oh + oy) * c.ow + ox) * c.oc + o] =
                        requantize_scalar(raw, bx, by, ab / q.scale, q.zero_point, lo, hi) as u8;
                }
            }
        }
    }
    Some(out)
}

#[derive(Default, Debug)]
struct Tally {
    elements: usize,
    identical: usize,
    saturated_in_pytorch: usize,
    max_lsb: i32,
    differing: Vec<String>,
}

impl Tally {
    fn add(&mut self, name: &str, ours: &[u8], theirs: &[u8]) {
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let diff = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
        self.elements += ours.len();
        self.identical += ours.len() - diff;
        let worst = ours.iter().zip(theirs).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap_or(0);
        self.max_lsb = self.max_lsb.max(worst);
        if diff > 0 {
            self.differing.push(format!("{name}: {diff} of {} elements, up to {worst} LSB", ours.len()));
        }
    }
}

#[test]
#[cfg_attr(miri, ignore = "golden fixtures are large; the same kernels run under Miri in the property tests")]
fn linear_and_conv_match_pytorch_fbgemm() {
    let mut t = Tally::default();
    let linear: File<LinearCase> = serde_json::from_str(LINEAR).unwrap();
    for c in &linear.cases {
        let w = QTensor::from_int_repr(
            ndarray::Array2::from_shape_vec((c.n, c.k), c.w.clone()).unwrap(),
            params(&c.w_scales, &c.w_zps),
            QuantRange::full(qtensor::DType::I8),
        )
        .unwrap();
        let bias: Option<Vec<f32>> = c.bias.as_ref().map(|b| b.iter().map(|&v| f(v)).collect());
        for isa in crate::isas_under_test() {
            let packed = PackedWeights::with_isa(isa, &w).unwrap();
            let a = QMatrix { data: &c.x, m: c.m, k: c.k, lda: c.k, scale: f(c.x_scale), zero_point: c.x_zp };
            let mut out = vec![0u8; c.m * c.n];
            let q = quant(c.y_scale, c.y_zp, c.relu);
            gemm(&a, &packed, bias.as_deref(), GemmOutput::U8 { data: &mut out, ldc: c.n, quant: q }, 1).unwrap();
            t.add(&format!("linear {} [{isa}]", c.name), &out, &c.y);
        }
    }
    let conv: File<ConvCase> = serde_json::from_str(CONV).unwrap();
    for c in &conv.cases {
        let icg = c.c / c.groups;
        let w = QTensor::from_int_repr(
            ndarray::Array4::from_shape_vec((c.oc, c.kh, c.kw, icg), c.weight.clone()).unwrap(),
            params(&c.w_scales, &c.w_zps),
            QuantRange::full(qtensor::DType::I8),
        )
        .unwrap();
        let bias: Option<Vec<f32>> = c.bias.as_ref().map(|b| b.iter().map(|&v| f(v)).collect());
        let geom = Conv2dGeometry { stride: c.stride, padding: c.padding, dilation: c.dilation, groups: c.groups };
        for isa in crate::isas_under_test() {
            let packed = PackedConv2d::with_isa(isa, &w, bias.as_deref(), geom).unwrap();
            assert_eq!(packed.output_hw(c.h, c.w).unwrap(), (c.oh, c.ow), "{}", c.name);
            let img = QImage { data: &c.x, n: c.n, h: c.h, w: c.w, c: c.c, scale: f(c.x_scale), zero_point: c.x_zp };
            let mut out = vec![0u8; c.n * c.oh * c.ow * c.oc];
            packed.forward_u8(&img, quant(c.y_scale, c.y_zp, c.relu), &mut out, 1).unwrap();
            let mut theirs = c.y.clone();
            if let (Some(saturating), Some(exact)) = (fbgemm_depthwise_model(c, true), fbgemm_depthwise_model(c, false))
            {
                assert_eq!(saturating, c.y, "{}: PyTorch's output is not FBGEMM's saturating depthwise model", c.name);
                assert_eq!(out, exact, "{} [{isa}]: ours is not the exact depthwise result", c.name);
                t.saturated_in_pytorch += saturating.iter().zip(&exact).filter(|(a, b)| a != b).count();
                theirs = exact;
            }
            t.add(&format!("conv {} [{isa}]", c.name), &out, &theirs);
        }
    }
    eprintln!("{t:#?}");
    assert!(linear.cases.len() >= 30 && conv.cases.len() >= 30);
    assert_eq!(t.identical, t.elements, "{:#?}", t.differing);
}
