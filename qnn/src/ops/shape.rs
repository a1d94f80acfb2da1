//! Shape ops: `Flatten`, `Reshape`, `Permute` (ONNX's `Transpose`) and `ChannelShuffle`.
//! They move values without computing any, so in int8 they keep their input's parameters;
//! each layer is its own int8 op. A 4-D `u8` value is stored NHWC (the kernels' layout) and
//! every other rank row-major: these ops read and write the logical (NCHW) order.

use ndarray::{ArrayD, IxDyn};
use qkernels::QuantU8;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, parse, LowerCx, OpWriter, QOp};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::{budget, Mode, Run, Value};
use crate::scratch::{self, Input};

fn shape_err(kind: &'static str, expected: String, got: &[usize]) -> NnError {
    NnError::Shape { module: String::new(), kind, expected, got: got.to_vec() }
}

/// `shape` and `perm` without the axes of size 1, and with the runs of input axes that stay
/// together (output axes `i`, `i + 1` reading input axes `p`, `p + 1`) merged: the same
/// movement of bytes, in the fewest axes.
fn simplify(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    // Input axes kept, and their new indices.
    let kept: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] > 1).collect();
    let index_of = |a: usize| kept.iter().position(|&k| k == a);
    let mut perm: Vec<usize> = perm.iter().filter_map(|&a| index_of(a)).collect();
    let mut dims: Vec<usize> = kept.iter().map(|&a| shape[a]).collect();
    loop {
        let Some(i) = (0..perm.len().saturating_sub(1)).find(|&i| perm[i + 1] == perm[i] + 1) else {
            return (dims, perm);
        };
        // Input axes p and p + 1 become one; every later input axis moves down by one.
        let p = perm[i];
        dims[p] *= dims[p + 1];
        dims.remove(p + 1);
        perm.remove(i + 1);
        for a in perm.iter_mut().filter(|a| **a > p) {
            *a -= 1;
        }
    }
}

/// Whether permuting `shape` by `perm` leaves every byte where it is.
pub(super) fn is_noop(shape: &[usize], perm: &[usize]) -> bool {
    simplify(shape, perm).1.len() <= 1
}

/// `src` (`rows x cols` bytes, row-major) transposed into `dst` (`cols x rows`):
/// `qkernels::transpose_u8`, on buffers sized here.
pub(super) fn transpose_bytes(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    let n = rows * cols;
    qkernels::transpose_u8(&src[..n], rows, cols, &mut dst[..n]).expect("buffers of rows x cols bytes");
}

/// `src` (row-major `shape`) with its axes permuted by `perm` (output axis `i` is input axis
/// `perm[i]`), into a pooled buffer. Axes of size 1 are dropped and axes that move together
/// merged first, so a permutation that moves nothing is one copy and a (batched) transpose
/// of two axes runs in tiles.
pub(super) fn permute_bytes(src: &[u8], shape: &[usize], perm: &[usize]) -> Vec<u8> {
    let mut out = scratch::take(src.len());
    if src.is_empty() {
        return out;
    }
    let (shape, perm) = simplify(shape, perm);
    match perm[..] {
        [] | [0] => out.copy_from_slice(src),
        [1, 0] => transpose_bytes(src, shape[0], shape[1], &mut out),
        [0, 2, 1] => {
            let len = shape[1] * shape[2];
            for (s, d) in src.chunks_exact(len).zip(out.chunks_exact_mut(len)) {
                transpose_bytes(s, shape[1], shape[2], d);
            }
        }
        _ => permute_general(src, &shape, &perm, &mut out),
    }
    out
}

/// [`permute_bytes`] for any permutation: an odometer over the output's axes, the innermost
/// a strided copy.
fn permute_general(src: &[u8], shape: &[usize], perm: &[usize], out: &mut [u8]) {
    let rank = shape.len();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let out_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let inner = rank - 1;
    let (len, step) = (out_shape[inner], out_strides[inner]);
    let mut idx = vec![0usize; rank];
    let mut base = 0usize;
    let mut o = 0usize;
    loop {
        if step == 1 {
            out[o..o + len].copy_from_slice(&src[base..base + len]);
        } else {
            for (k, dst) in out[o..o + len].iter_mut().enumerate() {
                *dst = src[base + k * step];
            }
        }
        o += len;
        let mut axis = inner;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            idx[axis] += 1;
            base += out_strides[axis];
            if idx[axis] < out_shape[axis] {
                break;
            }
            base -= out_strides[axis] * idx[axis];
            idx[axis] = 0;
        }
    }
}

/// `src` (row-major `shape`) permuted by `perm` into `out` (as long), for any element type
/// (the float path of [`Permute`]): axes simplified as for bytes; when the input's innermost axis
/// stays innermost, runs of it are copied whole; otherwise every pair of (input's innermost,
/// output's innermost) axes is a 2-D transpose done in square tiles, so that reads and
/// writes both stay within a few cache lines at a time.
pub(crate) fn permute_elems<T: Copy>(src: &[T], shape: &[usize], perm: &[usize], out: &mut [T]) {
    assert_eq!(src.len(), out.len(), "permute_elems: the output holds as many values as the input");
    if src.is_empty() {
        return;
    }
    let (dims, perm) = simplify(shape, perm);
    let rank = dims.len();
    if rank <= 1 {
        out.copy_from_slice(src);
        return;
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let mut out_strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        out_strides[i] = out_strides[i + 1] * out_dims[i + 1];
    }
    // Output position of the input's innermost axis; `rank - 1` keeps whole runs.
    let p = perm.iter().position(|&a| a == rank - 1).expect("a permutation");
    let run = dims[rank - 1];
    // The 2-D plane moved at each step: the input's innermost axis (output position `p`)
    // against the output's innermost (input axis `perm[rank - 1]`); a run when they coincide.
    let (rows, row_in, row_out) =
        if p == rank - 1 { (1, 0, 0) } else { (out_dims[rank - 1], in_strides[perm[rank - 1]], 1) };
    let col_out = out_strides[p];
    // The other output positions, outermost first: an odometer over them.
    let outer: Vec<usize> = (0..rank).filter(|&j| j != p && j != rank - 1).collect();
    let mut idx = vec![0usize; outer.len()];
    let (mut base_in, mut base_out) = (0usize, 0usize);
    const TILE: usize = 16;
    loop {
        if p == rank - 1 {
            out[base_out..base_out + run].copy_from_slice(&src[base_in..base_in + run]);
        } else {
            // out[base_out + c * col_out + r] = src[base_in + r * row_in + c], in tiles.
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..run).step_by(TILE) {
                    for c in c0..(c0 + TILE).min(run) {
                        let o = base_out + c * col_out;
                        for r in r0..(r0 + TILE).min(rows) {
                            out[o + r * row_out] = src[base_in + r * row_in + c];
                        }
                    }
                }
            }
        }
        // Next combination of the outer positions.
        let mut k = outer.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            let j = outer[k];
            idx[k] += 1;
            base_in += in_strides[perm[j]];
            base_out += out_strides[j];
            if idx[k] < out_dims[j] {
                break;
            }
            base_in -= in_strides[perm[j]] * idx[k];
            base_out -= out_strides[j] * idx[k];
            idx[k] = 0;
        }
    }
}

/// `data` (row-major `shape`) permuted by `perm`: itself when nothing moves, else a pooled
/// buffer (and `data` goes back to the pool).
pub(super) fn permuted(data: Vec<u8>, shape: &[usize], perm: &[usize]) -> Vec<u8> {
    if is_noop(shape, perm) {
        return data;
    }
    let out = permute_bytes(&data, shape, perm);
    scratch::give(data);
    out
}

/// A `u8` value's data in logical row-major order (4-D values are stored NHWC).
pub(super) fn logical(data: Input, shape: &[usize]) -> Vec<u8> {
    logical_vec(data.into_inner(), shape)
}

/// [`logical`] of a buffer.
pub(super) fn logical_vec(data: Vec<u8>, shape: &[usize]) -> Vec<u8> {
    match *shape {
        [n, c, h, w] => permuted(data, &[n, h, w, c], &[0, 3, 1, 2]),
        _ => data,
    }
}

/// Logical row-major bytes in their stored order (NHWC when 4-D; the inverse of
/// [`logical_vec`]).
pub(super) fn stored_vec(data: Vec<u8>, shape: &[usize]) -> Vec<u8> {
    match shape {
        [_, _, _, _] => permuted(data, shape, &[0, 2, 3, 1]),
        _ => data,
    }
}

/// A `u8` value from logical row-major data (stored NHWC when 4-D).
pub(super) fn stored(data: Vec<u8>, shape: Vec<usize>, q: QuantU8) -> Value {
    Value::U8 { data: stored_vec(data, &shape), shape, q }
}

/// Runs a layout op: float through `float`, `u8` on its logical order through `int8` (which
/// returns the output data and shape).
pub(super) fn run_shape_op(
    x: Value,
    float: impl FnOnce(&ArrayD<f32>) -> Result<ArrayD<f32>>,
    int8: impl FnOnce(Vec<u8>, &[usize]) -> Result<(Vec<u8>, Vec<usize>)>,
) -> Result<Value> {
    match x {
        Value::F32(a) => Ok(Value::F32(float(&a)?)),
        Value::U8 { data, shape, q } => {
            let (y, out_shape) = int8(logical(Input::new(data), &shape), &shape)?;
            Ok(stored(y, out_shape, q))
        }
    }
}

/// `nn.Flatten()`: `[n, ...] -> [n, product of the rest]` (PyTorch's order).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Flatten;

impl Flatten {
    fn keeps_batch(&self) -> bool {
        true
    }
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        Flatten::out_shape(s)
    }
    fn out_shape(shape: &[usize]) -> Result<Vec<usize>> {
        let n = *shape.first().ok_or_else(|| shape_err("Flatten", "at least one dimension".into(), shape))?;
        Ok(vec![n, shape[1..].iter().product()])
    }
}

/// `x` in row-major order as shape `s` (of as many elements): row-major data is reshaped
/// where it lies, other layouts are copied once.
fn reshaped(x: ArrayD<f32>, s: &[usize]) -> ArrayD<f32> {
    let x = if x.is_standard_layout() { x } else { x.as_standard_layout().into_owned() };
    x.into_shape_with_order(IxDyn(s)).expect("same length")
}

impl Module for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let s = Flatten::out_shape(x.shape())?;
        Ok(x.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&s)).expect("same length"))
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let s = Flatten::out_shape(x.shape())?;
        Ok(reshaped(x, &s))
    }
    same_params_module!();
}

pub(crate) const FLATTEN: (&str, super::OpLoader) = ("Flatten", |_, _, _| Ok(Box::new(Flatten)));

impl QOp for Flatten {
    fn op_name(&self) -> &'static str {
        FLATTEN.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        run_shape_op(args.pop().expect("one input"), |a| self.forward(a), |d, s| Ok((d, Flatten::out_shape(s)?)))
    }
    serde_qop_tail!();
}

/// `torch.reshape` / ONNX `Reshape`: the same values in a new shape. One entry may be `-1`
/// (inferred from the others); `0` copies the input's size at that position (ONNX's rule;
/// PyTorch has no `0` entries in practice). With `keep_batch` the first dimension is the
/// input's whatever the batch size (`x.reshape(x.shape[0], ...)`): then `shape` gives the
/// rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reshape {
    /// The target shape.
    pub shape: Vec<i64>,
    /// The first dimension is the input's, `shape` the rest.
    pub keep_batch: bool,
}

impl Reshape {
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        self.out_shape(s)
    }

    /// `x.reshape(x.shape[0], rest...)`: the batch kept, the rest as given (`-1` inferred).
    pub fn batch_and(rest: &[i64]) -> Self {
        Reshape { shape: rest.to_vec(), keep_batch: true }
    }

    fn keeps_batch(&self) -> bool {
        self.keep_batch
    }

    /// The output shape for input shape `s`.
    fn out_shape(&self, s: &[usize]) -> Result<Vec<usize>> {
        let err = |why: &str| {
            shape_err(
                "Reshape",
                format!(
                    "an input that reshapes to {:?}{}: {why}",
                    self.shape,
                    if self.keep_batch { " after the batch" } else { "" }
                ),
                s,
            )
        };
        let (lead, rest_in) = if self.keep_batch {
            let n = *s.first().ok_or_else(|| err("a batch dimension is needed"))?;
            (vec![n], &s[1..])
        } else {
            (Vec::new(), s)
        };
        let total: usize = rest_in.iter().product();
        let mut out = Vec::with_capacity(self.shape.len());
        let mut infer = None;
        for (i, &d) in self.shape.iter().enumerate() {
            out.push(match d {
                -1 if infer.is_none() => {
                    infer = Some(i);
                    1
                }
                -1 => return Err(err("at most one -1")),
                0 => *rest_in.get(i).ok_or_else(|| err("a 0 entry copies an input dimension that does not exist"))?,
                d if d > 0 => usize::try_from(d).map_err(|_| err("an entry too large"))?,
                _ => return Err(err("entries are sizes, -1 or 0")),
            });
        }
        let known = out.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err("sizes overflow"))?;
        match infer {
            Some(i) if known > 0 && total.is_multiple_of(known) => out[i] = total / known,
            Some(_) => return Err(err(&format!("{total} values cannot fill the other sizes"))),
            None if known == total => {}
            None => return Err(err(&format!("{total} values, not {known}"))),
        }
        Ok(lead.into_iter().chain(out).collect())
    }
}

impl Module for Reshape {
    fn kind(&self) -> &'static str {
        "Reshape"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let s = self.out_shape(x.shape())?;
        Ok(x.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&s)).expect("same length"))
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let s = self.out_shape(x.shape())?;
        Ok(reshaped(x, &s))
    }
    same_params_module!();
}

pub(crate) const RESHAPE: (&str, super::OpLoader) =
    ("Reshape", |j, _, node| Ok(Box::new(parse::<Reshape>(j, node, "Reshape")?)));

impl QOp for Reshape {
    fn op_name(&self) -> &'static str {
        RESHAPE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        run_shape_op(args.pop().expect("one input"), |a| self.forward(a), |d, s| Ok((d, self.out_shape(s)?)))
    }
    serde_qop_tail!();
}

/// `torch.permute` / ONNX `Transpose`: output axis `i` is input axis `dims[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permute {
    /// The permutation.
    pub dims: Vec<usize>,
}

impl Permute {
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        self.check(s)
    }
    fn keeps_batch(&self) -> bool {
        self.dims.first() == Some(&0)
    }
    fn check(&self, s: &[usize]) -> Result<Vec<usize>> {
        let mut seen = vec![false; s.len()];
        let ok = self.dims.len() == s.len()
            && self.dims.iter().all(|&d| d < s.len() && !std::mem::replace(&mut seen[d], true));
        if !ok {
            return Err(shape_err(
                "Permute",
                format!("an input of rank {} ({:?} must be a permutation of its axes)", self.dims.len(), self.dims),
                s,
            ));
        }
        Ok(self.dims.iter().map(|&d| s[d]).collect())
    }
}

impl Module for Permute {
    fn kind(&self) -> &'static str {
        "Permute"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let out = self.check(x.shape())?;
        if let Some(src) = x.as_slice() {
            let mut y = scratch::take_f32(src.len());
            permute_elems(src, x.shape(), &self.dims, &mut y);
            return Ok(ArrayD::from_shape_vec(IxDyn(&out), y).expect("the permuted shape's length"));
        }
        Ok(x.view().permuted_axes(IxDyn(&self.dims)).as_standard_layout().into_owned())
    }
    fn forward_owned(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>> {
        let out = self.check(x.shape())?;
        if x.is_standard_layout() && is_noop(x.shape(), &self.dims) {
            // Only axes of size 1 move: the values stay where they are.
            return Ok(x.into_shape_with_order(IxDyn(&out)).expect("the permuted shape's length"));
        }
        let y = self.forward(&x)?;
        scratch::recycle_f32(x);
        Ok(y)
    }
    same_params_module!();
}

pub(crate) const PERMUTE: (&str, super::OpLoader) =
    ("Permute", |j, _, node| Ok(Box::new(parse::<Permute>(j, node, "Permute")?)));

impl QOp for Permute {
    fn op_name(&self) -> &'static str {
        PERMUTE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            // 4-D to 4-D: both stored NHWC, so one pass with the permutation composed from
            // stored input axes to stored output axes (not three through the logical order).
            Value::U8 { data, shape, q } if shape.len() == 4 => {
                let out = self.check(&shape)?;
                // Where logical axis `a` of a 4-D value is stored, and the reverse.
                const STORED_AT: [usize; 4] = [0, 3, 1, 2];
                const LOGICAL_OF: [usize; 4] = [0, 2, 3, 1];
                let stored_in = [shape[0], shape[2], shape[3], shape[1]];
                let perm: Vec<usize> = LOGICAL_OF.iter().map(|&k| STORED_AT[self.dims[k]]).collect();
                Ok(Value::U8 { data: permuted(data, &stored_in, &perm), shape: out, q })
            }
            x => run_shape_op(
                x,
                |a| self.forward(a),
                |d, s| {
                    let out = self.check(s)?;
                    Ok((permuted(d, s, &self.dims), out))
                },
            ),
        }
    }
    serde_qop_tail!();
}

/// `nn.ChannelShuffle(groups)` (ShuffleNet): `[n, c, h, w]` viewed as `[n, g, c / g, h, w]`,
/// its group axes swapped: output channel `j` is input channel `(j % g) * (c / g) + j / g`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelShuffle {
    /// Groups.
    pub groups: usize,
}

impl ChannelShuffle {
    fn keeps_batch(&self) -> bool {
        true
    }
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        self.source(s).map(|_| s.to_vec())
    }
    /// The input channel of each output channel.
    fn source(&self, shape: &[usize]) -> Result<Vec<usize>> {
        let g = self.groups;
        match *shape {
            [_, c, _, _] if g > 0 && c % g == 0 => Ok((0..c).map(|j| (j % g) * (c / g) + j / g).collect()),
            _ => Err(shape_err(
                "ChannelShuffle",
                format!("a 4-D NCHW input whose channels divide into {g} groups"),
                shape,
            )),
        }
    }
}

impl Module for ChannelShuffle {
    fn kind(&self) -> &'static str {
        "ChannelShuffle"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let src = self.source(x.shape())?;
        Ok(x.select(ndarray::Axis(1), &src))
    }
    same_params_module!();
}

pub(crate) const SHUFFLE: (&str, super::OpLoader) =
    ("ChannelShuffle", |j, _, node| Ok(Box::new(parse::<ChannelShuffle>(j, node, "ChannelShuffle")?)));

impl QOp for ChannelShuffle {
    fn op_name(&self) -> &'static str {
        SHUFFLE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            Value::F32(a) => Ok(Value::F32(self.forward(&a)?)),
            Value::U8 { data, shape, q } => {
                // NHWC: a permutation of the bytes of each pixel.
                let src = self.source(&shape)?;
                let data = Input::new(data);
                let c = src.len();
                let mut y = scratch::take(budget(&shape, 1, run, "ChannelShuffle")?);
                for (o, i) in y.chunks_exact_mut(c).zip(data.chunks_exact(c)) {
                    for (dst, &s) in o.iter_mut().zip(&src) {
                        *dst = i[s];
                    }
                }
                Ok(Value::U8 { data: y, shape, q })
            }
        }
    }
    serde_qop_tail!();
}

/// An NCHW image `[n, c, h, w]` as rows of channels `[n * h * w, c]` (`x.permute(0, 2, 3, 1)
/// .reshape(-1, c)`): what channels-last layers (ConvNeXt's LayerNorm and Linear) read. In
/// int8 it moves nothing: an image is stored NHWC, which is these rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRows;

impl ImageRows {
    fn keeps_batch(&self) -> bool {
        false
    }
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        match *s {
            [n, c, h, w] => Ok(vec![n * h * w, c]),
            _ => Err(shape_err("ImageRows", "a 4-D NCHW image".into(), s)),
        }
    }
}

impl Module for ImageRows {
    fn kind(&self) -> &'static str {
        "ImageRows"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let out = self.out_dims(x.shape())?;
        let y = x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
        Ok(y.into_shape_with_order(IxDyn(&out)).expect("same length"))
    }
    same_params_module!();
}

pub(crate) const IMAGE_ROWS: (&str, super::OpLoader) = ("ImageRows", |_, _, _| Ok(Box::new(ImageRows)));

impl QOp for ImageRows {
    fn op_name(&self) -> &'static str {
        IMAGE_ROWS.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            Value::F32(a) => Ok(Value::F32(self.forward(&a)?)),
            // Stored NHWC: already rows of channels.
            Value::U8 { data, shape, q } => Ok(Value::U8 { shape: self.out_dims(&shape)?, data, q }),
        }
    }
    serde_qop_tail!();
}

/// Rows of channels `[n * h * w, c]` back to an NCHW image `[n, c, h, w]` (`h` and `w` given,
/// `n` inferred): [`ImageRows`] undone. In int8 it moves nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowsImage {
    /// The image's height.
    pub h: usize,
    /// The image's width.
    pub w: usize,
}

impl RowsImage {
    fn keeps_batch(&self) -> bool {
        false
    }
    fn out_dims(&self, s: &[usize]) -> Result<Vec<usize>> {
        let hw = self.h * self.w;
        match *s {
            [m, c] if hw > 0 && m % hw == 0 => Ok(vec![m / hw, c, self.h, self.w]),
            _ => Err(shape_err("RowsImage", format!("rows [n * {} * {}, c] of an image", self.h, self.w), s)),
        }
    }
}

impl Module for RowsImage {
    fn kind(&self) -> &'static str {
        "RowsImage"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let out = self.out_dims(x.shape())?;
        let nhwc = x.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&[out[0], out[2], out[3], out[1]]));
        let nhwc = nhwc.expect("same length");
        Ok(nhwc.permuted_axes(IxDyn(&[0, 3, 1, 2])).as_standard_layout().into_owned())
    }
    same_params_module!();
}

pub(crate) const ROWS_IMAGE: (&str, super::OpLoader) =
    ("RowsImage", |j, _, node| Ok(Box::new(parse::<RowsImage>(j, node, "RowsImage")?)));

impl QOp for RowsImage {
    fn op_name(&self) -> &'static str {
        ROWS_IMAGE.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, _run: Run) -> Result<Value> {
        match args.pop().expect("one input") {
            Value::F32(a) => Ok(Value::F32(self.forward(&a)?)),
            Value::U8 { data, shape, q } => Ok(Value::U8 { shape: self.out_dims(&shape)?, data, q }),
        }
    }
    serde_qop_tail!();
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("Flatten", |_, _| Ok(Box::new(Flatten))),
    ("Reshape", |j, _| Ok(Box::new(parse::<Reshape>(j, "Reshape", "Reshape")?))),
    ("Permute", |j, _| Ok(Box::new(parse::<Permute>(j, "Permute", "Permute")?))),
    ("ChannelShuffle", |j, _| Ok(Box::new(parse::<ChannelShuffle>(j, "ChannelShuffle", "ChannelShuffle")?))),
    ("ImageRows", |_, _| Ok(Box::new(ImageRows))),
    ("RowsImage", |j, _| Ok(Box::new(parse::<RowsImage>(j, "RowsImage", "RowsImage")?))),
];

#[cfg(test)]
mod tests {
    use super::{is_noop, permute_bytes, permute_elems, simplify};

    /// `cases` random permutations of random shapes (ranks 1 to 5, sizes 1 to `small` at rank
    /// 4 and above, else 1 to `large`), from `seed`.
    fn random_permutations(seed: u64, cases: usize, small: usize, large: usize) -> Vec<(Vec<usize>, Vec<usize>)> {
        let mut seed = seed;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        (0..cases)
            .map(|_| {
                let rank = 1 + next(5);
                let shape: Vec<usize> = (0..rank).map(|_| 1 + next(if rank > 3 { small } else { large })).collect();
                let mut perm: Vec<usize> = (0..rank).collect();
                for i in (1..rank).rev() {
                    perm.swap(i, next(i + 1));
                }
                (shape, perm)
            })
            .collect()
    }

    /// Asserts that `out` is `src` (row-major `shape`) permuted by `perm`, element by element
    /// by index arithmetic; returns whether any element moved.
    fn check_permuted<T: PartialEq + std::fmt::Debug>(src: &[T], out: &[T], shape: &[usize], perm: &[usize]) -> bool {
        let rank = shape.len();
        let mut strides = vec![1; rank];
        for i in (0..rank - 1).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let mut ix = vec![0; rank];
        let mut moved = false;
        for (k, got) in out.iter().enumerate() {
            let from: usize = ix.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum();
            assert_eq!(got, &src[from], "shape {shape:?} perm {perm:?} element {k}");
            moved |= from != k;
            for a in (0..rank).rev() {
                ix[a] += 1;
                if ix[a] < out_shape[a] {
                    break;
                }
                ix[a] = 0;
            }
        }
        moved
    }

    /// Every permutation of random shapes (sizes 1 to 3, ranks 1 to 5) against index
    /// arithmetic: the simplified paths (copies, tiled transposes) move the same bytes.
    #[test]
    fn permutations_match_index_arithmetic() {
        for (shape, perm) in random_permutations(0x2545_f491_4f6c_dd1d, 400, 3, 3) {
            let n: usize = shape.iter().product();
            let src: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let moved = check_permuted(&src, &permute_bytes(&src, &shape, &perm), &shape, &perm);
            assert_eq!(is_noop(&shape, &perm), !moved, "shape {shape:?} perm {perm:?}");
        }
    }

    /// The float permutation (whole runs, or tiled 2-D transposes) against index arithmetic
    /// on shapes large enough for several tiles and partial ones (sizes 1 to 40).
    #[test]
    fn float_permutations_match_index_arithmetic() {
        for (shape, perm) in random_permutations(0x9e37_79b9_7f4a_7c15, 200, 9, 40) {
            let n: usize = shape.iter().product();
            let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut out = vec![0.0; n];
            permute_elems(&src, &shape, &perm, &mut out);
            check_permuted(&src, &out, &shape, &perm);
        }
    }

    #[test]
    fn size_one_axes_and_runs_of_axes_simplify() {
        // [197, 1, 3, 768] logical -> NHWC [197, 3, 768, 1]: nothing moves.
        assert!(is_noop(&[197, 3, 768, 1], &[0, 3, 1, 2]));
        // Heads: [1, 12, 197, 64] -> [197, 1, 12, 64] is a transpose of two merged axes.
        assert_eq!(simplify(&[1, 12, 197, 64], &[2, 0, 1, 3]), (vec![12, 197, 64], vec![1, 0, 2]));
    }

    #[test]
    fn permuting_bytes_matches_index_arithmetic() {
        let shape = [2, 3, 4, 5];
        let src: Vec<u8> = (0..120).map(|i| i as u8).collect();
        let perm = [0, 2, 3, 1];
        let out = permute_bytes(&src, &shape, &perm);
        let mut k = 0;
        for a in 0..2 {
            for b in 0..4 {
                for c in 0..5 {
                    for d in 0..3 {
                        assert_eq!(out[k], src[((a * 3 + d) * 4 + b) * 5 + c]);
                        k += 1;
                    }
                }
            }
        }
    }
}
