//! Naming observers in a configuration, and the presets.

use std::sync::Arc;

use qtensor::{DType, QScheme, QuantRange, DEFAULT_EPS};

use crate::error::{ObserveError, Result};
use crate::fixed::FixedQParamsObserver;
use crate::histogram::{EntropyObserver, HistogramObserver, MseObserver, PercentileObserver};
use crate::minmax::{MinMaxObserver, PerChannelMinMaxObserver};
use crate::observer::{NonFinite, Observer, ObserverFactory, QuantSpec};
use crate::quantizer::Quantizer;

/// An observer named by configuration; [`ObserverSpec::create`] makes one per observed tensor.
#[derive(Clone, Debug)]
pub enum ObserverSpec {
    /// [`MinMaxObserver`].
    MinMax(QuantSpec),
    /// [`MinMaxObserver::moving_average`].
    MovingAverageMinMax {
        /// Target.
        spec: QuantSpec,
        /// Averaging constant (PyTorch: 0.01).
        averaging: f32,
    },
    /// [`PerChannelMinMaxObserver`].
    PerChannelMinMax {
        /// Target.
        spec: QuantSpec,
        /// Channel axis (negative counts from the end).
        axis: isize,
    },
    /// [`PerChannelMinMaxObserver::moving_average`].
    MovingAveragePerChannelMinMax {
        /// Target.
        spec: QuantSpec,
        /// Channel axis.
        axis: isize,
        /// Averaging constant.
        averaging: f32,
    },
    /// [`HistogramObserver`].
    Histogram {
        /// Target.
        spec: QuantSpec,
        /// Bins (PyTorch: 2048).
        bins: usize,
    },
    /// [`PercentileObserver`].
    Percentile {
        /// Target.
        spec: QuantSpec,
        /// E.g. 99.99.
        percentile: f64,
    },
    /// [`EntropyObserver`].
    Entropy(QuantSpec),
    /// [`MseObserver`].
    Mse(QuantSpec),
    /// [`FixedQParamsObserver`].
    FixedQParams {
        /// Scale.
        scale: f32,
        /// Zero point.
        zero_point: i32,
    },
    /// Your own observer.
    Custom(Arc<dyn ObserverFactory>),
    /// The observer `spec` builds, skipping NaN and ±inf instead of refusing the batch
    /// ([`NonFinite::Ignore`]); min-max, moving-average, per-channel and histogram observers
    /// can.
    IgnoreNonFinite(Box<ObserverSpec>),
}

impl ObserverSpec {
    /// A fresh observer.
    ///
    /// # Errors
    /// An invalid configuration (e.g. an averaging constant outside `(0, 1]`).
    pub fn create(&self) -> Result<Box<dyn Observer>> {
        Ok(match self {
            ObserverSpec::MinMax(s) => Box::new(MinMaxObserver::new(*s)),
            ObserverSpec::MovingAverageMinMax { spec, averaging } => {
                Box::new(MinMaxObserver::moving_average(*spec, *averaging)?)
            }
            ObserverSpec::PerChannelMinMax { spec, axis } => Box::new(PerChannelMinMaxObserver::new(*spec, *axis)),
            ObserverSpec::MovingAveragePerChannelMinMax { spec, axis, averaging } => {
                Box::new(PerChannelMinMaxObserver::moving_average(*spec, *axis, *averaging)?)
            }
            ObserverSpec::Histogram { spec, bins } => Box::new(HistogramObserver::with_bins(*spec, *bins)?),
            ObserverSpec::Percentile { spec, percentile } => Box::new(PercentileObserver::new(*spec, *percentile)?),
            ObserverSpec::Entropy(s) => Box::new(EntropyObserver::new(*s)?),
            ObserverSpec::Mse(s) => Box::new(MseObserver::new(*s)?),
            ObserverSpec::FixedQParams { scale, zero_point } => {
                Box::new(FixedQParamsObserver::new(*scale, *zero_point)?)
            }
            ObserverSpec::Custom(f) => f.create(),
            ObserverSpec::IgnoreNonFinite(inner) => {
                let ignore = NonFinite::Ignore;
                match inner.as_ref() {
                    ObserverSpec::MinMax(s) => Box::new(MinMaxObserver::new(*s).with_non_finite(ignore)),
                    ObserverSpec::MovingAverageMinMax { spec, averaging } => {
                        Box::new(MinMaxObserver::moving_average(*spec, *averaging)?.with_non_finite(ignore))
                    }
                    ObserverSpec::PerChannelMinMax { spec, axis } => {
                        Box::new(PerChannelMinMaxObserver::new(*spec, *axis).with_non_finite(ignore))
                    }
                    ObserverSpec::MovingAveragePerChannelMinMax { spec, axis, averaging } => Box::new(
                        PerChannelMinMaxObserver::moving_average(*spec, *axis, *averaging)?.with_non_finite(ignore),
                    ),
                    ObserverSpec::Histogram { spec, bins } => {
                        Box::new(HistogramObserver::with_bins(*spec, *bins)?.with_non_finite(ignore))
                    }
                    other => {
                        return Err(ObserveError::Config {
                            reason: format!(
                                "ObserverSpec::IgnoreNonFinite wraps min-max, moving-average, per-channel or \
                                 histogram observers, not {other:?}: clean the calibration data instead"
                            ),
                        })
                    }
                }
            }
        })
    }

    /// Whether the observer yields one scale per channel.
    pub fn is_per_channel(&self) -> bool {
        match self {
            ObserverSpec::IgnoreNonFinite(inner) => inner.is_per_channel(),
            s => {
                matches!(s, ObserverSpec::PerChannelMinMax { .. } | ObserverSpec::MovingAveragePerChannelMinMax { .. })
            }
        }
    }
}

/// How a layer is quantized: an observer for its output activations and one for its
/// weights, each followed by a quantizer, the mapping itself ([`Quantizer`]; `None`: the
/// observer's affine parameters as they are, [`crate::Affine`]).
///
/// ```
/// use qobserve::{PowerOfTwo, QConfig};
/// // The default observers, with power-of-two scales on activations and weights.
/// let q = QConfig::default().with_activation_quantizer(PowerOfTwo).with_weight_quantizer(PowerOfTwo);
/// assert!(q.weight_quantizer.is_some());
/// ```
#[derive(Clone, Debug)]
pub struct QConfig {
    /// Observer of activations (layer outputs, model inputs).
    pub activation: ObserverSpec,
    /// Observer of weights.
    pub weight: ObserverSpec,
    /// Quantizer of activations, fitted to the activation observer's parameters.
    pub activation_quantizer: Option<Arc<dyn Quantizer>>,
    /// Quantizer of weights, fitted to the weight observer's parameters and the weights.
    pub weight_quantizer: Option<Arc<dyn Quantizer>>,
    /// Dynamic quantization: layers that have a dynamic form (linear layers) quantize their
    /// input at run time from its own range and give float output; no calibration is needed
    /// for them, and the activation observer is not used. Other layers run in float.
    pub dynamic: Option<Dynamic>,
}

/// How a dynamically quantized layer quantizes its input on each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dynamic {
    /// One scale and zero point for the whole input. `reduce_range` (codes 0..=127) is what
    /// PyTorch's `quantize_dynamic` uses on x86.
    PerTensor {
        /// Codes 0..=127 instead of 0..=255.
        reduce_range: bool,
    },
    /// One scale and zero point per row (token).
    PerToken {
        /// Codes 0..=127 instead of 0..=255 (on CPUs with AVX2 but not AVX-512 VNNI, the
        /// int8 products then run about 1.5x as fast, at half the resolution).
        reduce_range: bool,
    },
}

fn u8_affine(range: QuantRange) -> QuantSpec {
    QuantSpec { dtype: DType::U8, scheme: QScheme::Affine, range, eps: DEFAULT_EPS }
}

impl QConfig {
    /// These observers, with affine quantizers.
    pub fn new(activation: ObserverSpec, weight: ObserverSpec) -> Self {
        QConfig { activation, weight, activation_quantizer: None, weight_quantizer: None, dynamic: None }
    }

    /// PyTorch's `default_dynamic_qconfig` (what `quantize_dynamic` uses for `nn.Linear`):
    /// per-tensor symmetric `i8` weights, the input quantized per call over `u8` 0..=127.
    /// Bit-exact with `torch.ao.nn.quantized.dynamic.Linear`.
    pub fn pytorch_dynamic() -> Self {
        QConfig {
            dynamic: Some(Dynamic::PerTensor { reduce_range: true }),
            ..QConfig::new(
                ObserverSpec::MinMax(QuantSpec::u8_affine()),
                ObserverSpec::MinMax(QuantSpec::i8_symmetric()),
            )
        }
    }

    /// PyTorch's `per_channel_dynamic_qconfig`: as [`QConfig::pytorch_dynamic`] with
    /// per-channel symmetric weights.
    pub fn pytorch_dynamic_per_channel() -> Self {
        QConfig {
            weight: ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
            ..QConfig::pytorch_dynamic()
        }
    }

    /// Dynamic quantization with per-channel weights and the input quantized per row (token)
    /// over the full `u8` range: an outlier token costs the others nothing.
    pub fn dynamic_per_token() -> Self {
        QConfig { dynamic: Some(Dynamic::PerToken { reduce_range: false }), ..QConfig::pytorch_dynamic_per_channel() }
    }

    /// [`QConfig::dynamic_per_token`] over codes 0..=127, as PyTorch's dynamic quantization
    /// reduces its range on x86: on CPUs with AVX2 but not AVX-512 VNNI the linear layers'
    /// products then sum in 16-bit pairs (about 1.5x as fast there), for half the resolution
    /// per token. Elsewhere it only costs accuracy.
    pub fn dynamic_per_token_reduced() -> Self {
        QConfig { dynamic: Some(Dynamic::PerToken { reduce_range: true }), ..QConfig::pytorch_dynamic_per_channel() }
    }

    /// The same configuration with `q` mapping its activations.
    pub fn with_activation_quantizer(mut self, q: impl Quantizer + 'static) -> Self {
        self.activation_quantizer = Some(Arc::new(q));
        self
    }

    /// The same configuration with `q` mapping its weights.
    pub fn with_weight_quantizer(mut self, q: impl Quantizer + 'static) -> Self {
        self.weight_quantizer = Some(Arc::new(q));
        self
    }

    /// PyTorch's `get_default_qconfig("x86")` (and "fbgemm"): histogram activations in `u8`
    /// with `reduce_range` (0..=127), per-channel symmetric `i8` weights. Use it to reproduce
    /// PyTorch's results.
    pub fn pytorch_x86() -> Self {
        QConfig::new(
            ObserverSpec::Histogram { spec: u8_affine(QuantRange::reduced(DType::U8)), bins: 2048 },
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
        )
    }

    /// PyTorch's `get_default_qconfig("qnnpack")`: histogram activations over the full `u8`
    /// range, per-tensor symmetric `i8` weights.
    pub fn qnnpack() -> Self {
        QConfig::new(
            ObserverSpec::Histogram { spec: u8_affine(QuantRange::full(DType::U8)), bins: 2048 },
            ObserverSpec::MinMax(QuantSpec::i8_symmetric()),
        )
    }

    /// PyTorch's x86 eager configuration with min-max activations
    /// (`QConfig(MinMaxObserver(reduce_range=True), default_per_channel_weight_observer)`):
    /// min-max activations over `u8` 0..=127, per-channel symmetric `i8` weights.
    pub fn pytorch_per_channel_minmax() -> Self {
        QConfig::new(
            ObserverSpec::MinMax(u8_affine(QuantRange::reduced(DType::U8))),
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
        )
    }

    /// Activations by the MSE-optimal clipping range of their histogram ([`MseObserver`]) over
    /// the full `u8` range, per-channel symmetric `i8` weights.
    pub fn mse() -> Self {
        QConfig::new(
            ObserverSpec::Mse(u8_affine(QuantRange::full(DType::U8))),
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
        )
    }

    /// Activations clipped at the `percentile`-th percentile of their magnitudes
    /// ([`PercentileObserver`], e.g. 99.99) over the full `u8` range, per-channel symmetric
    /// `i8` weights.
    pub fn percentile(percentile: f64) -> Self {
        QConfig::new(
            ObserverSpec::Percentile { spec: u8_affine(QuantRange::full(DType::U8)), percentile },
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
        )
    }

    /// PyTorch's eager `default_qconfig`: min-max activations over `u8` 0..=127, per-tensor
    /// symmetric weights.
    pub fn pytorch_minmax() -> Self {
        QConfig::new(
            ObserverSpec::MinMax(u8_affine(QuantRange::reduced(DType::U8))),
            ObserverSpec::MinMax(QuantSpec::i8_symmetric()),
        )
    }
}

/// qrust's default: PyTorch's x86 configuration **without** `reduce_range`.
///
/// PyTorch halves the activation range on x86 because FBGEMM's AVX2 kernels multiply `u8`
/// by `i8` with `vpmaddubsw`, whose 16-bit pair sums saturate for 8-bit activations. Our
/// kernels are exact on every instruction set (`vpdpbusd` on AVX-512 VNNI, 16-bit products
/// widened with `vpmaddwd` on AVX2), so the eighth bit is free: every activation keeps twice
/// the resolution. On the demo's long-tailed activations that is 6 dB of SQNR
/// (`cargo xtask demo`).
impl Default for QConfig {
    fn default() -> Self {
        QConfig::new(
            ObserverSpec::Histogram { spec: u8_affine(QuantRange::full(DType::U8)), bins: 2048 },
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
        )
    }
}
