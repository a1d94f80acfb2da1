//! `F.pad` / `nn.ZeroPad2d` / `nn.ConstantPad2d` / `nn.ReflectionPad2d` /
//! `nn.ReplicationPad2d` on the last two axes of `[n, c, h, w]` (ONNX `Pad` on those axes).
//! In int8 it keeps the input's parameters (PyTorch's quantized pads do): a constant is the
//! quantized value of the constant.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, image_op, nchw_of, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::layers::{from_nhwc, nchw, to_nhwc};
use crate::module::Module;
use crate::quant::{Mode, Run, Value};

/// What fills the border.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PadMode {
    /// A constant.
    Constant(f32),
    /// The input mirrored, its edge not repeated (`"reflect"`).
    Reflect,
    /// The edge repeated (`"replicate"`).
    Replicate,
}

/// Padding of `[left, right, top, bottom]` pixels (PyTorch's order for `F.pad` on 2-D).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pad2d {
    /// Left, right, top, bottom.
    pub pads: [usize; 4],
    /// The fill.
    pub mode: PadMode,
}

impl Pad2d {
    fn keeps_batch(&self) -> bool {
        true
    }

    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        let [n, c, h, w] = nchw_of(input, "Pad2d")?;
        let (oh, ow) = self.out_hw(h, w, input)?;
        Ok(vec![n, c, oh, ow])
    }

    /// `nn.ZeroPad2d(p)`.
    pub fn zeros(p: usize) -> Self {
        Pad2d { pads: [p; 4], mode: PadMode::Constant(0.0) }
    }

    fn out_hw(&self, h: usize, w: usize, shape: &[usize]) -> Result<(usize, usize)> {
        let [l, r, t, b] = self.pads;
        if matches!(self.mode, PadMode::Reflect) && (l >= w || r >= w || t >= h || b >= h) {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Pad2d",
                expected: format!("reflect padding {:?} smaller than the input's height and width", self.pads),
                got: shape.to_vec(),
            });
        }
        if matches!(self.mode, PadMode::Replicate) && (h == 0 || w == 0) {
            return Err(NnError::Shape {
                module: String::new(),
                kind: "Pad2d",
                expected: "a non-empty input to replicate".into(),
                got: shape.to_vec(),
            });
        }
        let add = |a: usize, b: usize, c: usize| a.checked_add(b).and_then(|s| s.checked_add(c));
        match (add(h, t, b), add(w, l, r)) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(NnError::Shape {
                module: String::new(),
                kind: "Pad2d",
                expected: format!("padding {:?} that fits in memory", self.pads),
                got: shape.to_vec(),
            }),
        }
    }

    /// The source index of padded position `o` along an axis of `len` with `before` padding
    /// (`None`: the constant).
    fn source(&self, o: usize, before: usize, len: usize) -> Option<usize> {
        let i = o as isize - before as isize;
        let n = len as isize;
        match self.mode {
            _ if (0..n).contains(&i) => Some(i as usize),
            PadMode::Constant(_) => None,
            PadMode::Replicate => Some(i.clamp(0, n - 1) as usize),
            PadMode::Reflect => Some(if i < 0 { (-i) as usize } else { (2 * (n - 1) - i) as usize }),
        }
    }

    /// Pads NHWC data, `fill` standing for the constant.
    fn pad<T: Copy>(&self, src: &[T], [n, h, w, c]: [usize; 4], (oh, ow): (usize, usize), fill: T, out: &mut [T]) {
        let [l, _, t, _] = self.pads;
        for b in 0..n {
            for y in 0..oh {
                let sy = self.source(y, t, h);
                for x in 0..ow {
                    let d = ((b * oh + y) * ow + x) * c;
                    match (sy, self.source(x, l, w)) {
                        (Some(sy), Some(sx)) => {
                            let s = ((b * h + sy) * w + sx) * c;
                            out[d..d + c].copy_from_slice(&src[s..s + c]);
                        }
                        _ => out[d..d + c].fill(fill),
                    }
                }
            }
        }
    }

    fn constant(&self) -> f32 {
        match self.mode {
            PadMode::Constant(v) => v,
            _ => 0.0,
        }
    }
}

impl Module for Pad2d {
    fn kind(&self) -> &'static str {
        "Pad2d"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [n, c, h, w] = nchw("Pad2d", x, "[batch, channels, height, width]")?;
        let (oh, ow) = self.out_hw(h, w, x.shape())?;
        let mut out = vec![0.0f32; n * oh * ow * c];
        self.pad(&to_nhwc(x), [n, h, w, c], (oh, ow), self.constant(), &mut out);
        Ok(from_nhwc(out, [n, oh, ow, c]))
    }
    same_params_module!();
}

pub(crate) const OP: (&str, super::OpLoader) = ("Pad2d", |j, _, node| Ok(Box::new(parse::<Pad2d>(j, node, "Pad2d")?)));

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] =
    &[("Pad2d", |j, _| Ok(Box::new(parse::<Pad2d>(j, "Pad2d", "Pad2d")?)))];

impl QOp for Pad2d {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        image_op(args.pop().expect("one input"), self, run, |x, hw, y| {
            let fill = qtensor::kernels::quantize_scalar(self.constant(), 1.0 / x.scale, x.zero_point, 0, 255) as u8;
            self.pad(x.data, [x.n, x.h, x.w, x.c], hw, fill, y);
            Ok(())
        })
    }
    serde_qop_tail!();
}
