//! The [`Observer`] trait, the quantization target it computes parameters for
//! ([`QuantSpec`]), and the non-finite policy.

use std::any::Any;
use std::fmt::Debug;

use ndarray::ArrayViewD;
use qtensor::{choose_qparams, choose_qparams_per_channel, DType, QError, QParams, QScheme, QuantRange, DEFAULT_EPS};

use crate::error::{ObserveError, Result};
use crate::scan::Scan;

/// What a calibration batch with NaN or ±inf does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NonFinite {
    /// Reject the batch with [`ObserveError::NonFiniteInput`] (the default: such values
    /// usually mean a bug upstream, and PyTorch would turn them into an infinite scale).
    #[default]
    Error,
    /// Skip non-finite values and observe the rest.
    Ignore,
}

/// How observed statistics become quantization parameters: the integer type, the scheme,
/// the range and the smallest allowed scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantSpec {
    /// Integer type of the quantized tensor.
    pub dtype: DType,
    /// Affine (zero point where 0.0 lands) or symmetric.
    pub scheme: QScheme,
    /// The integer range (full, PyTorch's `reduce_range`, or custom).
    pub range: QuantRange,
    /// Smallest scale (PyTorch: 2^-23).
    pub eps: f32,
}

impl QuantSpec {
    /// Activations as PyTorch quantizes them by default: `u8`, affine, full range.
    pub fn u8_affine() -> Self {
        QuantSpec { dtype: DType::U8, scheme: QScheme::Affine, range: QuantRange::full(DType::U8), eps: DEFAULT_EPS }
    }

    /// Weights as PyTorch quantizes them by default: `i8`, symmetric, full range.
    pub fn i8_symmetric() -> Self {
        QuantSpec { dtype: DType::I8, scheme: QScheme::Symmetric, range: QuantRange::full(DType::I8), eps: DEFAULT_EPS }
    }

    /// The same spec with PyTorch's `reduce_range` (one bit less).
    ///
    /// # Errors
    /// Symmetric `u8` with `reduce_range`, which PyTorch rejects too.
    pub fn reduce_range(self) -> Result<Self> {
        let spec = QuantSpec { range: QuantRange::reduced(self.dtype), ..self };
        spec.check()?;
        Ok(spec)
    }

    /// Checks that the range belongs to the dtype and the combination is supported.
    ///
    /// # Errors
    /// [`ObserveError::QParams`] naming the problem.
    pub fn check(&self) -> Result<()> {
        // Choosing from a trivial range exercises every option check of `choose_qparams`.
        choose_qparams(0.0, 1.0, self.dtype, self.scheme, self.range, self.eps.max(f32::EPSILON))?;
        Ok(())
    }

    /// Parameters for values observed in `[min, max]` ([`qtensor::choose_qparams`]).
    ///
    /// # Errors
    /// As [`qtensor::choose_qparams`].
    pub fn qparams(&self, min: f32, max: f32) -> Result<QParams, QError> {
        choose_qparams(min, max, self.dtype, self.scheme, self.range, self.eps)
    }

    /// Per-channel parameters ([`qtensor::choose_qparams_per_channel`]).
    ///
    /// # Errors
    /// As [`qtensor::choose_qparams_per_channel`].
    pub fn qparams_per_channel(&self, mins: &[f32], maxs: &[f32], axis: usize) -> Result<QParams, QError> {
        choose_qparams_per_channel(mins, maxs, axis, self.dtype, self.scheme, self.range, self.eps)
    }
}

/// Something that watches calibration data and decides a tensor's quantization parameters.
///
/// Object-safe: a model holds one `Box<dyn Observer>` per observed tensor, created by an
/// [`ObserverFactory`]. Implement it for your own method (own statistics, own rule); the
/// framework calls [`Observer::observe`] on every calibration batch, [`Observer::merge`] to
/// combine observers that watched different batches in parallel, and [`Observer::qparams`]
/// once at conversion.
///
/// ```
/// use std::any::Any;
/// use ndarray::ArrayViewD;
/// use qobserve::{Observer, ObserveError, QuantSpec};
/// use qtensor::QParams;
///
/// /// Symmetric i8 with a power-of-two scale: the smallest 2^k that covers max |x|.
/// #[derive(Clone, Debug, Default)]
/// struct PowerOfTwo { amax: Option<f32>, spec: Option<QuantSpec> }
///
/// impl Observer for PowerOfTwo {
///     fn kind(&self) -> &'static str { "PowerOfTwo" }
///     fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<(), ObserveError> {
///         let m = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
///         self.amax = Some(self.amax.map_or(m, |a| a.max(m)));
///         Ok(())
///     }
///     fn qparams(&self) -> Result<QParams, ObserveError> {
///         let amax = self.amax.ok_or(ObserveError::NoData { tensor: self.kind().into() })?;
///         let scale = (amax.max(f32::MIN_POSITIVE) / 127.0).log2().ceil().exp2();
///         Ok(QParams::per_tensor(scale, 0)?)
///     }
///     fn merge(&mut self, other: &dyn Observer) -> Result<(), ObserveError> {
///         let o = other.as_any().downcast_ref::<Self>()
///             .ok_or(ObserveError::Merge { reason: format!("{} with {}", self.kind(), other.kind()) })?;
///         if let Some(m) = o.amax { self.amax = Some(self.amax.map_or(m, |a| a.max(m))); }
///         Ok(())
///     }
///     fn spec(&self) -> QuantSpec { QuantSpec::i8_symmetric() }
///     fn as_any(&self) -> &dyn Any { self }
///     fn clone_box(&self) -> Box<dyn Observer> { Box::new(self.clone()) }
/// }
///
/// let mut obs: Box<dyn Observer> = Box::new(PowerOfTwo::default());
/// obs.observe(ndarray::array![0.3f32, -1.9, 0.7].view().into_dyn())?;
/// assert_eq!(obs.qparams()?.scale(0), 1.0 / 64.0); // 1.9 / 127 = 0.01496 -> 2^-6
/// # Ok::<(), ObserveError>(())
/// ```
pub trait Observer: Send + Sync + Debug {
    /// A short name of the method, for reports ("MinMax", "Histogram", ...).
    fn kind(&self) -> &'static str;

    /// Takes one calibration batch (any shape; per-channel observers need their axis).
    ///
    /// # Errors
    /// Non-finite values under [`NonFinite::Error`], or a batch without the channel axis.
    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()>;

    /// The parameters chosen from everything observed so far.
    ///
    /// # Errors
    /// [`ObserveError::NoData`] when nothing was observed.
    fn qparams(&self) -> Result<QParams>;

    /// Folds in the statistics of another observer of the same kind and configuration (that
    /// watched other batches), as if this one had seen them too.
    ///
    /// # Errors
    /// [`ObserveError::Merge`] for observers of another kind or configuration.
    fn merge(&mut self, other: &dyn Observer) -> Result<()>;

    /// Whether [`Observer::merge`] of observers that saw consecutive runs of batches gives
    /// exactly what one observer of all the batches would: then calibration may split batches
    /// between threads. `false` (the default) keeps every batch on one observer, in order,
    /// whatever the thread count (a histogram re-bins when it merges, a moving average
    /// depends on order).
    fn merges_exactly(&self) -> bool {
        false
    }

    /// The quantization target.
    fn spec(&self) -> QuantSpec;

    /// For [`Observer::merge`] implementations: downcasting the other observer.
    fn as_any(&self) -> &dyn Any;

    /// A copy, so the framework can fork an observer per worker thread.
    fn clone_box(&self) -> Box<dyn Observer>;

    /// The observed range so far (`(mins, maxs)`, one entry per channel), where the method has
    /// one; for reports and plots.
    fn observed_range(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        None
    }
}

impl Clone for Box<dyn Observer> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// Creates a fresh observer per observed tensor: how a configuration names an observer.
pub trait ObserverFactory: Send + Sync + Debug {
    /// A new, empty observer.
    fn create(&self) -> Box<dyn Observer>;
}

/// Rejects a batch with non-finite values under [`NonFinite::Error`].
pub(crate) fn check_finite(policy: NonFinite, kind: &str, x: &ArrayViewD<'_, f32>, s: &Scan) -> Result<()> {
    if s.nonfinite == 0 || policy == NonFinite::Ignore {
        return Ok(());
    }
    let (index, first) =
        x.iter().enumerate().find(|(_, v)| !v.is_finite()).map(|(i, v)| (i, *v)).unwrap_or((0, f32::NAN));
    Err(ObserveError::NonFiniteInput {
        tensor: kind.to_string(),
        shape: x.shape().to_vec(),
        count: s.nonfinite,
        first,
        index,
    })
}

/// A batch's values in the order they lie in memory, copied only if they are not contiguous:
/// for what does not depend on the order (ranges, histograms, counts).
pub(crate) fn in_memory_order<'a>(x: &'a ArrayViewD<'_, f32>) -> std::borrow::Cow<'a, [f32]> {
    match x.as_slice_memory_order() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => contiguous(x),
    }
}

/// The standard-layout data of a batch, copied only if it was not contiguous.
pub(crate) fn contiguous<'a>(x: &'a ArrayViewD<'_, f32>) -> std::borrow::Cow<'a, [f32]> {
    match x.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(x.iter().copied().collect()),
    }
}

/// Resolves a possibly negative channel axis against `ndim`.
pub(crate) fn resolve_axis(kind: &str, axis: isize, shape: &[usize]) -> Result<usize> {
    let nd = shape.len() as isize;
    let a = if axis < 0 { axis + nd } else { axis };
    if a < 0 || a >= nd {
        return Err(ObserveError::Shape {
            tensor: kind.to_string(),
            reason: format!(
                "channel axis {axis} does not exist in a batch of shape {shape:?}; use an axis in {}..{nd}",
                -nd
            ),
        });
    }
    Ok(a as usize)
}
