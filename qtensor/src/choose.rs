//! Choosing scale and zero point from an observed range, exactly as PyTorch does.

use crate::params::{check_scale, RangeKind};
use crate::{DType, QError, QParams, QScheme, QuantRange, Result};

/// PyTorch's default `eps`: `torch.finfo(torch.float32).eps` = 2^-23. Scales never go below it.
pub const DEFAULT_EPS: f32 = f32::EPSILON;

/// Chooses per-tensor scale and zero point for values observed in `[min, max]`.
///
/// This is PyTorch's `UniformQuantizationObserverBase._calculate_qparams`, computed the way
/// PyTorch computes it (all in `f32`), so the result is bit-identical to what
/// `MinMaxObserver.calculate_qparams()` returns for the same `min_val` / `max_val` buffers:
///
/// 1. the range is widened to include 0: `min_neg = min(min, 0)`, `max_pos = max(max, 0)`;
/// 2. affine: `scale = (max_pos - min_neg) / (qmax - qmin)`;
///    symmetric: `scale = max(-min_neg, max_pos) / ((qmax - qmin) / 2)` (so 127.5 for `i8`);
/// 3. `scale = max(scale, eps)`;
/// 4. affine: `zero_point = clamp(qmin - round_half_even(min_neg / scale), qmin, qmax)`;
///    symmetric: 0 for signed types; for `u8` 128, or `(qmin + qmax) div 2` for a custom range.
///
/// `min == max` is not special: all zeros give `scale = eps`.
///
/// ```
/// use qtensor::{choose_qparams, DType, QScheme, QuantRange, DEFAULT_EPS};
/// let p = choose_qparams(-1.0, 3.0, DType::U8, QScheme::Affine,
///                        QuantRange::full(DType::U8), DEFAULT_EPS)?;
/// assert_eq!(p.scale(0), 4.0 / 255.0);
/// assert_eq!(p.zero_point(0), 64); // round_half_even(63.75) = 64, then 0 - (-64)
/// # Ok::<(), qtensor::QError>(())
/// ```
///
/// # Errors
/// - [`QError::InvalidMinMax`] for NaN or infinite bounds, `min > max`, or the never-observed
///   pair `(+inf, -inf)` (PyTorch silently returns (1.0, 0) there; this is always a bug in
///   calibration);
/// - [`QError::Unsupported`] for symmetric `u8` with `reduce_range`, which PyTorch rejects
///   too, or a `range` made for another dtype;
/// - [`QError::InvalidScale`] when `eps` lets the scale reach 0 or a subnormal.
pub fn choose_qparams(
    min: f32,
    max: f32,
    dtype: DType,
    scheme: QScheme,
    range: QuantRange,
    eps: f32,
) -> Result<QParams> {
    const OP: &str = "choose_qparams";
    check_options(OP, dtype, scheme, &range)?;
    let (scale, zero_point) = qparams_one(OP, min, max, scheme, &range, eps, None)?;
    Ok(QParams::PerTensor { scale, zero_point })
}

/// Chooses one scale and zero point per channel from per-channel `mins` and `maxs`: the same
/// computation as [`choose_qparams`] channel by channel, i.e. PyTorch's
/// `PerChannelMinMaxObserver.calculate_qparams()`.
///
/// ```
/// use qtensor::{choose_qparams_per_channel, DType, QScheme, QuantRange, DEFAULT_EPS};
/// let p = choose_qparams_per_channel(&[-1.0, -0.5], &[1.0, 2.0], 0, DType::I8,
///     QScheme::Symmetric, QuantRange::full(DType::I8), DEFAULT_EPS)?;
/// assert_eq!(p.scale(0), 1.0 / 127.5);
/// assert_eq!(p.scale(1), 2.0 / 127.5);
/// assert_eq!(p.zero_point(1), 0);
/// # Ok::<(), qtensor::QError>(())
/// ```
///
/// # Errors
/// As [`choose_qparams`], naming the channel; [`QError::ChannelCountMismatch`] when `mins`
/// and `maxs` differ in length or are empty.
pub fn choose_qparams_per_channel(
    mins: &[f32],
    maxs: &[f32],
    axis: usize,
    dtype: DType,
    scheme: QScheme,
    range: QuantRange,
    eps: f32,
) -> Result<QParams> {
    const OP: &str = "choose_qparams_per_channel";
    check_options(OP, dtype, scheme, &range)?;
    if mins.is_empty() || mins.len() != maxs.len() {
        return Err(QError::ChannelCountMismatch {
            op: OP,
            axis,
            shape: vec![],
            expected: mins.len().max(maxs.len()).max(1),
            scales: mins.len(),
            zero_points: maxs.len(),
        });
    }
    let mut scales = Vec::with_capacity(mins.len());
    let mut zero_points = Vec::with_capacity(mins.len());
    for (c, (&lo, &hi)) in mins.iter().zip(maxs).enumerate() {
        let (s, z) = qparams_one(OP, lo, hi, scheme, &range, eps, Some(c))?;
        scales.push(s);
        zero_points.push(z);
    }
    QParams::per_channel(scales, zero_points, axis)
}

fn check_options(op: &'static str, dtype: DType, scheme: QScheme, range: &QuantRange) -> Result<()> {
    if range.dtype() != dtype {
        return Err(QError::Unsupported {
            op,
            reason: format!(
                "the range was built for {} but the dtype is {dtype}; build it with \
                 QuantRange::full({dtype:?}) (or reduced/custom) for the same dtype",
                range.dtype()
            ),
        });
    }
    let reduced = matches!(range.kind(), RangeKind::Reduced | RangeKind::CustomReduced);
    if scheme == QScheme::Symmetric && dtype == DType::U8 && reduced {
        return Err(QError::Unsupported {
            op,
            reason: "symmetric quantization of u8 (quint8) with reduce_range is not supported \
                     (PyTorch rejects it too); use the full u8 range, or i8 for symmetric values"
                .into(),
        });
    }
    Ok(())
}

fn qparams_one(
    op: &'static str,
    min: f32,
    max: f32,
    scheme: QScheme,
    range: &QuantRange,
    eps: f32,
    channel: Option<usize>,
) -> Result<(f32, i32)> {
    let bad = |reason| QError::InvalidMinMax { op, min, max, channel, reason };
    if min == f32::INFINITY && max == f32::NEG_INFINITY {
        return Err(bad("nothing was observed (min = +inf, max = -inf); run calibration data \
                        through the observer before asking for qparams"));
    }
    if min.is_nan() || max.is_nan() {
        return Err(bad("NaN bounds: the calibration data contained NaN; clean it first"));
    }
    if !min.is_finite() || !max.is_finite() {
        return Err(bad("infinite bounds: the calibration data contained +-inf; clip or drop \
                        those values first"));
    }
    if min > max {
        return Err(bad("min > max; pass the observed minimum first"));
    }
    let (qmin, qmax) = (range.qmin(), range.qmax());
    let min_neg = min.min(0.0);
    let max_pos = max.max(0.0);
    // Every step below is one f32 operation, in PyTorch's order; `steps` is converted to f32
    // once, as PyTorch converts its Python float divisor.
    let steps = range.steps();
    let (scale, zero_point) = match scheme {
        QScheme::Symmetric => {
            let amax = (-min_neg).max(max_pos);
            let scale = (amax / (steps / 2.0) as f32).max(eps);
            let zp = match range.dtype() {
                DType::U8 if matches!(range.kind(), RangeKind::Custom) => (qmin as i64 + qmax as i64).div_euclid(2),
                DType::U8 => 128,
                _ => 0,
            };
            (scale, zp)
        }
        QScheme::Affine => {
            let scale = ((max_pos - min_neg) / steps as f32).max(eps);
            let shift = (min_neg / scale).round_ties_even() as i64;
            let zp = (qmin as i64 - shift).clamp(qmin as i64, qmax as i64);
            (scale, zp)
        }
    };
    check_scale(op, scale, channel)?;
    Ok((scale, zero_point as i32))
}

/// Scales below this are raised to it by [`choose_qparams_dynamic`] (FBGEMM's
/// `SMALL_SCALE_THRESHOLD`, the smallest normal `f16`).
pub const DYNAMIC_SMALL_SCALE: f32 = 6.1e-5;

/// The `u8` parameters PyTorch's dynamic quantization chooses for an activation that spans
/// `[min, max]` at run time: `quant_utils::ChooseQuantizationParams` over `0..=255`, or
/// `0..=127` with `reduce_range` (what `quantized::linear_dynamic` passes on x86), without
/// sparsity preservation or power-of-two scales. Unlike the observers'
/// [`choose_qparams`], the scale is kept in `f64` (the zero point is computed with it) and
/// rounded to `f32` at the end; a scale of 0 (or one whose reciprocal is infinite) becomes
/// 0.1; scales below [`DYNAMIC_SMALL_SCALE`] are raised to it, the range widened in
/// proportion; the zero point is the candidate
/// from `min` or from `max` with the smaller error as PyTorch measures it
/// (`|qmin| - |min / scale|`, against `|qmax| - |max / scale|`), clamped, then rounded half to
/// even.
///
/// # Errors
/// A non-finite `min` or `max`.
pub fn choose_qparams_dynamic(min: f32, max: f32, reduce_range: bool) -> Result<(f32, i32)> {
    const OP: &str = "choose_qparams_dynamic";
    if !min.is_finite() || !max.is_finite() {
        return Err(QError::InvalidRange {
            op: OP,
            qmin: 0,
            qmax: 255,
            dtype: DType::U8,
            reason: format!(
                "the activation spans [{min}, {max}]: dynamic quantization needs finite values; \
                 look for NaN or infinities in the layer's input"
            ),
        });
    }
    let (qmin, qmax) = if reduce_range { (0i32, 127i32) } else { (0, 255) };
    let (mut min, mut max) = (min.min(0.0), max.max(0.0));
    // The scale stays in f64 until the end, as PyTorch keeps it.
    let mut scale = (max as f64 - min as f64) / (qmax - qmin) as f64;
    if scale as f32 == 0.0 || (1.0f32 / scale as f32).is_infinite() {
        scale = 0.1;
    }
    if scale < DYNAMIC_SMALL_SCALE as f64 {
        let original = scale as f32;
        scale = DYNAMIC_SMALL_SCALE as f64;
        if min == 0.0 {
            max = DYNAMIC_SMALL_SCALE * (qmax - qmin) as f32;
        } else if max == 0.0 {
            min = -DYNAMIC_SMALL_SCALE * (qmax - qmin) as f32;
        } else {
            let amplifier = DYNAMIC_SMALL_SCALE / original;
            min *= amplifier;
            max *= amplifier;
        }
    }
    let (lo, hi) = (min as f64 / scale, max as f64 / scale);
    let from_min = qmin as f64 - lo;
    let from_max = qmax as f64 - hi;
    let err_min = (qmin as f64).abs() - lo.abs();
    let err_max = (qmax as f64).abs() - hi.abs();
    let initial = if err_min < err_max { from_min } else { from_max };
    let zero_point = if initial < qmin as f64 {
        qmin
    } else if initial > qmax as f64 {
        qmax
    } else {
        initial.round_ties_even() as i32
    };
    let scale = scale as f32;
    Ok((scale, zero_point))
}
