//! Quantization parameters: scale and zero point (per tensor or per channel), the quantized
//! range they map into, and the scheme that chose them.

use crate::{DType, QError, Result};

/// How [`crate::choose_qparams`] places the zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QScheme {
    /// The observed range `[min, max]` (widened to include 0) maps onto `[qmin, qmax]`; the
    /// zero point is wherever 0.0 lands. PyTorch `per_tensor_affine` / `per_channel_affine`.
    #[default]
    Affine,
    /// The range `[-amax, amax]` maps onto `[qmin, qmax]`; the zero point is the middle of the
    /// range (0 for signed types, 128 for `u8`). PyTorch `per_tensor_symmetric` /
    /// `per_channel_symmetric`.
    Symmetric,
}

/// Where a [`QuantRange`] came from. It matters in one place: PyTorch's symmetric `u8` zero
/// point is 128 for the dtype's own range and the middle of the range for a custom one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeKind {
    /// The dtype's whole range.
    Full,
    /// PyTorch's `reduce_range=True`: one bit less (`u8` 0..=127, `i8` -64..=63).
    Reduced,
    /// A range the user chose (PyTorch `quant_min` / `quant_max`).
    Custom,
    /// A custom range, then reduced by PyTorch's `reduce_range=True` (both ends halved).
    CustomReduced,
}

/// The integer range `[qmin, qmax]` that quantized values are clamped to.
///
/// Always valid for its dtype once constructed: `qmin < qmax`, both inside the dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantRange {
    dtype: DType,
    qmin: i32,
    qmax: i32,
    kind: RangeKind,
}

impl QuantRange {
    /// The whole range of `dtype` (PyTorch's default).
    pub const fn full(dtype: DType) -> Self {
        QuantRange { dtype, qmin: dtype.min_value() as i32, qmax: dtype.max_value() as i32, kind: RangeKind::Full }
    }

    /// PyTorch's `reduce_range=True`: `u8` 0..=127, `i8` -64..=63. `i32` keeps its full range,
    /// as in PyTorch's `calculate_qmin_qmax`.
    pub const fn reduced(dtype: DType) -> Self {
        let (qmin, qmax) = match dtype {
            DType::U8 => (0, 127),
            DType::I8 => (-64, 63),
            DType::I32 => (i32::MIN, i32::MAX),
        };
        QuantRange { dtype, qmin, qmax, kind: RangeKind::Reduced }
    }

    /// A custom range, e.g. `(-127, 127)` for symmetric weights or `(0, 15)` for 4-bit values
    /// stored in `u8`.
    ///
    /// # Errors
    /// [`QError::InvalidRange`] unless `qmin <= 0 <= qmax`, `qmin < qmax` and both fit `dtype`.
    pub fn custom(dtype: DType, qmin: i64, qmax: i64) -> Result<Self> {
        const OP: &str = "QuantRange::custom";
        let bad = |reason: String| QError::InvalidRange { op: OP, qmin, qmax, dtype, reason };
        if qmin >= qmax {
            return Err(bad("qmin must be strictly less than qmax".into()));
        }
        if qmin > 0 || qmax < 0 {
            return Err(bad("the range must include 0 so that 0.0 is exactly representable; widen it".into()));
        }
        if qmin < dtype.min_value() || qmax > dtype.max_value() {
            return Err(bad(format!(
                "it must lie inside the dtype's own range [{}, {}]; use a wider dtype or a \
                 narrower range",
                dtype.min_value(),
                dtype.max_value()
            )));
        }
        Ok(QuantRange { dtype, qmin: qmin as i32, qmax: qmax as i32, kind: RangeKind::Custom })
    }

    /// The range PyTorch's observers use (`calculate_qmin_qmax`): a custom range if given, else
    /// the dtype's full range; then, with `reduce_range`, both ends halved with floor division
    /// (a custom `(0, 255)` becomes `(0, 127)`, `(-128, 127)` becomes `(-64, 63)`).
    ///
    /// # Errors
    /// As [`QuantRange::custom`] for an invalid custom range.
    pub fn for_observer(dtype: DType, custom: Option<(i64, i64)>, reduce_range: bool) -> Result<Self> {
        match (custom, reduce_range) {
            (None, false) => Ok(Self::full(dtype)),
            (None, true) => Ok(Self::reduced(dtype)),
            (Some((lo, hi)), false) => Self::custom(dtype, lo, hi),
            (Some((lo, hi)), true) => {
                Self::custom(dtype, lo, hi)?;
                let mut r = Self::custom(dtype, lo.div_euclid(2), hi.div_euclid(2))?;
                r.kind = RangeKind::CustomReduced;
                Ok(r)
            }
        }
    }

    /// The dtype this range is for.
    pub const fn dtype(&self) -> DType {
        self.dtype
    }
    /// Lower bound (inclusive).
    pub const fn qmin(&self) -> i32 {
        self.qmin
    }
    /// Upper bound (inclusive).
    pub const fn qmax(&self) -> i32 {
        self.qmax
    }
    /// Where the range came from.
    pub const fn kind(&self) -> RangeKind {
        self.kind
    }
    /// Whether `v` lies in `[qmin, qmax]`.
    #[inline]
    pub fn contains(&self, v: i64) -> bool {
        (self.qmin as i64..=self.qmax as i64).contains(&v)
    }
    /// Number of quantization steps, `qmax - qmin` (as `f64`: exact for every dtype).
    pub fn steps(&self) -> f64 {
        (self.qmax as i64 - self.qmin as i64) as f64
    }
}

/// Scale and zero point for a whole tensor, or one per channel along an axis.
///
/// Scales are `f32` because PyTorch's CPU kernels compute in `f32` (its `double` scale is cast
/// to `float` before use), so an `f32` scale loses nothing and round-trips exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum QParams {
    /// One scale and zero point for the whole tensor.
    PerTensor {
        /// The step between consecutive quantized values.
        scale: f32,
        /// The integer that represents 0.0.
        zero_point: i32,
    },
    /// One scale and zero point per index along `axis`.
    PerChannel(PerChannel),
}

/// Per-channel parameters; built by [`QParams::per_channel`], which validates them.
#[derive(Clone, Debug, PartialEq)]
pub struct PerChannel {
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    axis: usize,
}

impl PerChannel {
    /// One scale per channel.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// One zero point per channel.
    pub fn zero_points(&self) -> &[i32] {
        &self.zero_points
    }
    /// The channel axis.
    pub fn axis(&self) -> usize {
        self.axis
    }
    /// Number of channels.
    pub fn len(&self) -> usize {
        self.scales.len()
    }
    /// Always false: construction rejects empty lists.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }
}

/// Checks that `scale` can be used to quantize: finite, positive, finite reciprocal.
pub(crate) fn check_scale(op: &'static str, scale: f32, channel: Option<usize>) -> Result<()> {
    if scale.is_finite() && scale > 0.0 && (1.0f32 / scale).is_finite() {
        Ok(())
    } else {
        Err(QError::InvalidScale { op, scale, channel })
    }
}

impl QParams {
    /// Per-tensor parameters.
    ///
    /// # Errors
    /// [`QError::InvalidScale`] unless `scale` is finite, positive and has a finite reciprocal.
    /// The zero point is checked against a range where the parameters are used.
    pub fn per_tensor(scale: f32, zero_point: i32) -> Result<Self> {
        check_scale("QParams::per_tensor", scale, None)?;
        Ok(QParams::PerTensor { scale, zero_point })
    }

    /// Per-channel parameters along `axis`.
    ///
    /// # Errors
    /// [`QError::ChannelCountMismatch`] if the lists are empty or differ in length;
    /// [`QError::InvalidScale`] for any bad scale. The axis and the channel count are checked
    /// against the tensor's shape where the parameters are used.
    pub fn per_channel(scales: Vec<f32>, zero_points: Vec<i32>, axis: usize) -> Result<Self> {
        const OP: &str = "QParams::per_channel";
        if scales.is_empty() || scales.len() != zero_points.len() {
            return Err(QError::ChannelCountMismatch {
                op: OP,
                axis,
                shape: vec![],
                expected: scales.len().max(zero_points.len()).max(1),
                scales: scales.len(),
                zero_points: zero_points.len(),
            });
        }
        for (c, &s) in scales.iter().enumerate() {
            check_scale(OP, s, Some(c))?;
        }
        Ok(QParams::PerChannel(PerChannel { scales, zero_points, axis }))
    }

    /// The channel axis, or `None` for per-tensor parameters.
    pub fn axis(&self) -> Option<usize> {
        match self {
            QParams::PerTensor { .. } => None,
            QParams::PerChannel(pc) => Some(pc.axis),
        }
    }

    /// Scale of channel `c` (per-tensor parameters ignore `c`).
    ///
    /// # Panics
    /// If `c` is not a channel of per-channel parameters.
    pub fn scale(&self, c: usize) -> f32 {
        match self {
            QParams::PerTensor { scale, .. } => *scale,
            QParams::PerChannel(pc) => pc.scales[c],
        }
    }

    /// Zero point of channel `c` (per-tensor parameters ignore `c`).
    ///
    /// # Panics
    /// If `c` is not a channel of per-channel parameters.
    pub fn zero_point(&self, c: usize) -> i32 {
        match self {
            QParams::PerTensor { zero_point, .. } => *zero_point,
            QParams::PerChannel(pc) => pc.zero_points[c],
        }
    }

    /// Checks these parameters against a tensor of `shape` quantized into `range`: the axis
    /// exists, there is one scale per channel, every zero point is inside the range.
    ///
    /// # Errors
    /// [`QError::AxisOutOfRange`], [`QError::ChannelCountMismatch`] or
    /// [`QError::ZeroPointOutOfRange`], each naming `op`.
    pub fn validate(&self, op: &'static str, shape: &[usize], range: &QuantRange) -> Result<()> {
        let zp_err = |zero_point: i32, channel| QError::ZeroPointOutOfRange {
            op,
            zero_point: zero_point as i64,
            channel,
            qmin: range.qmin as i64,
            qmax: range.qmax as i64,
            dtype: range.dtype,
        };
        match self {
            QParams::PerTensor { scale, zero_point } => {
                check_scale(op, *scale, None)?;
                if !range.contains(*zero_point as i64) {
                    return Err(zp_err(*zero_point, None));
                }
            }
            QParams::PerChannel(pc) => {
                if pc.axis >= shape.len() {
                    return Err(QError::AxisOutOfRange { op, axis: pc.axis, shape: shape.to_vec() });
                }
                if shape[pc.axis] != pc.len() {
                    return Err(QError::ChannelCountMismatch {
                        op,
                        axis: pc.axis,
                        shape: shape.to_vec(),
                        expected: shape[pc.axis],
                        scales: pc.scales.len(),
                        zero_points: pc.zero_points.len(),
                    });
                }
                for (c, &zp) in pc.zero_points.iter().enumerate() {
                    if !range.contains(zp as i64) {
                        return Err(zp_err(zp, Some(c)));
                    }
                }
            }
        }
        Ok(())
    }
}
