//! The product of two values (PyTorch's `FloatFunctional().mul`, ONNX `Mul`): of one shape,
//! one of them `[n, c, 1, 1]` scaling every pixel of the other's channel
//! (squeeze-and-excitation), or any shapes that broadcast as NumPy's do. In int8,
//! `qkernels::mul` / `mul_channels`, bit for bit PyTorch's quantized mul (other broadcasts
//! repeat the smaller operand's codes first).

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

/// `codes` (logical row-major, of shape `from`) repeated to `to`, which `from` broadcasts to
/// (aligned at the last axis): row by row along the last axis, each row copied or, where the
/// last axis broadcasts, filled.
pub(crate) fn expand_codes(codes: &[u8], from: &[usize], to: &[usize]) -> Vec<u8> {
    let rank = to.len();
    if rank == 0 {
        return codes.to_vec();
    }
    // `from`'s sizes aligned to `to`'s rank, and its row-major strides (0 where broadcast).
    let dims: Vec<usize> = (0..rank).map(|i| (i + from.len()).checked_sub(rank).map_or(1, |k| from[k])).collect();
    let mut strides = vec![0usize; rank];
    let mut acc = 1;
    for i in (0..rank).rev() {
        strides[i] = if dims[i] == 1 { 0 } else { acc };
        acc *= dims[i];
    }
    let last = to.last().copied().unwrap_or(1);
    let rows = to.iter().product::<usize>() / last.max(1);
    let mut out = scratch::take(rows * last);
    for (r, dst) in out.chunks_exact_mut(last.max(1)).enumerate() {
        // The source offset of row r: its index along every axis but the last.
        let (mut rem, mut off) = (r, 0);
        for i in (0..rank.saturating_sub(1)).rev() {
            off += (rem % to[i]) * strides[i];
            rem /= to[i];
        }
        if dims[rank - 1] == 1 {
            dst.fill(codes[off]);
        } else {
            dst.copy_from_slice(&codes[off..off + last]);
        }
    }
    out
}

/// Two `u8` values whose shapes broadcast beyond a per-channel gate (an attention mask
/// `[n, 1, 1, s]` added to scores `[n, heads, s, s]`): each operand's codes repeated to the
/// broadcast shape, then `kernel` on operands of one shape (`qkernels::add`, `mul`), as the
/// same-shape int8 forms compute.
pub(crate) fn broadcast_u8(
    kind: &'static str,
    (a, qa): (Value, QuantU8),
    (b, qb): (Value, QuantU8),
    out_q: QuantU8,
    kernel: impl Fn(&[u8], QuantU8, &[u8], QuantU8, &mut [u8]) -> qtensor::Result<()>,
    run: Run,
) -> Result<Value> {
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| shape_err(kind, a.shape(), b.shape(), ""))?;
    crate::quant::budget(&shape, 1, run, "broadcast")?;
    let (ad, ashape, aq) = quantized(a, qa)?;
    let (bd, bshape, bq) = quantized(b, qb)?;
    let expand = |d: Vec<u8>, s: &[usize]| {
        let logical = super::shape::logical_vec(d, s);
        let e = expand_codes(&logical, s, &shape);
        scratch::give(logical);
        Input::new(e)
    };
    let (ae, be) = (expand(ad, &ashape), expand(bd, &bshape));
    let mut y = scratch::take(ae.len());
    kernel(&ae, aq, &be, bq, &mut y).map_err(op_err)?;
    Ok(Value::U8 { data: super::shape::stored_vec(y, &shape), shape, q: out_q })
}

/// Whether `a` and `b` multiply: the same shape, or one of them a per-channel gate of the
/// other.
pub(crate) fn mul_shapes_fit(a: &[usize], b: &[usize]) -> bool {
    a == b || gate(a, b) || gate(b, a)
}

fn shape_err(kind: &'static str, a: &[usize], b: &[usize], name: &str) -> NnError {
    NnError::Shape {
        module: name.to_string(),
        kind,
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
        return Err(shape_err("mul", a.shape(), b.shape(), name));
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
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        let b = args.pop().expect("two inputs");
        let a = args.pop().expect("two inputs");
        if !self.int8 {
            return Ok(Value::F32(mul_f32(&a.into_f32(), &b.into_f32(), "")?));
        }
        let [qa, qb, out_q] = self.params();
        if !mul_shapes_fit(a.shape(), b.shape()) {
            let mul = |x: &[u8], qx, y: &[u8], qy, o: &mut [u8]| qkernels::mul(x, qx, y, qy, o, out_q);
            return broadcast_u8("mul", (a, qa), (b, qb), out_q, mul, run);
        }
        let (ad, ashape, aq) = quantized(a, qa)?;
        let (bd, bshape, bq) = quantized(b, qb)?;
        let (ad, bd) = (Input::new(ad), Input::new(bd));
        // The full-size operand first; a gate [n, c, 1, 1] second.
        let (big, bigq, bigshape, small, smallq) = if ashape == bshape || gate(&ashape, &bshape) {
            (&ad, aq, &ashape, &bd, bq)
        } else {
            // Checked above: shapes that are neither equal nor a gate broadcast instead.
            (&bd, bq, &bshape, &ad, aq)
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

#[cfg(test)]
mod broadcast_tests {
    use super::*;
    use ndarray::IxDyn;

    /// Repeated codes equal NumPy's broadcast of the same values, for axes broadcast in front,
    /// in the middle and last, and ranks that differ.
    #[test]
    fn expanded_codes_follow_numpy_broadcasting() {
        for (from, to) in [
            (vec![2, 1, 3], vec![2, 4, 3]),
            (vec![3, 1], vec![2, 3, 4]),
            (vec![1, 1, 1, 5], vec![2, 3, 2, 5]),
            (vec![4], vec![3, 4]),
        ] {
            let n: usize = from.iter().product();
            let codes: Vec<u8> = (0..n).map(|k| (k * 37 % 251) as u8).collect();
            let a = ArrayD::from_shape_vec(IxDyn(&from), codes.clone()).unwrap();
            let want: Vec<u8> = a.broadcast(to.as_slice()).unwrap().iter().copied().collect();
            assert_eq!(broadcast_shape(&from, &to), Some(to.clone()));
            assert_eq!(expand_codes(&codes, &from, &to), want, "{from:?} -> {to:?}");
        }
        assert_eq!(broadcast_shape(&[2, 3], &[3, 2]), None);
        assert_eq!(broadcast_shape(&[1, 3], &[5, 1, 1]), Some(vec![5, 1, 3]));
    }
}
