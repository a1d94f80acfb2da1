//! The product of two values (PyTorch's `FloatFunctional().mul`, ONNX `Mul`): of one shape,
//! or one of them `[n, c, 1, 1]` scaling every pixel of the other's channel
//! (squeeze-and-excitation). In int8, `qkernels::mul` / `mul_channels`, bit for bit
//! PyTorch's quantized mul.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, op_err, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::quant::{quantized, Run, Value};
use crate::scratch::{self, Input};

/// Whether `small` is `[n, c, 1, 1]` against `big`'s `[n, c, h, w]`.
pub(crate) fn gate(big: &[usize], small: &[usize]) -> bool {
    big.len() == 4 && small.len() == 4 && big[..2] == small[..2] && small[2] == 1 && small[3] == 1
}

/// The shape of `a` and `b` broadcast together as NumPy does (aligned at the last axis; each
/// pair of sizes equal, or one of them 1, or missing), or `None` when they do not broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = (i + a.len()).checked_sub(rank).map_or(1, |k| a[k]);
            let db = (i + b.len()).checked_sub(rank).map_or(1, |k| b[k]);
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// `f` of two values of any shapes that broadcast ([`broadcast_shape`]), on their float
/// values: what the int8 forms compute when neither operand is the other's shape or a
/// per-channel gate of it (an attention mask `[n, 1, 1, s]` added to scores
/// `[n, heads, s, s]`), quantized to `out_q`.
pub(crate) fn broadcast_u8(a: Value, b: Value, out_q: QuantU8, f: impl Fn(f32, f32) -> f32) -> Result<Value> {
    let (a, b) = (a.into_f32(), b.into_f32());
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| shape_err(a.shape(), b.shape(), ""))?;
    let (a, b) = (
        a.broadcast(shape.as_slice()).expect("broadcast shape"),
        b.broadcast(shape.as_slice()).expect("broadcast shape"),
    );
    let y = ndarray::Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y));
    Value::quantize(y.view(), out_q).map_err(op_err)
}

/// Whether `a` and `b` multiply: the same shape, or one of them a per-channel gate of the
/// other.
pub(crate) fn mul_shapes_fit(a: &[usize], b: &[usize]) -> bool {
    a == b || gate(a, b) || gate(b, a)
}

fn shape_err(a: &[usize], b: &[usize], name: &str) -> NnError {
    NnError::Shape {
        module: name.to_string(),
        kind: "mul",
        expected: format!(
            "a second operand whose shape broadcasts against the first's {a:?} (equal sizes, or 1, aligned at \
             the last axis)"
        ),
        got: b.to_vec(),
    }
}

/// `a * b`, of one shape or of shapes that broadcast.
pub(crate) fn mul_f32(a: &ArrayD<f32>, b: &ArrayD<f32>, name: &str) -> Result<ArrayD<f32>> {
    if broadcast_shape(a.shape(), b.shape()).is_none() {
        return Err(shape_err(a.shape(), b.shape(), name));
    }
    if a.shape() == b.shape() {
        return Ok(crate::layers::zip_same_layout(a, b, |x, y| x * y));
    }
    if let Some(y) = crate::layers::per_channel_nhwc(a, b, |x, g| x * g) {
        return Ok(y);
    }
    Ok(a * b)
}

/// The product in the converted model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MulOp {
    qs: [SavedQ; 2],
    out_q: SavedQ,
    int8: bool,
}

impl MulOp {
    pub(crate) fn new(qs: [QuantU8; 2], out_q: QuantU8, int8: bool) -> Self {
        MulOp { qs: [qs[0].into(), qs[1].into()], out_q: out_q.into(), int8 }
    }
    fn params(&self) -> [QuantU8; 3] {
        [self.qs[0].0, self.qs[1].0, self.out_q.0]
    }
}

pub(crate) const OP: (&str, super::OpLoader) = ("Mul", |j, _, node| Ok(Box::new(parse::<MulOp>(j, node, "Mul")?)));

impl QOp for MulOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        let b = args.pop().expect("two inputs");
        let a = args.pop().expect("two inputs");
        if !self.int8 {
            return Ok(Value::F32(mul_f32(&a.into_f32(), &b.into_f32(), "")?));
        }
        let [qa, qb, out_q] = self.params();
        if !mul_shapes_fit(a.shape(), b.shape()) {
            return broadcast_u8(a, b, out_q, |x, y| x * y);
        }
        let (ad, ashape, aq) = quantized(a, qa)?;
        let (bd, bshape, bq) = quantized(b, qb)?;
        let (ad, bd) = (Input::new(ad), Input::new(bd));
        // The full-size operand first; a gate [n, c, 1, 1] second.
        let (big, bigq, bigshape, small, smallq) = if ashape == bshape || gate(&ashape, &bshape) {
            (&ad, aq, &ashape, &bd, bq)
        } else if gate(&bshape, &ashape) {
            (&bd, bq, &bshape, &ad, aq)
        } else {
            return Err(shape_err(&ashape, &bshape, ""));
        };
        let mut y = scratch::take(big.len());
        if ashape == bshape {
            qkernels::mul(big, bigq, small, smallq, &mut y, out_q).map_err(op_err)?;
        } else {
            let [n, c, h, w] = bigshape[..] else { unreachable!("checked: 4-D") };
            qkernels::mul_channels(big, bigq, (n, h * w, c), small, smallq, &mut y, out_q).map_err(op_err)?;
        }
        Ok(Value::U8 { data: y, shape: bigshape.clone(), q: out_q })
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
