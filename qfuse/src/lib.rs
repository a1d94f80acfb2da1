//! # qfuse: float-to-float rewrites before quantization
//!
//! Folding a batch-norm into the convolution or linear layer before it, so the pair becomes
//! one layer (and one int8 kernel) computing the same function. The arithmetic is PyTorch's
//! `fuse_conv_bn_weights` / `fuse_linear_bn_weights` operation for operation in `f32`, so the
//! folded weights, and the int8 weights quantized from them, are the ones PyTorch produces
//! (golden-tested on a model PyTorch trained and quantized).
//!
//! Per-channel affine maps (`y = x * scale + shift`, one pair per channel) fold the same way:
//! into the layer before them ([`fold_output_affine`], [`fold_transposed_output_affine`]) or
//! into an unpadded convolution after them ([`fold_input_affine`]); [`fuse_conv_transpose_bn`]
//! folds a batch-norm into a transposed convolution.
//!
//! Fusing ReLU into its producer needs no arithmetic: it is the clamp at the output zero
//! point of the int8 kernels (`qkernels::Activation::Relu`).
//!
//! ```
//! use qfuse::{fuse_conv_bn, BatchNorm};
//! // A 1x1 conv with 2 output channels, then a batch-norm that doubles channel 1.
//! let w = ndarray::Array4::from_shape_vec((2, 1, 1, 1), vec![1.0f32, 3.0]).unwrap().into_dyn();
//! let bn = BatchNorm { weight: Some(vec![1.0, 2.0]), bias: Some(vec![0.0, 1.0]),
//!                      running_mean: vec![0.0, 0.5], running_var: vec![1.0, 1.0], eps: 0.0 };
//! let (fw, fb) = fuse_conv_bn(w.view(), Some(&[0.0, 0.5]), &bn)?;
//! assert_eq!(fw.as_slice().unwrap(), &[1.0, 6.0]);
//! assert_eq!(fb, vec![0.0, 1.0]); // (0.5 - 0.5) * 1 * 2 + 1
//! # Ok::<(), qtensor::QError>(())
//! ```
//!
//! `qfuse` depends on `qtensor` only (for its error type); it knows nothing of observers or
//! kernels.

use ndarray::{ArrayD, ArrayViewD, Axis};
use qtensor::{QError, Result};

/// An inference-mode batch-norm: `y = (x - mean) / sqrt(var + eps) * weight + bias`, per
/// channel. `weight` and `bias` are `None` for PyTorch's `affine=False`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// Per-channel scale (gamma).
    pub weight: Option<Vec<f32>>,
    /// Per-channel shift (beta).
    pub bias: Option<Vec<f32>>,
    /// Running mean.
    pub running_mean: Vec<f32>,
    /// Running variance.
    pub running_var: Vec<f32>,
    /// Added to the variance (PyTorch: 1e-5).
    pub eps: f32,
}

impl BatchNorm {
    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.running_mean.len()
    }

    fn check(&self, op: &'static str, channels: usize, shape: &[usize]) -> Result<()> {
        let lens = [
            Some(self.running_mean.len()),
            Some(self.running_var.len()),
            self.weight.as_ref().map(Vec::len),
            self.bias.as_ref().map(Vec::len),
        ];
        if let Some(bad) = lens.into_iter().flatten().find(|&l| l != channels) {
            return Err(QError::ShapeMismatch {
                op,
                expected: vec![channels],
                actual: vec![bad],
                hint: "the batch-norm must have one mean, variance, weight and bias per output channel of the layer before it",
            });
        }
        if let Some(c) =
            self.running_var.iter().position(|&v| (v + self.eps).is_nan() || v + self.eps <= 0.0 || !v.is_finite())
        {
            return Err(QError::Unsupported {
                op,
                reason: format!(
                    "batch-norm channel {c} has running_var {} (+ eps {}) <= 0 or non-finite, for a layer of \
                     shape {shape:?}; the statistics are broken: recompute them or drop the batch-norm",
                    self.running_var[c], self.eps
                ),
            });
        }
        Ok(())
    }

    /// `1 / sqrt(var + eps)` per channel, in f32, as PyTorch's `rsqrt` (a correctly rounded
    /// square root, then a division).
    fn inv_std(&self) -> Vec<f32> {
        self.running_var.iter().map(|&v| 1.0 / (v + self.eps).sqrt()).collect()
    }

    /// PyTorch's convolution folding for `oc` channels (checked): the weights' factor
    /// `gamma * rsqrt(var + eps)` per channel, and the new bias
    /// `((b - mean) * rsqrt(var + eps)) * gamma + beta`, in that order, in f32.
    fn conv_fold(&self, bias: Option<&[f32]>, oc: usize) -> (Vec<f32>, Vec<f32>) {
        let inv = self.inv_std();
        let gamma = self.weight.clone().unwrap_or_else(|| vec![1.0; oc]);
        let beta = self.bias.clone().unwrap_or_else(|| vec![0.0; oc]);
        let factor = gamma.iter().zip(&inv).map(|(g, i)| g * i).collect();
        let b = bias_or_zeros(bias, oc);
        let fb = (0..oc).map(|o| ((b[o] - self.running_mean[o]) * inv[o]) * gamma[o] + beta[o]).collect();
        (factor, fb)
    }
}

fn bias_or_zeros(bias: Option<&[f32]>, n: usize) -> Vec<f32> {
    bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec)
}

/// `w` with each output channel's weights (its first dimension) times `factor[o]`.
fn scale_outputs(w: ArrayViewD<'_, f32>, factor: &[f32]) -> ArrayD<f32> {
    let mut fw = w.to_owned();
    for (o, mut row) in fw.axis_iter_mut(Axis(0)).enumerate() {
        row.mapv_inplace(|v| v * factor[o]);
    }
    fw
}

/// A transposed convolution's weights `[in, out / groups, kh, kw]` (`icg` inputs per group)
/// with each output channel's weights times `factor[o]`: output channel `o` of group `g` is
/// column `o - g * out / groups` of rows `g * icg ..`.
fn scale_transposed_outputs(w: ArrayViewD<'_, f32>, icg: usize, factor: &[f32]) -> ArrayD<f32> {
    let ocg = w.shape()[1];
    let mut fw = w.to_owned();
    for (i, mut row) in fw.axis_iter_mut(Axis(0)).enumerate() {
        let first = (i / icg) * ocg;
        for (j, mut taps) in row.axis_iter_mut(Axis(0)).enumerate() {
            taps.mapv_inplace(|v| v * factor[first + j]);
        }
    }
    fw
}

/// The first two dimensions of 4-D weights (`layout` names them for the error), the first
/// (`first`, for the error) divided into `groups` groups.
fn grouped_dims(
    op: &'static str,
    w: &ArrayViewD<'_, f32>,
    groups: usize,
    layout: &str,
    first: &str,
) -> Result<(usize, usize)> {
    let &[a, b, _, _] = w.shape() else {
        return Err(QError::Unsupported {
            op,
            reason: format!("weights must be 4-D {layout}, got shape {:?}", w.shape()),
        });
    };
    if groups == 0 || !a.is_multiple_of(groups) {
        return Err(QError::Unsupported {
            op,
            reason: format!("{groups} groups do not divide the {a} {first} of weights of shape {:?}", w.shape()),
        });
    }
    Ok((a, b))
}

/// `b[o] * scale[o] + shift[o]` for the `oc` channels of an optional bias.
fn affine_bias(bias: Option<&[f32]>, oc: usize, scale: &[f32], shift: &[f32]) -> Vec<f32> {
    let b = bias_or_zeros(bias, oc);
    (0..oc).map(|o| b[o] * scale[o] + shift[o]).collect()
}

/// Folds `bn` into a convolution with weights `w` (`[out_channels, ...]`, any layout with
/// output channels first: OIHW or OHWI) and optional bias. Returns the new weights and bias.
///
/// PyTorch's `fuse_conv_bn_weights`: `w' = w * (gamma * rsqrt(var + eps))`,
/// `b' = ((b - mean) * rsqrt(var + eps)) * gamma + beta`, in that order, in f32.
///
/// # Errors
/// A batch-norm whose channel count differs from the weights' first dimension, or whose
/// variance plus eps is not positive.
pub fn fuse_conv_bn(w: ArrayViewD<'_, f32>, bias: Option<&[f32]>, bn: &BatchNorm) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fuse_conv_bn";
    let oc = check_weights(OP, &w, bias)?;
    bn.check(OP, oc, w.shape())?;
    let (factor, fb) = bn.conv_fold(bias, oc);
    Ok((scale_outputs(w, &factor), fb))
}

/// Folds `bn` into a linear layer (`[out_features, in_features]`) and optional bias.
///
/// PyTorch's `fuse_linear_bn_weights`: `s = gamma * rsqrt(var + eps)`, `w' = w * s`,
/// `b' = (b - mean) * s + beta` (note: a different order from the convolution's bias).
///
/// # Errors
/// As [`fuse_conv_bn`].
pub fn fuse_linear_bn(w: ArrayViewD<'_, f32>, bias: Option<&[f32]>, bn: &BatchNorm) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fuse_linear_bn";
    let oc = check_weights(OP, &w, bias)?;
    if w.ndim() != 2 {
        return Err(QError::Unsupported {
            op: OP,
            reason: format!("linear weights must be 2-D [out_features, in_features], got shape {:?}", w.shape()),
        });
    }
    bn.check(OP, oc, w.shape())?;
    let inv = bn.inv_std();
    let s: Vec<f32> = (0..oc).map(|o| bn.weight.as_ref().map_or(1.0, |g| g[o]) * inv[o]).collect();
    let mut fw = w.to_owned();
    for (o, mut row) in fw.axis_iter_mut(Axis(0)).enumerate() {
        row.mapv_inplace(|v| v * s[o]);
    }
    let b = bias_or_zeros(bias, oc);
    let fb = (0..oc).map(|o| (b[o] - bn.running_mean[o]) * s[o] + bn.bias.as_ref().map_or(0.0, |x| x[o])).collect();
    Ok((fw, fb))
}

fn check_weights(op: &'static str, w: &ArrayViewD<'_, f32>, bias: Option<&[f32]>) -> Result<usize> {
    let Some(&oc) = w.shape().first() else {
        return Err(QError::Unsupported { op, reason: "weights must have an output-channel dimension".into() });
    };
    if let Some(b) = bias {
        if b.len() != oc {
            return Err(QError::ShapeMismatch {
                op,
                expected: vec![oc],
                actual: vec![b.len()],
                hint: "the layer's bias must have one value per output channel",
            });
        }
    }
    Ok(oc)
}

/// Folds a per-channel affine map applied to a layer's output, `y[o] = x[o] * scale[o] +
/// shift[o]`, into the layer's weights `w` (output channels first, any layout) and optional
/// bias: `w'[o] = w[o] * scale[o]`, `b'[o] = b[o] * scale[o] + shift[o]`, in f32.
///
/// The layer must have no activation between it and the map (the caller's to check).
///
/// # Errors
/// `scale` or `shift` (or the bias) not one value per output channel, or a non-finite
/// `scale` or `shift`.
pub fn fold_output_affine(
    w: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    scale: &[f32],
    shift: &[f32],
) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fold_output_affine";
    let oc = check_weights(OP, &w, bias)?;
    check_affine(OP, oc, scale, shift, "output channel of the layer before it")?;
    Ok((scale_outputs(w, scale), affine_bias(bias, oc, scale, shift)))
}

/// Folds a per-channel affine map applied to a convolution's input,
/// `x'[c] = x[c] * scale[c] + shift[c]`, into the convolution: weights `w` OIHW
/// (`[out, in / groups, kh, kw]`) in `groups` groups, and optional bias. `w'[o][i] = w[o][i] * scale[c]` for the input channel
/// `c` that weight reads, `b'[o] = b[o] + sum over i, kh, kw of w[o][i] * shift[c]` (summed
/// in f64, rounded once).
///
/// Exact only for a convolution without padding: its padded border reads zeros of `x'`, not
/// of `x * scale + shift` (the caller's to check).
///
/// # Errors
/// Weights that are not 4-D, channels that `groups` does not divide, `scale` or `shift` not
/// one value per input channel, or a non-finite `scale` or `shift`.
pub fn fold_input_affine(
    w: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    groups: usize,
    scale: &[f32],
    shift: &[f32],
) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fold_input_affine";
    check_weights(OP, &w, bias)?;
    let (oc, per_group) = grouped_dims(OP, &w, groups, "[out, in / groups, kh, kw]", "output channels")?;
    check_affine(OP, per_group * groups, scale, shift, "input channel of the convolution after it")?;
    let out_per_group = oc / groups;
    let mut fw = w.to_owned();
    let b = bias_or_zeros(bias, oc);
    let mut fb = Vec::with_capacity(oc);
    for (o, mut filter) in fw.axis_iter_mut(Axis(0)).enumerate() {
        let first = (o / out_per_group) * per_group;
        let mut sum = f64::from(b[o]);
        for (i, mut taps) in filter.axis_iter_mut(Axis(0)).enumerate() {
            let c = first + i;
            for v in taps.iter_mut() {
                sum += f64::from(*v) * f64::from(shift[c]);
                *v *= scale[c];
            }
        }
        fb.push(sum as f32);
    }
    Ok((fw, fb))
}

fn check_affine(op: &'static str, n: usize, scale: &[f32], shift: &[f32], of: &str) -> Result<()> {
    if let Some(bad) = [scale.len(), shift.len()].into_iter().find(|&l| l != n) {
        return Err(QError::ShapeMismatch {
            op,
            expected: vec![n],
            actual: vec![bad],
            hint: "the affine map must have one scale and one shift per channel it maps",
        });
    }
    if let Some(c) = scale.iter().chain(shift).position(|v| !v.is_finite()) {
        return Err(QError::Unsupported {
            op,
            reason: format!(
                "the affine map (a scale and a shift per {of}) holds {} at position {c} of its scales then shifts; \
                 only finite values fold",
                scale.iter().chain(shift).nth(c).expect("found")
            ),
        });
    }
    Ok(())
}

/// [`fold_output_affine`] for a transposed convolution, whose weights `w` are `[in, out /
/// groups, kh, kw]` (PyTorch's and ONNX's layout) in `groups` groups: output channel `o` of
/// group `g` is column `o - g * out / groups` of rows `g * in / groups ..`.
///
/// # Errors
/// Weights that are not 4-D, input channels that `groups` does not divide, `scale`, `shift`
/// or the bias not one value per output channel, or a non-finite `scale` or `shift`.
pub fn fold_transposed_output_affine(
    w: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    groups: usize,
    scale: &[f32],
    shift: &[f32],
) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fold_transposed_output_affine";
    let (ic, oc) = transposed_dims(OP, &w, bias, groups)?;
    if let Some(b) = bias.filter(|b| b.len() != oc) {
        return Err(QError::ShapeMismatch {
            op: OP,
            expected: vec![oc],
            actual: vec![b.len()],
            hint: "the layer's bias must have one value per output channel",
        });
    }
    check_affine(OP, oc, scale, shift, "output channel of the layer before it")?;
    Ok((scale_transposed_outputs(w, ic / groups, scale), affine_bias(bias, oc, scale, shift)))
}

/// A transposed convolution's input and output channels, its weights checked as 4-D
/// `[in, out / groups, kh, kw]` with `groups` dividing the inputs, and its bias (if any) as
/// one value per output channel.
fn transposed_dims(
    op: &'static str,
    w: &ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    groups: usize,
) -> Result<(usize, usize)> {
    let (ic, ocg) = grouped_dims(op, w, groups, "[in, out / groups, kh, kw]", "input channels")?;
    let oc = ocg * groups;
    if let Some(b) = bias.filter(|b| b.len() != oc) {
        return Err(QError::ShapeMismatch {
            op,
            expected: vec![oc],
            actual: vec![b.len()],
            hint: "the layer's bias must have one value per output channel",
        });
    }
    Ok((ic, oc))
}

/// Folds `bn` into a transposed convolution with weights `w` (`[in, out / groups, kh, kw]`)
/// in `groups` groups and optional bias: each output channel's weights times
/// `gamma * rsqrt(var + eps)`, and the bias as [`fuse_conv_bn`] computes it (PyTorch's
/// `fuse_conv_bn_weights(..., transpose=True)`, per group).
///
/// # Errors
/// As [`fuse_conv_bn`] and [`fold_transposed_output_affine`].
pub fn fuse_conv_transpose_bn(
    w: ArrayViewD<'_, f32>,
    bias: Option<&[f32]>,
    groups: usize,
    bn: &BatchNorm,
) -> Result<(ArrayD<f32>, Vec<f32>)> {
    const OP: &str = "qfuse::fuse_conv_transpose_bn";
    let (ic, oc) = transposed_dims(OP, &w, bias, groups)?;
    bn.check(OP, oc, w.shape())?;
    let (factor, fb) = bn.conv_fold(bias, oc);
    Ok((scale_transposed_outputs(w, ic / groups, &factor), fb))
}
