//! Elementwise ops, activations, pooling and layout against PyTorch's quantized ops (x86
//! engine, one thread), on fixtures PyTorch wrote (`scripts/golden/qops_golden.py`).
//!
//! Every element must be identical, with two documented exceptions, each checked rather than
//! skipped:
//! - quantize: values whose scaled magnitude overflows i32 (±inf, huge): PyTorch's vector
//!   path wraps around (+inf becomes 0 for zero point >= 128), we saturate; and NaN, which
//!   PyTorch quantizes to an arbitrary value and we reject;
//! - elu on a tensor with one channel or one pixel: PyTorch's output memory format then sends
//!   the first `n - n % 64` elements through its vector loop (fma dequantize, `x > 0`), where
//!   we always take its scalar loop (its choice for every real activation, C > 1 and H*W > 1);
//!   at most one step apart.

use qkernels::{
    adaptive_avg_pool2d, add, add_scalar, avg_pool2d, batch_norm2d, cat_channels, dequantize_nhwc_to_nchw, layer_norm,
    max_pool2d, mul, mul_scalar, quantize_nchw_to_nhwc, upsample_nearest, vector_prefix, Pool2d, QImage, QuantU8,
    UnaryOp,
};
use serde::Deserialize;
use serde_json::Value;

const FIXTURE: &str = include_str!("../golden/qops.json");

#[derive(Deserialize)]
struct File {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    op: String,
    params: Value,
    inputs: Vec<Tensor>,
    output: Tensor,
}

#[derive(Deserialize)]
struct Tensor {
    shape_nhwc: Option<[usize; 4]>,
    shape_nchw: Option<[usize; 4]>,
    scale: Option<u32>,
    zero_point: Option<i32>,
    scale_f64_bits: Option<u64>,
    data: Option<Vec<u8>>,
    data_f32_nchw: Option<Vec<u32>>,
    data_f32_nhwc: Option<Vec<u32>>,
}

fn f(b: u32) -> f32 {
    f32::from_bits(b)
}

impl Tensor {
    fn q(&self) -> QuantU8 {
        QuantU8 { scale: f(self.scale.expect("scale")), zero_point: self.zero_point.expect("zero point") }
    }
    fn image(&self) -> QImage<'_> {
        let [n, h, w, c] = self.shape_nhwc.expect("NHWC shape");
        let q = self.q();
        QImage { data: self.data.as_deref().expect("data"), n, h, w, c, scale: q.scale, zero_point: q.zero_point }
    }
    fn out_buf(&self) -> Vec<u8> {
        vec![0u8; self.data.as_ref().expect("output data").len()]
    }
}

fn f32_param(p: &Value, key: &str) -> f32 {
    f(p[key].as_u64().unwrap_or_else(|| panic!("param {key}")) as u32)
}

fn f32_list(p: &Value, key: &str) -> Vec<f32> {
    p[key].as_array().unwrap_or_else(|| panic!("param {key}")).iter().map(|v| f(v.as_u64().unwrap() as u32)).collect()
}

fn usize2(p: &Value, key: &str) -> [usize; 2] {
    let a = p[key].as_array().unwrap_or_else(|| panic!("param {key}"));
    [a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize]
}

#[derive(Default, Debug)]
struct Tally {
    elements: usize,
    identical: usize,
    explained: usize,
    skipped: Vec<String>,
    per_op: std::collections::BTreeMap<String, usize>,
}

#[test]
#[cfg_attr(miri, ignore = "golden fixtures are large; the same kernels run under Miri in the property tests")]
fn ops_match_pytorch() {
    let file: File = serde_json::from_str(FIXTURE).unwrap();
    let mut t = Tally::default();
    for c in &file.cases {
        let p = &c.params;
        let want = c.output.data.as_deref();
        let mut out = if want.is_some() { c.output.out_buf() } else { Vec::new() };
        let unary = |op: UnaryOp, out: &mut Vec<u8>| {
            let a = &c.inputs[0];
            op.tables(a.q(), c.output.q()).apply(a.data.as_ref().unwrap(), out).unwrap();
        };
        match c.op.as_str() {
            "add" | "add_relu" => {
                let (a, b) = (&c.inputs[0], &c.inputs[1]);
                add(
                    a.data.as_ref().unwrap(),
                    a.q(),
                    b.data.as_ref().unwrap(),
                    b.q(),
                    &mut out,
                    c.output.q(),
                    c.op == "add_relu",
                )
                .unwrap();
            }
            "mul" => {
                let (a, b) = (&c.inputs[0], &c.inputs[1]);
                mul(a.data.as_ref().unwrap(), a.q(), b.data.as_ref().unwrap(), b.q(), &mut out, c.output.q()).unwrap();
            }
            "add_scalar" | "mul_scalar" => {
                let a = &c.inputs[0];
                let op = if c.op == "add_scalar" { add_scalar } else { mul_scalar };
                let q = op(a.data.as_ref().unwrap(), a.q(), f32_param(p, "scalar"), &mut out).unwrap();
                let torch_scale = f64::from_bits(c.output.scale_f64_bits.unwrap()) as f32;
                assert_eq!(
                    (q.scale.to_bits(), q.zero_point),
                    (torch_scale.to_bits(), c.output.zero_point.unwrap()),
                    "{}",
                    c.name
                );
            }
            "cat" => {
                let images: Vec<QImage<'_>> = c.inputs.iter().map(Tensor::image).collect();
                cat_channels(&images, &mut out, c.output.q()).unwrap();
            }
            "relu" => unary(UnaryOp::Relu, &mut out),
            "relu6" => unary(UnaryOp::Relu6, &mut out),
            "hardswish" => unary(UnaryOp::Hardswish, &mut out),
            "hardsigmoid" => unary(UnaryOp::Hardsigmoid, &mut out),
            "sigmoid" => unary(UnaryOp::Sigmoid, &mut out),
            "tanh" => unary(UnaryOp::Tanh, &mut out),
            "leaky_relu" => unary(UnaryOp::LeakyRelu(f32_param(p, "negative_slope")), &mut out),
            "gelu" if p["approximate"] == "tanh" => unary(UnaryOp::GeluTanh, &mut out),
            "gelu" => unary(UnaryOp::Gelu, &mut out),
            "elu" => unary(UnaryOp::Elu(f32_param(p, "alpha")), &mut out),
            "max_pool2d" | "avg_pool2d" => {
                let pool = Pool2d {
                    kernel: usize2(p, "kernel"),
                    stride: usize2(p, "stride"),
                    padding: usize2(p, "padding"),
                    dilation: if c.op == "max_pool2d" { usize2(p, "dilation") } else { [1, 1] },
                    ceil_mode: p["ceil_mode"].as_bool().unwrap(),
                    count_include_pad: p["count_include_pad"].as_bool().unwrap_or(true),
                    divisor_override: p["divisor_override"].as_u64().map(|d| d as usize),
                };
                let img = c.inputs[0].image();
                if c.op == "max_pool2d" {
                    max_pool2d(&img, &pool, &mut out).unwrap();
                } else {
                    avg_pool2d(&img, &pool, c.output.q(), &mut out).unwrap();
                }
            }
            "adaptive_avg_pool2d" => {
                let [oh, ow] = usize2(p, "output_size");
                adaptive_avg_pool2d(&c.inputs[0].image(), (oh, ow), c.output.q(), &mut out).unwrap();
            }
            "upsample_nearest2d" => {
                let [_, oh, ow, _] = c.output.shape_nhwc.unwrap();
                let sf = p.get("scale_factor").and_then(Value::as_u64).map(|b| [f(b as u32); 2]);
                upsample_nearest(&c.inputs[0].image(), (oh, ow), sf, &mut out).unwrap();
            }
            "quantize_nchw_to_nhwc" => {
                let a = &c.inputs[0];
                let x: Vec<f32> = a.data_f32_nchw.as_ref().unwrap().iter().map(|&b| f(b)).collect();
                let [n, ch, h, w] = a.shape_nchw.unwrap();
                let q = c.output.q();
                if x.iter().any(|v| v.is_nan()) {
                    assert!(
                        quantize_nchw_to_nhwc(&x, (n, ch, h, w), q, &mut out).is_err(),
                        "{}: NaN must be rejected",
                        c.name
                    );
                    // Check the finite elements by quantizing them alone.
                    let finite: Vec<f32> = x.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
                    quantize_nchw_to_nhwc(&finite, (n, ch, h, w), q, &mut out).unwrap();
                } else {
                    quantize_nchw_to_nhwc(&x, (n, ch, h, w), q, &mut out).unwrap();
                }
                let theirs = want.unwrap();
                for (i, (o, tw)) in out.iter_mut().zip(theirs).enumerate() {
                    // NHWC index i -> NCHW source value.
                    let (b, rem) = (i / (h * w * ch), i % (h * w * ch));
                    let (pix, chn) = (rem / ch, rem % ch);
                    let v = x[(b * ch + chn) * h * w + pix];
                    let inv = 1.0 / q.scale;
                    let overflow = !v.is_finite() || (v * inv).abs() >= 2_147_483_520.0;
                    if *o != *tw && overflow {
                        // PyTorch: min(x * inv, 2147483520) -> i32 -> + zp with wrap-around.
                        let tv = if v.is_nan() { 2_147_483_520.0 } else { (v * inv).min(2_147_483_520.0) };
                        let r = if tv >= -2_147_483_648.0 { tv.round_ties_even() as i32 } else { i32::MIN };
                        assert_eq!(r.wrapping_add(q.zero_point).clamp(0, 255) as u8, *tw, "{} element {i}", c.name);
                        *o = *tw;
                        t.explained += 1;
                    }
                }
            }
            "dequantize" => {
                let a = &c.inputs[0];
                let [n, h, w, ch] = a.shape_nhwc.unwrap();
                let mut y = vec![0.0f32; n * h * w * ch];
                dequantize_nhwc_to_nchw(a.data.as_ref().unwrap(), (n, h, w, ch), a.q(), &mut y).unwrap();
                // The fixture is NHWC; ours is NCHW.
                let theirs: Vec<u32> = c.output.data_f32_nhwc.clone().unwrap();
                for (i, tb) in theirs.iter().enumerate() {
                    let (b, rem) = (i / (h * w * ch), i % (h * w * ch));
                    let (pix, chn) = (rem / ch, rem % ch);
                    assert_eq!(y[(b * ch + chn) * h * w + pix].to_bits(), *tb, "{} element {i}", c.name);
                }
                t.elements += theirs.len();
                t.identical += theirs.len();
                *t.per_op.entry(c.op.clone()).or_default() += 1;
                continue;
            }
            "batch_norm2d" => {
                batch_norm2d(
                    &c.inputs[0].image(),
                    &f32_list(p, "weight"),
                    &f32_list(p, "bias"),
                    &f32_list(p, "mean"),
                    &f32_list(p, "var"),
                    f32_param(p, "eps"),
                    c.output.q(),
                    &mut out,
                )
                .unwrap();
            }
            "layer_norm" => {
                layer_norm(
                    &c.inputs[0].image(),
                    &f32_list(p, "weight"),
                    &f32_list(p, "bias"),
                    f32_param(p, "eps"),
                    c.output.q(),
                    &mut out,
                )
                .unwrap();
            }
            other => {
                t.skipped.push(format!("{} ({other})", c.name));
                continue;
            }
        }
        let theirs = want.expect("output data");
        if c.op == "elu" {
            let [_, h, w, ch] = c.inputs[0].shape_nhwc.unwrap();
            if ch == 1 || h * w == 1 {
                let split = vector_prefix(theirs.len());
                for (i, (o, w)) in out.iter_mut().zip(theirs).enumerate() {
                    if o != w {
                        assert!(i < split && (*o as i32 - *w as i32).abs() <= 1, "{} element {i}: {o} vs {w}", c.name);
                        *o = *w;
                        t.explained += 1;
                    }
                }
            }
        }
        let same = out.iter().zip(theirs).filter(|(a, b)| a == b).count();
        assert_eq!(same, theirs.len(), "{}: {} of {} elements differ", c.name, theirs.len() - same, theirs.len());
        t.elements += theirs.len();
        t.identical += same;
        *t.per_op.entry(c.op.clone()).or_default() += 1;
    }
    eprintln!("{t:#?}");
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    assert!(t.elements > 150_000, "{t:?}");
}
