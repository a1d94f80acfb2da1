//! `nn.Softmax(dim)`. In int8 it reads codes and writes codes with the parameters its output
//! observer chose (`qkernels::softmax_u8`: exponentials from a 256-entry table per input
//! scale), which is the float softmax of the dequantized input, quantized, up to `f32`
//! rounding; skipping the node in the configuration keeps it in float.

use ndarray::ArrayD;
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::shape::{logical_vec, stored_vec};
use super::{attrs, op_err, parse, LowerCx, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::module::{FloatKernel, Module};
use crate::quant::{quantized, Mode, Run, Value};
use crate::scratch::{self, Input};

/// `nn.Softmax(dim)`: `exp(x - max) / sum(exp(x - max))` along `dim` (negative counts from
/// the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Softmax {
    /// The axis.
    pub dim: i64,
}

impl Softmax {
    /// The softmax of `x`, in place when it is row-major, shared between `threads` threads.
    fn in_place(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        let axis = self.axis(x.ndim()).ok_or_else(|| NnError::Shape {
            module: String::new(),
            kind: "Softmax",
            expected: format!("an input with an axis {}", self.dim),
            got: x.shape().to_vec(),
        })?;
        let mut y = if x.is_standard_layout() { x } else { x.as_standard_layout().into_owned() };
        let len = y.shape()[axis];
        let inner: usize = y.shape()[axis + 1..].iter().product();
        if y.is_empty() {
            return Ok(y);
        }
        // Row-major: lanes of `len` values `inner` apart (qkernels' vectorised f32 softmax).
        qkernels::softmax_in_place(y.as_slice_mut().expect("standard layout"), len, inner, threads);
        Ok(y)
    }

    /// Whether it runs over the last axis of a value of rank `rank`.
    pub(crate) fn over_last_axis(&self, rank: usize) -> bool {
        self.axis(rank) == Some(rank.wrapping_sub(1))
    }

    fn axis(&self, rank: usize) -> Option<usize> {
        let d = if self.dim < 0 { self.dim + rank as i64 } else { self.dim };
        usize::try_from(d).ok().filter(|&d| d < rank)
    }
}

/// The layer as its own float kernel (on any thread count).
#[derive(Debug)]
struct SoftmaxKernel(Softmax);

impl FloatKernel for SoftmaxKernel {
    fn forward(&self, x: &ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        self.0.in_place(x.as_standard_layout().into_owned(), threads)
    }
    fn forward_owned(&self, x: ArrayD<f32>, threads: usize) -> Result<ArrayD<f32>> {
        self.0.in_place(x, threads)
    }
}

impl Module for Softmax {
    fn kind(&self) -> &'static str {
        "Softmax"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.in_place(x.as_standard_layout().into_owned(), 1)
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.in_place(x, 1)
    }
    fn float_kernel(&self) -> Option<Result<std::sync::Arc<dyn FloatKernel>>> {
        Some(Ok(std::sync::Arc::new(SoftmaxKernel(*self))))
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(match self.axis(input.len()) {
            Some(_) => Ok(input.to_vec()),
            None => Err(NnError::Shape {
                module: String::new(),
                kind: "Softmax",
                expected: format!("an input with an axis {}", self.dim),
                got: input.to_vec(),
            }),
        })
    }
    fn lowering(&self) -> Mode {
        Mode::Int8
    }
    fn lower(&self, cx: &LowerCx<'_>) -> Result<Box<dyn QOp>> {
        Ok(Box::new(SoftmaxOp { dim: self.dim, out: cx.out_q().into() }))
    }
    fn computes_images_apart(&self) -> bool {
        // The batch axis is 0 (or -rank, which -1 never is for rank > 1).
        self.dim > 0 || self.dim == -1
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(self)))
    }
    any_methods!();
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] =
    &[("Softmax", |j, _| Ok(Box::new(parse::<Softmax>(j, "Softmax", "Softmax")?)))];

/// [`Softmax`] in a converted model: `u8` in, `u8` out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SoftmaxOp {
    dim: i64,
    out: SavedQ,
}

pub(crate) const OP: (&str, super::OpLoader) =
    ("Softmax", |j, _, node| Ok(Box::new(parse::<SoftmaxOp>(j, node, "Softmax")?)));

impl SoftmaxOp {
    /// Whether it runs over the last axis of a value of rank `rank`.
    pub(crate) fn over_last_axis(&self, rank: usize) -> bool {
        Softmax { dim: self.dim }.axis(rank) == Some(rank.wrapping_sub(1))
    }

    /// Its output parameters.
    pub(crate) fn out_q(&self) -> QuantU8 {
        self.out.0
    }

    /// The lanes of a value of logical shape `shape` as stored (4-D values NHWC):
    /// `(outer, len, inner)`.
    fn lanes(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        let axis = Softmax { dim: self.dim }.axis(shape.len()).ok_or_else(|| NnError::Shape {
            module: String::new(),
            kind: "Softmax",
            expected: format!("an input with an axis {}", self.dim),
            got: shape.to_vec(),
        })?;
        let (stored, axis) = match *shape {
            [n, c, h, w] => (vec![n, h, w, c], [0, 3, 1, 2][axis]),
            _ => (shape.to_vec(), axis),
        };
        Ok((stored[..axis].iter().product(), stored[axis], stored[axis + 1..].iter().product()))
    }
}

impl QOp for SoftmaxOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, in_q: QuantU8, _run: Run) -> Result<Value> {
        let (data, shape, q) = quantized(args.pop().expect("one input"), in_q)?;
        let (outer, len, inner) = self.lanes(&shape)?;
        if inner > 1 && shape.len() == 4 {
            // Lanes strided in the NHWC storage (attention's scores over the keys): the
            // kernel's contiguous path, in logical order, and back (a byte transpose each
            // way costs less than strided lanes).
            let logical = Softmax { dim: self.dim }.axis(4).expect("checked by lanes");
            let data = Input::new(logical_vec(data, &shape));
            let inner: usize = shape[logical + 1..].iter().product();
            let lanes = (data.len() / (len * inner).max(1), len, inner);
            let mut y = scratch::take(data.len());
            qkernels::softmax_u8(&data, q, lanes, self.out.0, &mut y).map_err(op_err)?;
            return Ok(Value::U8 { data: stored_vec(y, &shape), shape, q: self.out.0 });
        }
        let data = Input::new(data);
        let mut y = scratch::take(data.len());
        qkernels::softmax_u8(&data, q, (outer, len, inner), self.out.0, &mut y).map_err(op_err)?;
        Ok(Value::U8 { data: y, shape, q: self.out.0 })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.out.0)
    }
    fn images_apart(&self) -> bool {
        self.dim > 0 || self.dim == -1
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The int8 softmax against the float softmax of the dequantized codes, quantized the
    /// same way, along every axis of 4-D (stored NHWC) and 3-D values: codes at most 1 apart
    /// (f32 rounding of the exponentials' arguments and of the division), nearly all equal.
    #[test]
    fn int8_softmax_is_the_float_softmax_quantized() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let (q, qo) = (QuantU8 { scale: 0.07, zero_point: 121 }, QuantU8 { scale: 1.0 / 255.0, zero_point: 0 });
        let (mut total, mut equal) = (0usize, 0usize);
        for shape in [vec![2, 3, 5, 7], vec![3, 4, 9], vec![1, 12, 17, 17]] {
            for dim in 0..shape.len() as i64 {
                let n: usize = shape.iter().product();
                let codes = crate::ops::test_codes(&mut seed, n);
                let x = Value::U8 { data: codes, shape: shape.clone(), q };
                let float = Softmax { dim }.forward(&x.to_f32()).unwrap();
                let want = Value::quantize(float.view(), qo).unwrap();
                let op = SoftmaxOp { dim, out: qo.into() };
                let run = Run { threads: 1, max_activation_bytes: crate::quant::DEFAULT_MAX_ACTIVATION_BYTES };
                let got = op.run(&mut vec![x], q, run).unwrap();
                let (Value::U8 { data: a, shape: sa, .. }, Value::U8 { data: b, .. }) = (&got, &want) else {
                    unreachable!()
                };
                assert_eq!(sa, &shape);
                for (&a, &b) in a.iter().zip(b) {
                    assert!(a.abs_diff(b) <= 1, "shape {shape:?} dim {dim}: {a} vs {b}");
                }
                total += a.len();
                equal += a.iter().zip(b).filter(|(a, b)| a == b).count();
                let back = got.to_f32();
                assert_eq!(back.shape(), &shape[..]);
                assert!(back.iter().all(|v| (0.0..=1.0).contains(v)));
            }
        }
        assert!(equal * 100 >= total * 99, "{equal} of {total} codes equal");
    }
}
