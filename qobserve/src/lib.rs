//! # qobserve: calibration observers
//!
//! Observers watch calibration data and decide each tensor's scale and zero point. This
//! crate has PyTorch's (same statistics, same answers: golden-tested against PyTorch), more
//! methods than PyTorch ships, and the [`Observer`] trait for your own.
//!
//! ## Contents
//! 1. [Should I use this crate?](#should-i-use-this-crate)
//! 2. [Example](#example)
//! 3. [The observers](#the-observers)
//! 4. [Configurations](#configurations)
//! 5. [Quantizers](#quantizers)
//! 6. [Errors, NaN and parallel calibration](#errors-nan-and-parallel-calibration)
//!
//! ## Should I use this crate?
//! Use it on its own to compute quantization parameters for tensors you quantize yourself
//! (with [`qtensor`]). `qnn` uses it to calibrate whole models: there you name observers in a
//! [`QConfig`] instead of creating them.
//!
//! ## Example
//! ```
//! use qobserve::{MinMaxObserver, Observer, PercentileObserver, QuantSpec};
//!
//! // Activations in [0, 1) with one outlier: min-max spends the whole range on it; the
//! // 99.9th percentile clips it and keeps a step 50 times finer for everything else.
//! let mut x: Vec<f32> = (0..10_000).map(|i| (i % 100) as f32 / 100.0).collect();
//! x[7] = 50.0;
//! let x = ndarray::ArrayD::from_shape_vec(vec![100, 100], x).unwrap();
//! let mut minmax = MinMaxObserver::new(QuantSpec::u8_affine());
//! let mut pct = PercentileObserver::new(QuantSpec::u8_affine(), 99.9)?;
//! minmax.observe(x.view())?;
//! pct.observe(x.view())?;
//! assert_eq!(minmax.qparams()?.scale(0), 50.0 / 255.0);
//! assert!(pct.qparams()?.scale(0) < 1.01 / 255.0);
//! # Ok::<(), qobserve::ObserveError>(())
//! ```
//! (PyTorch's histogram search keeps that lone outlier too: it trims 1e-5 of the mass per
//! step and stops at the first step that raises the L2 error. [`HistogramObserver`] does the
//! same, on purpose.)
//!
//! ## The observers
//! | observer | statistic | range chosen | PyTorch |
//! |---|---|---|---|
//! | [`MinMaxObserver`] | running min, max | min..max | `MinMaxObserver` (bit-exact) |
//! | [`MinMaxObserver::moving_average`] | moving average of batch min, max | average | `MovingAverageMinMaxObserver` (bit-exact) |
//! | [`PerChannelMinMaxObserver`] | per-channel min, max (and moving average) | per channel | `PerChannelMinMaxObserver`, `MovingAveragePerChannelMinMaxObserver` (bit-exact) |
//! | [`HistogramObserver`] | 2048-bin running histogram | L2-error search over 256 levels | `HistogramObserver` (qparams bit-exact on the fixtures) |
//! | [`PercentileObserver`] | same histogram | the p-th percentile at each end | none |
//! | [`EntropyObserver`] | histogram of \|x\| | TensorRT's minimum KL divergence | none |
//! | [`MseObserver`] | same histogram | least expected squared quantization error | none |
//! | [`FixedQParamsObserver`] | none | fixed (sigmoid 1/256, tanh 2/256) | `FixedQParamsObserver` |
//!
//! Each turns its range into parameters through a [`QuantSpec`] (dtype, affine or symmetric,
//! range, eps) and [`qtensor::choose_qparams`], PyTorch's formula.
//!
//! ## Configurations
//! [`ObserverSpec`] names an observer in a configuration and creates one per tensor;
//! [`ObserverSpec::Custom`] takes your own [`ObserverFactory`]. A [`QConfig`] pairs an
//! activation observer with a weight observer; presets: [`QConfig::pytorch_x86`] (PyTorch
//! parity), [`QConfig::qnnpack`], [`QConfig::pytorch_minmax`], and [`QConfig::default`],
//! PyTorch's x86 configuration without `reduce_range`, which our exact kernels do not need.
//!
//! ## Quantizers
//! An observer proposes affine parameters; a [`Quantizer`] decides the mapping from them
//! (and, for weights, from the values): [`Affine`] (the default), [`PowerOfTwo`], [`Bits`]
//! (2 to 8 bits), [`PerGroup`] weights, [`Log2`] and [`Codebook`] (see [`quantizer`] for
//! which of them int8 kernels can run), or your own. A [`QConfig`] names one for its
//! activations and one for its weights.
//!
//! ## Errors, NaN and parallel calibration
//! Asking an observer that saw nothing for parameters is [`ObserveError::NoData`] (PyTorch
//! returns scale 1.0, zero point 0 with a warning); [`ObserveError::for_tensor`] names the
//! tensor. NaN or ±inf in a batch is [`ObserveError::NonFiniteInput`] unless the observer was
//! built with [`NonFinite::Ignore`]. Observers that watched different batches on different
//! threads combine with [`Observer::merge`]: exact for min-max and for histograms of the same
//! range; moving averages depend on batch order and refuse to merge.

// The x86-64 kernels are the only SIMD tiers so far: on other architectures their dispatch
// arms are compiled out, which leaves imports, variables and helpers that only those arms
// use. x86-64 builds lint all of it.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused_imports, unused_mut, unused_variables, dead_code))]

mod error;
mod fixed;
mod histogram;
mod minmax;
mod observer;
mod qconfig;
pub mod quantizer;
mod scan;

pub use error::{ObserveError, Result};
pub use fixed::FixedQParamsObserver;
pub use histogram::{EntropyObserver, HistogramCollector, HistogramObserver, MseObserver, PercentileObserver};
pub use minmax::{MinMaxObserver, PerChannelMinMaxObserver};
pub use observer::{NonFinite, Observer, ObserverFactory, QuantSpec};
pub use qconfig::{Dynamic, ObserverSpec, QConfig};
pub use qtensor::{choose_qparams, choose_qparams_per_channel};
pub use quantizer::{
    Affine, Bits, Codebook, Fitted, Log2, Observed, PerGroup, PowerOfTwo, Quantizer, SymmetricMse, SymmetricUnclipped,
};
