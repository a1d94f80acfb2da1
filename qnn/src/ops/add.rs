//! The sum of two values of one shape, one of them `[n, c, 1, 1]` added to every pixel of
//! the other's channel, or any shapes that broadcast as NumPy's do (an attention mask)
//! (PyTorch's `FloatFunctional().add`, ONNX `Add`): in float, and in int8 (`qkernels::add`,
//! each input with its parameters, the sum requantized to the observed ones; other
//! broadcasts repeat the smaller operand's codes first; a ReLU after it is applied in the
//! same pass when the conversion fuses it).

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, op_err, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::quant::{quantized, Run, Value};
use crate::scratch::{self, Input};

/// `a + b`, of one shape or of shapes that broadcast.
pub(crate) fn add_f32(a: &ArrayD<f32>, b: &ArrayD<f32>, name: &str) -> Result<ArrayD<f32>> {
    if super::mul::broadcast_shape(a.shape(), b.shape()).is_none() {
        return Err(NnError::Shape {
            module: name.to_string(),
            kind: "add",
            expected: format!(
                "a shape that broadcasts against the other operand's {:?} (equal sizes, or 1, aligned at the last \
                 axis; add a downsample branch when one branch changes the shape)",
                b.shape()
            ),
            got: a.shape().to_vec(),
        });
    }
    if a.shape() == b.shape() {
        return Ok(crate::layers::zip_same_layout(a, b, |x, y| x + y));
    }
    if let Some(y) = crate::layers::per_channel_nhwc(a, b, |x, g| x + g) {
        return Ok(y);
    }
    Ok(a + b)
}

/// [`add_f32`] writing into `a`'s buffer when both operands lie alike in memory.
pub(crate) fn add_f32_into(mut a: ArrayD<f32>, b: &ArrayD<f32>, name: &str) -> Result<ArrayD<f32>> {
    if a.shape() == b.shape() && a.strides() == b.strides() {
        if let (Some(sa), Some(sb)) = (a.as_slice_memory_order_mut(), b.as_slice_memory_order()) {
            for (x, &y) in sa.iter_mut().zip(sb) {
                *x += y;
            }
            return Ok(a);
        }
    }
    add_f32(&a, b, name)
}

/// The `[n, c]` bytes of an `[n, c, 1, 1]` value repeated over every pixel of `to`
/// (`[n, c, h, w]`, NHWC), in a pooled buffer.
fn spread(small: Vec<u8>, to: &[usize]) -> Vec<u8> {
    let [n, c, h, w] = to[..] else { unreachable!("checked: a 4-D shape") };
    let mut out = scratch::take(n * h * w * c);
    for (image, gate) in out.chunks_exact_mut(h * w * c).zip(small.chunks_exact(c)) {
        for pixel in image.chunks_exact_mut(c) {
            pixel.copy_from_slice(gate);
        }
    }
    scratch::give(small);
    out
}

/// The addition in the converted model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AddOp {
    /// The parameters each input is quantized with if it arrives in float.
    pub(crate) qs: [SavedQ; 2],
    pub(crate) out_q: SavedQ,
    /// A ReLU applied to the sum: `Q(max(c, 0)) = max(Q(c), zp)`.
    pub(crate) relu: bool,
    /// In int8 (else in float).
    pub(crate) int8: bool,
}

impl AddOp {
    pub(crate) fn new(qs: [QuantU8; 2], out_q: QuantU8, int8: bool) -> Self {
        AddOp { qs: [qs[0].into(), qs[1].into()], out_q: out_q.into(), relu: false, int8 }
    }
    pub(crate) fn params(&self) -> [QuantU8; 3] {
        [self.qs[0].0, self.qs[1].0, self.out_q.0]
    }
}

pub(crate) const OP: (&str, super::OpLoader) = ("Add", |j, _, node| Ok(Box::new(parse::<AddOp>(j, node, "Add")?)));

impl QOp for AddOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        let s = args.pop().expect("two inputs");
        let b = args.pop().expect("two inputs");
        if !self.int8 {
            // Into the first operand's buffer when both lie alike; the buffers it does not
            // keep go back to the float pool.
            let (b, s) = (b.into_f32(), s.into_f32());
            let mut y = if b.shape() == s.shape() && b.strides() == s.strides() {
                add_f32_into(b, &s, "")?
            } else {
                let y = add_f32(&b, &s, "")?;
                scratch::recycle_f32(b);
                y
            };
            scratch::recycle_f32(s);
            if self.relu {
                y.mapv_inplace(|v| v.max(0.0));
            }
            return Ok(Value::F32(y));
        }
        let [body_q, short_q, add_q] = self.params();
        if !super::mul::mul_shapes_fit(b.shape(), s.shape()) {
            let relu = self.relu;
            let add = |x: &[u8], qx, y: &[u8], qy, o: &mut [u8]| qkernels::add(x, qx, y, qy, o, add_q, relu);
            return super::mul::broadcast_u8("add", (b, body_q), (s, short_q), add_q, add, run);
        }
        let (bd, bs, bq) = quantized(b, body_q)?;
        let (sd, ss, sq) = quantized(s, short_q)?;
        // A per-channel operand is spread over the other's pixels (NHWC: its bytes repeated
        // per pixel), then added as any two values of one shape.
        let (bd, bs, sd) = if bs.iter().product::<usize>() < ss.iter().product() {
            (spread(bd, &ss), ss, sd)
        } else if bs != ss {
            (bd, bs.clone(), spread(sd, &bs))
        } else {
            (bd, bs, sd)
        };
        let (bd, sd) = (Input::new(bd), Input::new(sd));
        let mut y = scratch::take(bd.len());
        qkernels::add(&bd, bq, &sd, sq, &mut y, add_q, self.relu).map_err(op_err)?;
        Ok(Value::U8 { data: y, shape: bs, q: add_q })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.params()[2])
    }
    fn quantizes_input(&self, k: usize, _in_q: QuantU8) -> Option<QuantU8> {
        self.int8.then(|| self.params()[k])
    }
    fn takes_inputs(&self, n: usize) -> bool {
        n == 2
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    /// Shapes that broadcast beyond a per-channel gate (a mask `[1, 1, 1, d]` over scores
    /// `[2, 3, 2, d]`) add in int8 as the same-shape addition of the mask repeated to the
    /// scores' shape does (`qkernels::add`, PyTorch's quantized add), a fused ReLU included.
    #[test]
    fn broadcast_sums_are_the_same_shape_sum_of_repeated_codes() {
        let (qa, qb, qo) = (
            QuantU8 { scale: 0.05, zero_point: 120 },
            QuantU8 { scale: 0.2, zero_point: 250 },
            QuantU8 { scale: 0.1, zero_point: 200 },
        );
        let shape = [2, 3, 2, 5];
        let a = ArrayD::from_shape_fn(IxDyn(&shape), |i| {
            ((i[0] * 31 + i[1] * 7 + i[2] * 3 + i[3]) % 23) as f32 * 0.2 - 2.0
        });
        let b = ArrayD::from_shape_fn(IxDyn(&[1, 1, 1, 5]), |i| if i[3] % 2 == 0 { -30.0 } else { 0.5 });
        let b_full = ArrayD::from_shape_fn(IxDyn(&shape), |i| b[[0, 0, 0, i[3]]]);
        let run = Run { threads: 1, max_activation_bytes: crate::quant::DEFAULT_MAX_ACTIVATION_BYTES };
        for relu in [false, true] {
            let op = AddOp { relu, ..AddOp::new([qa, qb], qo, true) };
            let mut args = vec![Value::quantize(a.view(), qa).unwrap(), Value::quantize(b.view(), qb).unwrap()];
            let got = op.run(&mut args, qa, run).unwrap();
            assert_eq!(got.shape(), &shape);
            let mut args = vec![Value::quantize(a.view(), qa).unwrap(), Value::quantize(b_full.view(), qb).unwrap()];
            let want = op.run(&mut args, qa, run).unwrap();
            assert_eq!(got.into_f32(), want.into_f32(), "relu {relu}");
        }
    }
}
