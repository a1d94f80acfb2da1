//! The float layers, with PyTorch's parameter names and shapes so `state_dict`s load
//! unchanged: `Conv2d`, `BatchNorm2d`, `Linear`, activations, pooling, shape ops, `Softmax`,
//! `Identity` and the stubs. Each is defined, with its int8 form and its saved form, in its
//! op's file under [`crate::ops`]; this module gathers them.

pub use crate::ops::activation::{HardSigmoid, Hardswish, Hardtanh, ReLU, ReLU6, SiLU, Sigmoid, Tanh, GELU};
pub use crate::ops::batchnorm::{BatchNorm1d, BatchNorm2d};
pub use crate::ops::conv::Conv2d;
pub use crate::ops::convt::ConvTranspose2d;
pub use crate::ops::embedding::Embedding;
pub use crate::ops::konst::{BatchConst, SeqConst};
pub use crate::ops::layernorm::LayerNorm;
pub use crate::ops::linear::Linear;
pub use crate::ops::pad::{Pad2d, PadMode};
pub use crate::ops::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
pub use crate::ops::resize::{Upsample, UpsampleMode};
pub use crate::ops::scalar::{AddScalar, MulScalar};
pub use crate::ops::shape::{ChannelShuffle, Flatten, ImageRows, Permute, Reshape, RowsImage};
pub use crate::ops::slice::{Slice, SliceRange};
pub use crate::ops::softmax::Softmax;
pub use crate::ops::stubs::{DeQuantStub, Dropout, Identity, NanToZero, QuantStub};

use ndarray::{ArrayD, IxDyn, ShapeBuilder};

use crate::error::{NnError, Result};

pub(crate) fn shape_err(kind: &'static str, expected: String, x: &ArrayD<f32>) -> NnError {
    shape_error(kind, expected, x.shape())
}

/// A shape error for an input of shape `got`.
pub(crate) fn shape_error(kind: &'static str, expected: String, got: &[usize]) -> NnError {
    NnError::Shape { module: String::new(), kind, expected, got: got.to_vec() }
}

/// NCHW `[n, c, h, w]` of a 4-D input, or a shape error.
pub(crate) fn nchw(kind: &'static str, x: &ArrayD<f32>, what: &str) -> Result<[usize; 4]> {
    match *x.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(shape_err(kind, format!("a 4-D NCHW tensor {what}"), x)),
    }
}

/// The NHWC data of a 4-D NCHW array: borrowed when its elements already lie in NHWC order
/// (what [`from_nhwc`] returns: float convolutions hand their outputs on that way), else
/// transposed into a new buffer.
pub(crate) fn to_nhwc(x: &ArrayD<f32>) -> std::borrow::Cow<'_, [f32]> {
    if let Some(data) = nhwc_data(x) {
        return std::borrow::Cow::Borrowed(data);
    }
    std::borrow::Cow::Owned(match (x.shape(), x.as_slice()) {
        (&[n, c, h, w], Some(data)) => transpose_batched(data, n, c, h * w),
        _ => x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned().into_raw_vec_and_offset().0,
    })
}

/// The data of a 4-D NCHW array whose elements lie in NHWC order, if they do.
pub(crate) fn nhwc_data(x: &ArrayD<f32>) -> Option<&[f32]> {
    match (x.shape(), x.as_slice_memory_order()) {
        (&[_, c, h, w], Some(data)) if is_nhwc(x.strides(), [c, h, w]) => Some(data),
        _ => None,
    }
}

/// Whether NCHW strides (in elements) of an array of `[_, c, h, w]` are NHWC's; sizes of 1
/// may have any stride.
fn is_nhwc(strides: &[isize], [c, h, w]: [usize; 3]) -> bool {
    let want = [(h * w * c) as isize, 1, (w * c) as isize, c as isize];
    let dims = [usize::MAX, c, h, w];
    strides.iter().zip(want).zip(dims).enumerate().all(|(i, ((&s, want), d))| s == want || (i > 0 && d <= 1))
}

/// NHWC data of `[n, h, w, c]` as the NCHW array `[n, c, h, w]`, without moving it: the
/// array's strides are NHWC's. Element-wise operations take it as it is; [`to_nhwc`] borrows
/// it back; anything that needs PyTorch's memory order asks for the standard layout.
pub(crate) fn from_nhwc(data: Vec<f32>, [n, h, w, c]: [usize; 4]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(&[n, h, w, c]), data)
        .expect("length matches the shape")
        .permuted_axes(IxDyn(&[0, 3, 1, 2]))
}

/// An array's elements in memory order, when they fill one block with non-negative strides.
pub(crate) fn in_memory_order(x: &ArrayD<f32>) -> Option<&[f32]> {
    x.strides().iter().all(|&s| s >= 0).then(|| x.as_slice_memory_order()).flatten()
}

/// `data` (in memory order) as an array of `like`'s shape and strides (which
/// [`in_memory_order`] accepted).
pub(crate) fn laid_out_like(like: &ArrayD<f32>, data: Vec<f32>) -> ArrayD<f32> {
    let strides: Vec<usize> = like.strides().iter().map(|&s| s as usize).collect();
    ArrayD::from_shape_vec(IxDyn(like.shape()).strides(IxDyn(&strides)), data)
        .expect("the strides of an array of this shape")
}

/// `f` on every element: over the memory in order, into an array of the same strides, when
/// it is one block (a loop the compiler vectorises), else in logical order.
#[inline(always)]
pub(crate) fn map_same_layout(x: &ArrayD<f32>, f: impl Fn(f32) -> f32) -> ArrayD<f32> {
    let Some(s) = in_memory_order(x) else { return x.mapv(f) };
    let mut data = crate::scratch::take_f32(s.len());
    for (d, &v) in data.iter_mut().zip(s) {
        *d = f(v);
    }
    laid_out_like(x, data)
}

/// `f` on every element, in place, over the memory in order when it is one block (a loop
/// the compiler vectorises).
#[inline(always)]
pub(crate) fn map_in_place(x: &mut ArrayD<f32>, f: impl Fn(f32) -> f32) {
    match x.as_slice_memory_order_mut() {
        Some(s) => s.iter_mut().for_each(|v| *v = f(*v)),
        None => x.mapv_inplace(f),
    }
}

/// `f(pixel value, gate value)` over an NHWC-laid `[n, c, h, w]` operand and a per-channel
/// `[n, c, 1, 1]` one (in either order), in NHWC order, when the big one is laid out so; the
/// result keeps its layout. `None` for other shapes or layouts.
pub(crate) fn per_channel_nhwc(a: &ArrayD<f32>, b: &ArrayD<f32>, f: impl Fn(f32, f32) -> f32) -> Option<ArrayD<f32>> {
    use crate::ops::mul::gate;
    let (big, small) = if gate(a.shape(), b.shape()) {
        (a, b)
    } else if gate(b.shape(), a.shape()) {
        (b, a)
    } else {
        return None;
    };
    let data = nhwc_data(big)?;
    let &[n, c, h, w] = big.shape() else { return None };
    let gates: Vec<f32> = small.iter().copied().collect();
    let mut out = crate::scratch::take_f32(data.len());
    for (p, (o, xs)) in out.chunks_exact_mut(c.max(1)).zip(data.chunks_exact(c.max(1))).enumerate() {
        let g = &gates[p / (h * w) * c..][..c];
        for ((o, &x), &g) in o.iter_mut().zip(xs).zip(g) {
            *o = f(x, g);
        }
    }
    Some(from_nhwc(out, [n, h, w, c]))
}

/// `f(a, b)` element by element over two arrays of one shape, in the memory order they share
/// when they are laid out alike (the result then has their strides), else in logical order.
pub(crate) fn zip_same_layout(a: &ArrayD<f32>, b: &ArrayD<f32>, f: impl Fn(f32, f32) -> f32) -> ArrayD<f32> {
    if a.shape() == b.shape() && a.strides() == b.strides() {
        if let (Some(sa), Some(sb)) = (in_memory_order(a), in_memory_order(b)) {
            let mut data = crate::scratch::take_f32(sa.len());
            for ((d, &x), &y) in data.iter_mut().zip(sa).zip(sb) {
                *d = f(x, y);
            }
            return laid_out_like(a, data);
        }
    }
    ndarray::Zip::from(a).and(b).map_collect(|&x, &y| f(x, y))
}

/// `n` row-major `rows x cols` matrices, each transposed: element `(b, i, j)` of `src` lands
/// at `(b, j, i)`. Tiles of 16 x 16 keep both the reads and the writes within a few cache
/// lines.
pub(crate) fn transpose_batched(src: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    let m = rows * cols;
    assert_eq!(src.len(), n * m, "transpose_batched: {n} x {rows} x {cols}");
    let mut dst = vec![0.0f32; src.len()];
    for (s, d) in src.chunks_exact(m.max(1)).zip(dst.chunks_exact_mut(m.max(1))) {
        for i0 in (0..rows).step_by(T) {
            for j0 in (0..cols).step_by(T) {
                for i in i0..(i0 + T).min(rows) {
                    for j in j0..(j0 + T).min(cols) {
                        d[j * rows + i] = s[i * cols + j];
                    }
                }
            }
        }
    }
    dst
}

/// An activation fused into the layer before it (by [`crate::fuse()`]): applied to its output,
/// in float as in int8 (where it is a clamp at the output zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum FusedAct {
    /// None.
    #[default]
    None,
    /// ReLU.
    Relu,
    /// ReLU6.
    Relu6,
}

impl FusedAct {
    pub(crate) fn apply(self, x: &mut ArrayD<f32>) {
        match self {
            FusedAct::None => {}
            FusedAct::Relu => x.mapv_inplace(|v| v.max(0.0)),
            FusedAct::Relu6 => x.mapv_inplace(|v| v.clamp(0.0, 6.0)),
        }
    }

    /// The kernels' fused clamp.
    pub fn kernel(self) -> qkernels::Activation {
        match self {
            FusedAct::None => qkernels::Activation::None,
            FusedAct::Relu => qkernels::Activation::Relu,
            FusedAct::Relu6 => qkernels::Activation::Relu6,
        }
    }
}

#[cfg(test)]
mod transpose_tests {
    use super::*;

    /// The tiled transposes equal ndarray's permutations, on shapes that leave partial tiles.
    #[test]
    fn nchw_and_nhwc_round_trip_as_ndarray_permutes() {
        for &(n, c, h, w) in &[(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 4, 9), (3, 40, 6, 5)] {
            let len = n * c * h * w;
            let x = ArrayD::from_shape_vec(IxDyn(&[n, c, h, w]), (0..len).map(|v| v as f32 * 0.5 - 3.0).collect())
                .expect("shape");
            let nhwc = to_nhwc(&x);
            let want: Vec<f32> = x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).iter().copied().collect();
            assert_eq!(*nhwc, want[..], "{n}x{c}x{h}x{w}");
            let back = from_nhwc(nhwc.into_owned(), [n, h, w, c]);
            assert_eq!(back, x, "{n}x{c}x{h}x{w}");
            // The NHWC-strided array lends its data back without a copy.
            assert!(matches!(to_nhwc(&back), std::borrow::Cow::Borrowed(d) if *d == want[..]));
            assert_eq!(nhwc_data(&back).map(<[f32]>::len), Some(len));
        }
    }

    /// Element-wise joins of NHWC-strided arrays keep their layout and equal ndarray's.
    #[test]
    fn joins_keep_the_operands_layout() {
        let (n, c, h, w) = (2, 5, 3, 4);
        let a = from_nhwc((0..n * c * h * w).map(|v| v as f32 * 0.25).collect(), [n, h, w, c]);
        let b = from_nhwc((0..n * c * h * w).map(|v| 7.0 - v as f32).collect(), [n, h, w, c]);
        let s = zip_same_layout(&a, &b, |x, y| x + y);
        assert_eq!(s, &a + &b);
        assert_eq!(s.strides(), a.strides());
        // Different layouts: logical order.
        let bs = b.as_standard_layout().into_owned();
        assert_eq!(zip_same_layout(&a, &bs, |x, y| x * y), &a * &bs);
    }
}
