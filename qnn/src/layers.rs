//! The float layers, with PyTorch's parameter names and shapes so `state_dict`s load
//! unchanged: `Conv2d`, `BatchNorm2d`, `Linear`, activations, pooling, shape ops, `Softmax`,
//! `Identity` and the stubs. Each is defined, with its int8 form and its saved form, in its
//! op's file under [`crate::ops`]; this module gathers them.

pub use crate::ops::activation::{HardSigmoid, Hardswish, Hardtanh, ReLU, ReLU6, SiLU, Sigmoid, Tanh, GELU};
pub use crate::ops::batchnorm::{BatchNorm1d, BatchNorm2d};
pub use crate::ops::conv::Conv2d;
pub use crate::ops::layernorm::LayerNorm;
pub use crate::ops::linear::Linear;
pub use crate::ops::pad::{Pad2d, PadMode};
pub use crate::ops::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
pub use crate::ops::resize::{Upsample, UpsampleMode};
pub use crate::ops::shape::{ChannelShuffle, Flatten, ImageRows, Permute, Reshape, RowsImage};
pub use crate::ops::slice::{Slice, SliceRange};
pub use crate::ops::softmax::Softmax;
pub use crate::ops::stubs::{DeQuantStub, Dropout, Identity, QuantStub};

use ndarray::{ArrayD, IxDyn};

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

/// NCHW -> NHWC, contiguous.
pub(crate) fn to_nhwc(x: &ArrayD<f32>) -> Vec<f32> {
    match (x.shape(), x.as_slice()) {
        (&[n, c, h, w], Some(data)) => transpose_batched(data, n, c, h * w),
        _ => x.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned().into_raw_vec_and_offset().0,
    }
}

/// NHWC data of `[n, h, w, c]` -> NCHW array.
pub(crate) fn from_nhwc(data: Vec<f32>, [n, h, w, c]: [usize; 4]) -> ArrayD<f32> {
    let t = transpose_batched(&data, n, h * w, c);
    ArrayD::from_shape_vec(IxDyn(&[n, c, h, w]), t).expect("length matches the shape")
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
            assert_eq!(nhwc, want, "{n}x{c}x{h}x{w}");
            assert_eq!(from_nhwc(nhwc, [n, h, w, c]), x, "{n}x{c}x{h}x{w}");
        }
    }
}
