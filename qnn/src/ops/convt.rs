//! `nn.ConvTranspose2d` (ONNX `ConvTranspose`): the float layer, and its int8 form for
//! upsampling layers (kernel equal to the stride: a 1x1 convolution, then each tap's output
//! moved to its pixel). Others run in float between automatic boundaries, and the plan says so.

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use super::conv::{load_f32, save_f32, ConvOp};
use super::{attrs, bad, nchw_of, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::layers::Conv2d;
use crate::layers::{nchw, shape_error, FusedAct};
use crate::module::Module;
use crate::quant::{out_buf, Run, Value};
use crate::{FloatReason, Mode};
use qkernels::QuantU8;
use serde_json::Value as J;

/// `nn.ConvTranspose2d`: each input pixel scatters its weights times itself into the output,
/// `stride` apart; `padding` (top, left, bottom, right) crops the result, `output_padding`
/// extends it at the bottom and right.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvTranspose2d {
    /// `[in_channels, out_channels / groups, kh, kw]` (PyTorch's and ONNX's layout).
    pub weight: ArrayD<f32>,
    /// `[out_channels]`, or none.
    pub bias: Option<ArrayD<f32>>,
    /// Vertical and horizontal.
    pub stride: [usize; 2],
    /// Cropped from the top, left, bottom and right.
    pub padding: [usize; 4],
    /// Added at the bottom and right (each below its stride or its dilation).
    pub output_padding: [usize; 2],
    /// Between kernel taps, vertical and horizontal.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
    /// Activation applied to the output (a ReLU after it, folded in by [`crate::fuse_graph`]).
    pub activation: FusedAct,
}

impl ConvTranspose2d {
    /// `in_channels -> out_channels` with a square `kernel`, stride 1, no padding, zero
    /// weights and bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        ConvTranspose2d {
            weight: ArrayD::zeros(IxDyn(&[in_channels, out_channels, kernel, kernel])),
            bias: Some(ArrayD::zeros(IxDyn(&[out_channels]))),
            stride: [1, 1],
            padding: [0; 4],
            output_padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            activation: FusedAct::None,
        }
    }

    /// The output's `[n, out_channels, oh, ow]` for an input of shape `input`, or why not.
    fn out_dims(&self, input: &[usize]) -> Result<[usize; 4]> {
        let err = |why: String| shape_error("ConvTranspose2d", why, input);
        let [n, c, h, w] = match *input {
            [n, c, h, w] => [n, c, h, w],
            _ => return Err(err("a 4-D NCHW input".into())),
        };
        let &[ic, ocg, kh, kw] = self.weight.shape() else {
            return Err(err(format!("a layer whose weight is 4-D, not {:?}", self.weight.shape())));
        };
        let g = self.groups;
        if g == 0 || ic % g != 0 || c != ic {
            return Err(err(format!("{ic} input channels (the weight's first dimension), in {g} groups")));
        }
        if let Some(b) = &self.bias {
            if b.len() != ocg * g {
                return Err(err(format!("a bias of {} values (one per output channel), not {}", ocg * g, b.len())));
            }
        }
        if self.stride.contains(&0) || self.dilation.contains(&0) || kh == 0 || kw == 0 || h == 0 || w == 0 {
            return Err(err("positive sizes, strides and dilations".into()));
        }
        let side = |i: usize, k: usize, axis: usize| -> Option<usize> {
            let (s, d, op) = (self.stride[axis], self.dilation[axis], self.output_padding[axis]);
            if op >= s.max(d) {
                return None;
            }
            let full = (i - 1) * s + d * (k - 1) + 1 + op;
            full.checked_sub(self.padding[axis] + self.padding[axis + 2]).filter(|&o| o > 0)
        };
        match (side(h, kh, 0), side(w, kw, 1)) {
            (Some(oh), Some(ow)) => Ok([n, ocg * g, oh, ow]),
            _ => Err(err(format!(
                "padding {:?} smaller than the output before it, output padding {:?} below the stride {:?} or \
                 dilation {:?}",
                self.padding, self.output_padding, self.stride, self.dilation
            ))),
        }
    }
}

/// Products held at once by [`ConvTranspose2d`]'s forward (taps x input pixels of a block of
/// input rows, f32): 256 KB, so a block's products stay in cache between the matrix product
/// and the scatter, whatever the image's size.
const COLUMN_BLOCK: usize = 1 << 16;

impl ConvTranspose2d {
    /// The side `k` of its kernel when each output pixel comes from exactly one tap of one
    /// input pixel: a `k x k` kernel at stride `k`, no padding, output padding, dilation or
    /// groups (an upsampling layer).
    fn pixel_block(&self) -> Option<usize> {
        let &[_, _, kh, kw] = self.weight.shape() else { return None };
        let plain = self.padding == [0; 4] && self.output_padding == [0, 0] && self.dilation == [1, 1];
        (kh == kw && kh > 0 && self.stride == [kh, kw] && plain && self.groups == 1).then_some(kh)
    }

    /// The 1x1 convolution computing every tap's output for each input pixel: output
    /// channel `(ky * k + kx) * out_channels + o` is tap `(ky, kx)` of output channel `o`
    /// (ONNX `DepthToSpace`'s DCR order), with `o`'s bias.
    fn as_pointwise(&self, k: usize) -> Conv2d {
        let &[ic, oc, _, _] = self.weight.shape() else { unreachable!("checked by pixel_block") };
        let w = self.weight.as_standard_layout();
        let wv = w.as_slice().expect("standard layout");
        let mut pw = vec![0.0f32; k * k * oc * ic];
        for ci in 0..ic {
            for o in 0..oc {
                for t in 0..k * k {
                    pw[(t * oc + o) * ic + ci] = wv[(ci * oc + o) * k * k + t];
                }
            }
        }
        let bias = self.bias.as_ref().map(|b| {
            let v: Vec<f32> = (0..k * k).flat_map(|_| b.iter().copied()).collect();
            ArrayD::from_shape_vec(IxDyn(&[k * k * oc]), v).expect("one per output channel")
        });
        Conv2d {
            weight: ArrayD::from_shape_vec(IxDyn(&[k * k * oc, ic, 1, 1]), pw).expect("sizes computed above"),
            bias,
            geom: qkernels::Conv2dGeometry::default(),
            activation: self.activation,
        }
    }

    /// The forward pass with blocks of input rows whose products hold about `block` values
    /// (at least one row).
    fn forward_in_blocks(&self, x: &ArrayD<f32>, block: usize) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("ConvTranspose2d", x, "[batch, channels, height, width]")?;
        let [_, oc, oh, ow] = self.out_dims(x.shape())?;
        let &[_, ocg, kh, kw] = self.weight.shape() else { unreachable!("checked by out_dims") };
        let (g, icg) = (self.groups, c / self.groups);
        let xs = x.as_standard_layout();
        let xv = xs.as_slice().expect("standard layout");
        let wv = self.weight.as_standard_layout();
        let wv = wv.as_slice().expect("standard layout");
        let mut out = vec![0.0f32; n * oc * oh * ow];
        if let Some(b) = &self.bias {
            for (plane, &bias) in out.chunks_mut(oh * ow).zip(b.iter().cycle()) {
                plane.fill(bias);
            }
        }
        let taps = ocg * kh * kw;
        let rows = (block / (taps * w).max(1)).clamp(1, h);
        let mut xin = vec![0.0f32; icg * rows * w];
        let mut cols = vec![0.0f32; taps * rows * w];
        let [sy, sx] = self.stride;
        let [dy, dx] = self.dilation;
        let (py, px) = (self.padding[0] as isize, self.padding[1] as isize);
        // The input columns whose output column `ix * sx + kx * dx - px` lies in 0..ow.
        let columns = |kx: usize| {
            let off = (kx * dx) as isize - px;
            let lo = if off < 0 { (-off) as usize } else { 0 }.div_ceil(sx);
            let hi = ((ow as isize - off).max(0) as usize).div_ceil(sx).min(w);
            (lo, hi.max(lo), off)
        };
        for gi in 0..g {
            // The group's weights as [ocg * kh * kw, icg]: each tap's row over the inputs.
            let mut a = vec![0.0f32; taps * icg];
            for i in 0..icg {
                let src = &wv[(gi * icg + i) * taps..(gi * icg + i + 1) * taps];
                for (t, &v) in src.iter().enumerate() {
                    a[t * icg + i] = v;
                }
            }
            for b in 0..n {
                for y0 in (0..h).step_by(rows) {
                    let r = rows.min(h - y0);
                    let px_in = r * w;
                    for i in 0..icg {
                        let plane = (b * c + gi * icg + i) * h * w;
                        xin[i * px_in..(i + 1) * px_in].copy_from_slice(&xv[plane + y0 * w..plane + (y0 + r) * w]);
                    }
                    qkernels::matmul_f32(&a, &xin[..icg * px_in], (taps, icg, px_in), &mut cols[..taps * px_in])
                        .map_err(|e| NnError::Op { module: String::new(), source: e })?;
                    for o in 0..ocg {
                        let plane = &mut out[((b * oc) + gi * ocg + o) * oh * ow..][..oh * ow];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let (lo, hi, off) = columns(kx);
                                let row = &cols[((o * kh + ky) * kw + kx) * px_in..][..px_in];
                                for iy in 0..r {
                                    let oy = ((y0 + iy) * sy + ky * dy) as isize - py;
                                    if oy < 0 || oy >= oh as isize {
                                        continue;
                                    }
                                    if lo == hi {
                                        continue;
                                    }
                                    // Output columns lo * sx + off, sx apart, from input columns lo..hi.
                                    let first = oy as usize * ow + ((lo * sx) as isize + off) as usize;
                                    let line = plane[first..].iter_mut().step_by(sx);
                                    for (o, &v) in line.zip(&row[iy * w + lo..iy * w + hi]) {
                                        *o += v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut y = ArrayD::from_shape_vec(IxDyn(&[n, oc, oh, ow]), out).expect("sizes computed above");
        self.activation.apply(&mut y);
        Ok(y)
    }
}

impl Module for ConvTranspose2d {
    fn kind(&self) -> &'static str {
        "ConvTranspose2d"
    }

    /// Per image and group, a block of input rows at a time: every input pixel's products
    /// with every weight tap in one matrix product (`[out_channels * kh * kw, in_channels] x
    /// [in_channels, rows * w]`), then each product added at its output pixel, then the
    /// fused activation.
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.forward_in_blocks(x, COLUMN_BLOCK)
    }

    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        let mut t = vec![("weight", &self.weight)];
        t.extend(self.bias.as_ref().map(|b| ("bias", b)));
        t
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        let mut t = vec![("weight", &mut self.weight)];
        t.extend(self.bias.as_mut().map(|b| ("bias", b)));
        t
    }

    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.out_dims(input).map(Vec::from))
    }

    fn lowering(&self) -> Mode {
        if self.pixel_block().is_some() {
            Mode::Int8
        } else {
            Mode::Float(FloatReason::FloatOp {
                why: "transposed convolutions run in int8 only with a square kernel equal to their stride, no \
                      padding, dilation or groups (each output pixel from one tap); this one runs in float"
                    .into(),
            })
        }
    }

    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        let Some(block) = self.pixel_block() else { unreachable!("lowered only where `lowering` says int8") };
        let pointwise = self.as_pointwise(block);
        let oc = pointwise.weight.shape()[0] / (block * block);
        Ok(Box::new(ConvTransposeOp { conv: pointwise.lower_conv(cx)?, block, oc }))
    }

    fn computes_images_apart(&self) -> bool {
        true
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<serde_json::Value>> {
        Some(Ok(attrs(&SavedConvTranspose {
            weight: save_f32(node, "weight", &self.weight, w),
            bias: self.bias.as_ref().map(|b| save_f32(node, "bias", b, w)),
            stride: self.stride,
            padding: self.padding,
            output_padding: self.output_padding,
            dilation: self.dilation,
            groups: self.groups,
            activation: self.activation,
        })))
    }

    any_methods!();
}

/// [`ConvTranspose2d`] in int8, for an upsampling layer (kernel equal to the stride): the 1x1
/// convolution of every tap's output (int8, requantized to the layer's output parameters),
/// then each input pixel's `k x k` taps moved to their output pixels, `out_channels` bytes at
/// a time. Each output element is one sum of the convolution, so the bytes are the int8
/// convolution's.
#[derive(Debug)]
pub struct ConvTransposeOp {
    conv: ConvOp,
    block: usize,
    oc: usize,
}

impl QOp for ConvTransposeOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }

    fn kernel(&self) -> Option<String> {
        Some(format!(
            "1x1 convolution then {0}x{0} pixel scatter: {1}",
            self.block,
            self.conv.kernel().unwrap_or_default()
        ))
    }

    fn macs(&self, out_shape: &[usize]) -> Option<u64> {
        // The 1x1 convolution's output holds as many elements as the layer's.
        self.conv.macs(out_shape)
    }

    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, run: Run) -> Result<Value> {
        let y = self.conv.run(args, in_q, run)?;
        let Value::U8 { data, shape, q } = y else { unreachable!("the int8 convolution writes codes") };
        let [n, taps, h, w] = nchw_of(&shape, "ConvTranspose2d")?;
        let (k, oc) = (self.block, self.oc);
        assert_eq!(taps, k * k * oc, "ConvTranspose2d: its 1x1 convolution's outputs (checked at loading)");
        let (oh, ow) = (h * k, w * k);
        let mut out = out_buf(&[n, oh, ow, oc], run, "ConvTranspose2d")?;
        // Input pixel (y, x)'s bytes hold tap (ky, kx)'s `oc` channels at (ky * k + kx) * oc.
        for (p, px) in data.chunks_exact(k * k * oc).enumerate() {
            let (b, y, x) = (p / (h * w), p / w % h, p % w);
            for ky in 0..k {
                let row = (b * oh + y * k + ky) * ow + x * k;
                out[row * oc..(row + k) * oc].copy_from_slice(&px[ky * k * oc..(ky + 1) * k * oc]);
            }
        }
        crate::scratch::give(data);
        Ok(Value::U8 { data: out, shape: vec![n, oc, oh, ow], q })
    }

    fn out_q(&self) -> Option<QuantU8> {
        self.conv.out_q()
    }

    fn quantizes_input(&self, k: usize, in_q: QuantU8) -> Option<QuantU8> {
        self.conv.quantizes_input(k, in_q)
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Result<J> {
        let mut j = self.conv.save(node, w)?;
        j["block"] = J::from(self.block);
        j["out_channels"] = J::from(self.oc);
        Ok(j)
    }

    any_methods!();
}

/// The int8 op's saved name and loader: the 1x1 convolution's attributes, with the block and
/// the channels.
pub(crate) const OP: (&str, super::OpLoader) = ("ConvTranspose2d", |j, r, node| {
    let size = |key: &str| {
        j[key].as_u64().map(|v| v as usize).filter(|&v| v > 0).ok_or_else(|| {
            bad(format!("{node}: the attributes of its ConvTranspose2d op need a positive '{key}', not {}", j[key]))
        })
    };
    let (block, oc) = (size("block")?, size("out_channels")?);
    let conv = super::conv::load_conv(j, r, node)?;
    let cout = conv.pointwise_outputs();
    if cout.is_none() || block.checked_mul(block).and_then(|b| b.checked_mul(oc)) != cout {
        return Err(bad(format!(
            "{node}: a ConvTranspose2d of {oc} channels in {block}x{block} blocks needs a 1x1 convolution of \
             {block}x{block}x{oc} outputs, not {cout:?}"
        )));
    }
    Ok(Box::new(ConvTransposeOp { conv, block, oc }))
});

/// Its saved form (a float layer of a converted model).
#[derive(Serialize, Deserialize)]
struct SavedConvTranspose {
    weight: String,
    bias: Option<String>,
    stride: [usize; 2],
    padding: [usize; 4],
    output_padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    /// None when the file leaves it out.
    #[serde(default)]
    activation: FusedAct,
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("ConvTranspose2d", |j, r| {
    let a: SavedConvTranspose = parse(j, "ConvTranspose2d", "ConvTranspose2d")?;
    let weight = load_f32(r, &a.weight)?;
    if weight.ndim() != 4 {
        return Err(bad(format!("{}: a ConvTranspose2d weight is 4-D, not {:?}", a.weight, weight.shape())));
    }
    Ok(Box::new(ConvTranspose2d {
        weight,
        bias: a.bias.as_deref().map(|k| load_f32(r, k)).transpose()?,
        stride: a.stride,
        padding: a.padding,
        output_padding: a.output_padding,
        dilation: a.dilation,
        groups: a.groups,
        activation: a.activation,
    }))
})];

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition, one product at a time: strides, asymmetric padding, output
    /// padding, dilation and groups, at batch 2.
    #[test]
    fn scatters_as_defined() {
        let cases = [
            ([2, 2], [0, 0, 0, 0], [0, 0], [1, 1], 1),
            ([2, 1], [1, 0, 0, 1], [1, 0], [1, 1], 1),
            ([3, 2], [1, 1, 1, 1], [0, 1], [2, 1], 2),
            ([1, 1], [0, 1, 2, 0], [0, 0], [1, 2], 2),
        ];
        for (stride, padding, output_padding, dilation, groups) in cases {
            let (c, ocg, kh, kw, h, w) = (4, 3, 3, 2, 5, 4);
            let weight = ArrayD::from_shape_fn(IxDyn(&[c, ocg, kh, kw]), |i| {
                ((i[0] * 7 + i[1] * 5 + i[2] * 3 + i[3]) % 11) as f32 * 0.1 - 0.5
            });
            let bias = ArrayD::from_shape_fn(IxDyn(&[ocg * groups]), |i| i[0] as f32 * 0.25);
            let activation = FusedAct::None;
            let m = ConvTranspose2d {
                weight,
                bias: Some(bias),
                stride,
                padding,
                output_padding,
                dilation,
                groups,
                activation,
            };
            let x = ArrayD::from_shape_fn(IxDyn(&[2, c, h, w]), |i| {
                ((i[0] + i[1] * 3 + i[2] * 5 + i[3] * 7) % 13) as f32 - 6.0
            });
            let [_, oc, oh, ow] = m.out_dims(x.shape()).unwrap();
            let mut want = ArrayD::from_shape_fn(IxDyn(&[2, oc, oh, ow]), |i| i[1] as f32 * 0.25);
            let icg = c / groups;
            for b in 0..2 {
                for ci in 0..c {
                    let gi = ci / icg;
                    for o in 0..ocg {
                        for (iy, ky, ix, kx) in itertools(h, kh, w, kw) {
                            let oy = (iy * stride[0] + ky * dilation[0]) as isize - padding[0] as isize;
                            let ox = (ix * stride[1] + kx * dilation[1]) as isize - padding[1] as isize;
                            if (0..oh as isize).contains(&oy) && (0..ow as isize).contains(&ox) {
                                want[[b, gi * ocg + o, oy as usize, ox as usize]] +=
                                    x[[b, ci, iy, ix]] * m.weight[[ci, o, ky, kx]];
                            }
                        }
                    }
                }
            }
            // One input row per block, two (the last one short), all of them.
            for block in [1, 2 * ocg * kh * kw * w, COLUMN_BLOCK] {
                let y = m.forward_in_blocks(&x, block).unwrap();
                assert_eq!(y.shape(), &[2, oc, oh, ow]);
                let err = y.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-4, "stride {stride:?}, padding {padding:?}, block {block}: off by {err}");
            }
            // A fused ReLU clamps the same output.
            let relu = ConvTranspose2d { activation: FusedAct::Relu, ..m.clone() };
            let y = relu.forward(&x).unwrap();
            assert!(y.iter().zip(want.iter()).all(|(a, b)| (a - b.max(0.0)).abs() < 1e-4));
        }
        // Output padding at or above the stride is an error naming the shapes.
        let mut m = ConvTranspose2d::new(2, 2, 2);
        m.output_padding = [1, 0];
        let e = m.forward(&ArrayD::zeros(IxDyn(&[1, 2, 3, 3]))).unwrap_err().to_string();
        assert!(e.contains("ConvTranspose2d") && e.contains("[1, 2, 3, 3]") && e.contains("output padding"), "{e}");
    }

    fn itertools(h: usize, kh: usize, w: usize, kw: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..h).flat_map(move |iy| {
            (0..kh).flat_map(move |ky| (0..w).flat_map(move |ix| (0..kw).map(move |kx| (iy, ky, ix, kx))))
        })
    }
}
