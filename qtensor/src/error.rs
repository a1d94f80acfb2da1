//! The one error type of this crate.
//!
//! Every message names the operation that failed, the values, shapes or dtypes involved, and
//! what to do about it.

use crate::DType;

/// Result with [`QError`].
pub type Result<T, E = QError> = std::result::Result<T, E>;

/// Everything that can go wrong in `qtensor`. No public function panics on bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QError {
    /// A scale that is not a positive finite number whose reciprocal is finite too.
    #[error(
        "{op}: scale {scale:e}{at} is invalid: a scale must be finite and > 0, and 1/scale must \
         be finite too; fix the calibration that produced it, or floor it with an eps as \
         choose_qparams does",
        at = channel_suffix(*channel)
    )]
    InvalidScale {
        /// Operation that rejected the scale.
        op: &'static str,
        /// The offending scale.
        scale: f32,
        /// Channel index for per-channel parameters.
        channel: Option<usize>,
    },

    /// A zero point outside the quantized range.
    #[error(
        "{op}: zero point {zero_point}{at} is outside the quantized range [{qmin}, {qmax}] of \
         {dtype}; choose a zero point inside the range (choose_qparams always does)",
        at = channel_suffix(*channel)
    )]
    ZeroPointOutOfRange {
        /// Operation that rejected the zero point.
        op: &'static str,
        /// The offending zero point.
        zero_point: i64,
        /// Channel index for per-channel parameters.
        channel: Option<usize>,
        /// Range lower bound.
        qmin: i64,
        /// Range upper bound.
        qmax: i64,
        /// The element type.
        dtype: DType,
    },

    /// A quantized range that is empty, excludes zero or does not fit the dtype.
    #[error("{op}: quantization range [{qmin}, {qmax}] is invalid for {dtype}: {reason}")]
    InvalidRange {
        /// Operation that rejected the range.
        op: &'static str,
        /// Requested lower bound.
        qmin: i64,
        /// Requested upper bound.
        qmax: i64,
        /// The element type.
        dtype: DType,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A per-channel axis that the tensor does not have.
    #[error(
        "{op}: channel axis {axis} is out of range for a tensor of shape {shape:?} ({ndim} \
         dimensions); use an axis in 0..{ndim}",
        ndim = shape.len()
    )]
    AxisOutOfRange {
        /// Operation that rejected the axis.
        op: &'static str,
        /// The requested axis.
        axis: usize,
        /// Shape of the tensor.
        shape: Vec<usize>,
    },

    /// Per-channel parameter lists whose lengths do not match the tensor.
    #[error(
        "{op}: per-channel parameters have {scales} scales and {zero_points} zero points, but \
         axis {axis} of shape {shape:?} has {expected} channels; give one scale and one zero \
         point per channel"
    )]
    ChannelCountMismatch {
        /// Operation that found the mismatch.
        op: &'static str,
        /// Channel axis.
        axis: usize,
        /// Shape of the tensor.
        shape: Vec<usize>,
        /// Number of channels along the axis.
        expected: usize,
        /// Number of scales given.
        scales: usize,
        /// Number of zero points given.
        zero_points: usize,
    },

    /// NaN in the input of a quantization: NaN has no quantized value.
    #[error(
        "{op}: input of shape {shape:?} contains NaN (first at flat index {index}); NaN has no \
         quantized value: find where it is produced upstream, or replace it (e.g. with \
         `mapv(|x| if x.is_nan() {{ 0.0 }} else {{ x }})`) before quantizing"
    )]
    NanInput {
        /// Operation that found the NaN.
        op: &'static str,
        /// Flat (row-major) index of the first NaN.
        index: usize,
        /// Shape of the input.
        shape: Vec<usize>,
    },

    /// A min/max pair that cannot produce quantization parameters.
    #[error("{op}: cannot choose qparams from min {min:e}, max {max:e}{at}: {reason}",
        at = channel_suffix(*channel))]
    InvalidMinMax {
        /// Operation that rejected the range.
        op: &'static str,
        /// Observed minimum.
        min: f32,
        /// Observed maximum.
        max: f32,
        /// Channel index for per-channel statistics.
        channel: Option<usize>,
        /// What is wrong and what to do.
        reason: &'static str,
    },

    /// A combination of options that PyTorch rejects too, or that makes no sense.
    #[error("{op}: {reason}")]
    Unsupported {
        /// Operation that rejected the options.
        op: &'static str,
        /// What is unsupported and what to use instead.
        reason: String,
    },

    /// Two shapes that must agree do not.
    #[error("{op}: shape mismatch: expected {expected:?}, got {actual:?}; {hint}")]
    ShapeMismatch {
        /// Operation that found the mismatch.
        op: &'static str,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape given.
        actual: Vec<usize>,
        /// What to do.
        hint: &'static str,
    },
}

fn channel_suffix(channel: Option<usize>) -> String {
    channel.map(|c| format!(" (channel {c})")).unwrap_or_default()
}
