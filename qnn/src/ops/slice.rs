//! `Slice`: a range of one axis (`x[:, a:b:step]`, `torch.narrow`, ONNX `Slice` on one axis),
//! or one of `torch.chunk`'s pieces. `GraphBuilder::chunk` and `GraphBuilder::split` write
//! one node per piece. In int8 it keeps the input's parameters and moves bytes.

use ndarray::{ArrayD, Axis, Slice as NdSlice};
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::shape::run_shape_op;
use super::{attrs, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::{Mode, Run, Value};

/// Which part of the axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SliceRange {
    /// `start..end` by `step`, Python's rules: negative indices count from the end, and
    /// both ends are clamped to the axis.
    Range {
        /// First index.
        start: i64,
        /// One past the last (`i64::MAX`: to the end).
        end: i64,
        /// Step (at least 1).
        step: usize,
    },
    /// `len` indices from `start` (`torch.narrow`): past the end is an error.
    Narrow {
        /// First index.
        start: usize,
        /// How many.
        len: usize,
    },
    /// Piece `index` of `torch.chunk(x, chunks, dim)`: pieces of `ceil(len / chunks)`, the
    /// last one shorter.
    Chunk {
        /// Pieces.
        chunks: usize,
        /// This one.
        index: usize,
    },
}

/// A slice of axis `dim` (negative counts from the end; not the batch axis 0 unless you mean
/// it: slicing the batch mixes images, so such a model is never split between threads by
/// batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// The axis.
    pub dim: i64,
    /// The part.
    pub range: SliceRange,
}

impl Slice {
    /// `x.narrow(dim, start, len)`.
    pub fn narrow(dim: i64, start: usize, len: usize) -> Self {
        Slice { dim, range: SliceRange::Narrow { start, len } }
    }

    /// Whether it leaves the batch axis whole (axis 0, or -1 of a rank-1 value, never
    /// batched, are the only ones that can be it).
    fn keeps_batch(&self) -> bool {
        self.dim > 0 || self.dim == -1
    }

    fn out_dims(&self, input: &[usize]) -> Result<Vec<usize>> {
        let (axis, s, e, step) = self.bounds(input)?;
        let mut out = input.to_vec();
        out[axis] = (e - s).div_ceil(step);
        Ok(out)
    }

    fn err(&self, why: String, shape: &[usize]) -> NnError {
        NnError::Shape { module: String::new(), kind: "Slice", expected: why, got: shape.to_vec() }
    }

    fn axis(&self, shape: &[usize]) -> Result<usize> {
        let r = shape.len() as i64;
        let d = if self.dim < 0 { self.dim + r } else { self.dim };
        usize::try_from(d)
            .ok()
            .filter(|&d| d < shape.len())
            .ok_or_else(|| self.err(format!("an axis {}", self.dim), shape))
    }

    /// The axis and the start, end and step along it.
    fn bounds(&self, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let axis = self.axis(shape)?;
        let len = shape[axis];
        match self.range {
            SliceRange::Range { start, end, step } => {
                if step == 0 {
                    return Err(self.err("a step of at least 1".into(), shape));
                }
                let clamp = |i: i64| -> usize {
                    let i = if i < 0 { i.saturating_add(len as i64) } else { i };
                    i.clamp(0, len as i64) as usize
                };
                let (s, e) = (clamp(start), clamp(end));
                Ok((axis, s, e.max(s), step))
            }
            SliceRange::Narrow { start, len: n } => match start.checked_add(n) {
                Some(end) if end <= len => Ok((axis, start, end, 1)),
                _ => Err(self.err(format!("an axis {axis} of at least {start} + {n} indices (narrow)"), shape)),
            },
            SliceRange::Chunk { chunks, index } => {
                if chunks == 0 || index >= chunks {
                    return Err(self.err(format!("piece {index} of {chunks} chunks"), shape));
                }
                let size = len.div_ceil(chunks);
                let s = (index * size).min(len);
                let e = (s + size).min(len);
                if s == e {
                    return Err(self.err(
                        format!("an axis {axis} long enough for {chunks} chunks (torch.chunk would return fewer)"),
                        shape,
                    ));
                }
                Ok((axis, s, e, 1))
            }
        }
    }
}

impl Slice {
    /// [`Module::forward`], into a buffer of this thread's float pool.
    pub(crate) fn pooled(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let (axis, s, e, step) = self.bounds(x.shape())?;
        let picked: Vec<usize> = (s..e).step_by(step).collect();
        let mut out = x.shape().to_vec();
        out[axis] = picked.len();
        let mut data = crate::scratch::take_f32(out.iter().product());
        match x.as_slice() {
            // Row-major: whole runs of the inner axes at a time.
            Some(src) => pick_rows_into(src, x.shape(), axis, &picked, &mut data),
            None => {
                let v = x.slice_axis(Axis(axis), NdSlice::new(s as isize, Some(e as isize), step as isize));
                data.iter_mut().zip(v.iter()).for_each(|(d, &s)| *d = s)
            }
        }
        Ok(ArrayD::from_shape_vec(out, data).expect("the slice's length"))
    }
}

impl Module for Slice {
    fn kind(&self) -> &'static str {
        "Slice"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.pooled(x)
    }
    same_params_module!();
}

pub(crate) const OP: (&str, super::OpLoader) = ("Slice", |j, _, node| Ok(Box::new(parse::<Slice>(j, node, "Slice")?)));

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] =
    &[("Slice", |j, _| Ok(Box::new(parse::<Slice>(j, "Slice", "Slice")?)))];

impl QOp for Slice {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            // An image is stored NHWC: slice its stored axes in place (the logical axis
            // mapped to where it is stored), with no round trip through the logical order.
            Value::U8 { data, shape, q } if shape.len() == 4 => {
                let (axis, s, e, step) = self.bounds(&shape)?;
                let stored = [shape[0], shape[2], shape[3], shape[1]];
                let picked: Vec<usize> = (s..e).step_by(step).collect();
                let y = pick_rows(&data, &stored, [0, 3, 1, 2][axis], &picked);
                crate::scratch::give(data);
                let mut out = shape;
                out[axis] = picked.len();
                Ok(Value::U8 { data: y, shape: out, q })
            }
            x => run_shape_op(
                x,
                |a| self.forward(a),
                |data, shape| {
                    let (axis, s, e, step) = self.bounds(shape)?;
                    let picked: Vec<usize> = (s..e).step_by(step).collect();
                    let y = pick_rows(&data, shape, axis, &picked);
                    crate::scratch::give(data);
                    let mut out = shape.to_vec();
                    out[axis] = picked.len();
                    Ok((y, out))
                },
            ),
        }
    }
    serde_qop_tail!();
}

/// The indices `picked` of axis `axis` of row-major `data` of shape `shape`, into a pooled
/// buffer.
fn pick_rows(data: &[u8], shape: &[usize], axis: usize, picked: &[usize]) -> Vec<u8> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut y = crate::scratch::take(outer * picked.len() * inner);
    pick_rows_into(data, shape, axis, picked, &mut y);
    y
}

/// The indices `picked` of axis `axis` of row-major `data` of shape `shape`, into `y` (of
/// their length).
fn pick_rows_into<T: Copy>(data: &[T], shape: &[usize], axis: usize, picked: &[usize], y: &mut [T]) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let len = shape[axis];
    debug_assert_eq!(y.len(), outer * picked.len() * inner);
    // A run of consecutive indices is one block per outer index (channels of a pixel).
    let run = picked.first().filter(|&&f| picked.iter().enumerate().all(|(k, &i)| i == f + k));
    if let Some(&first) = run {
        let block = picked.len() * inner;
        for (b, dst) in y.chunks_exact_mut(block.max(1)).enumerate().take(outer) {
            let from = (b * len + first) * inner;
            dst.copy_from_slice(&data[from..from + block]);
        }
        return;
    }
    let mut o = 0;
    for b in 0..outer {
        for &i in picked {
            let from = (b * len + i) * inner;
            y[o..o + inner].copy_from_slice(&data[from..from + inner]);
            o += inner;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    /// The float slice (whole runs copied from a row-major input) against ndarray's own
    /// `slice_axis`, on every axis, with steps, ranges and pieces, and on a transposed
    /// (not row-major) input.
    #[test]
    fn float_slices_match_ndarray() {
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 5, 3, 4]), |i| (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32);
        let transposed = x.view().reversed_axes().into_owned();
        assert!(transposed.as_slice().is_none(), "the other path");
        for input in [&x, &transposed] {
            for dim in 0..4i64 {
                let len = input.shape()[dim as usize];
                for range in [
                    SliceRange::Range { start: 1, end: i64::MAX, step: 2 },
                    SliceRange::Range { start: -2, end: -1, step: 1 },
                    SliceRange::Range { start: 0, end: 1, step: 3 },
                    SliceRange::Narrow { start: 1, len: len - 1 },
                    SliceRange::Chunk { chunks: 2, index: 1 },
                ] {
                    let s = Slice { dim, range };
                    let (axis, a, b, step) = s.bounds(input.shape()).unwrap();
                    let want = input
                        .slice_axis(Axis(axis), NdSlice::new(a as isize, Some(b as isize), step as isize))
                        .to_owned();
                    assert_eq!(s.forward(input).unwrap(), want, "{s:?} of {:?}", input.shape());
                }
            }
        }
    }
}
