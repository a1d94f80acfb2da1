//! # qnn: write a float model once, quantize it by configuration
//!
//! A model is a [`Graph`] of layers run in `f32` on NCHW tensors: named values, and nodes in
//! execution order that compute them, with any number of inputs and outputs. Write it either
//! way:
//! - with containers: layers ([`layers`]), named [`Sequential`] containers, [`Residual`]
//!   blocks (`body + shortcut`, PyTorch's `FloatFunctional().add`) and [`Concat`] blocks
//!   (branches concatenated along channels), which lower into the graph;
//! - with [`GraphBuilder`], for any dataflow: `g.mul(x, g.layer("gate", Sigmoid, s)?)`
//!   (squeeze-and-excitation), skips across stages, several inputs and outputs.
//!
//! Nodes carry PyTorch's parameter names, so a `state_dict` saved as safetensors loads
//! unchanged ([`load_safetensors`]; every mismatch is listed at once). [`zoo`] has
//! ResNet-18/50, MobileNetV2, MobileNetV3-Large and EfficientNet-B0 with torchvision's names,
//! and the bundled digits model.
//!
//! Quantization is a transformation of that float model, in PyTorch eager mode's steps:
//!
//! 1. [`fuse()`] folds conv / linear + batch-norm (+ ReLU), conv / linear + ReLU and
//!    batch-norm + ReLU, found by itself (and [`prepare`] does it for you unless
//!    [`QConfigMapping::fusion`] is off) ([`fuse_graph`] for a graph; [`fuse_modules`]
//!    takes explicit names; a wrong name is an error listing the nearest ones).
//! 2. [`prepare`] attaches observers as a [`QConfigMapping`] says: a global
//!    [`qobserve::QConfig`], overrides per module type and per name (exact, prefix or glob),
//!    and "skip". Quantize / dequantize boundaries are placed automatically
//!    (`QuantStub` / `DeQuantStub` are accepted, never required).
//! 3. [`Prepared::calibrate`] runs float batches through it (in parallel over batches when
//!    the observers merge, with a progress bar on a terminal; [`Prepared::calibrate_inputs`]
//!    for a graph of several inputs).
//! 4. [`Prepared::convert`] gives a [`QuantizedModel`]: packed int8 weights, fused
//!    requantization, and float fallback (behind automatic boundaries) for whatever has no
//!    int8 kernel: an unfused batch-norm, a custom layer without [`Module::int8`]. Its
//!    [`QuantizedModel::plan`] says how every module runs and why.
//!
//! The converted model is immutable and `Send + Sync` (one instance serves many threads),
//! reuses its activation buffers between calls, saves to one safetensors file
//! ([`QuantizedModel::save`]), and reports per module the SQNR of its output and weights
//! against the float model ([`QuantizedModel::report`], [`report_json`]).
//!
//! ```
//! use qnn::{fuse, prepare, zoo, Module, QConfigMapping};
//! use qobserve::QConfig;
//! let mut model = zoo::digits();
//! qnn::load_safetensors(&mut model, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors"))?;
//! fuse(&mut model)?;
//! let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 1, 8, 8]), |i| (i[2] * 8 + i[3]) as f32 / 64.0);
//! let mut prepared = prepare(model, &QConfigMapping::new(QConfig::default()))?;
//! prepared.calibrate(&x)?;
//! let int8 = prepared.convert()?;
//! assert_eq!(int8.forward(&x)?.shape(), &[4, 10]);
//! # Ok::<(), qnn::NnError>(())
//! ```
//!
//! ## Your own method, your own layers
//! Nothing here asks you to rewrite a layer: the method is configuration.
//! - **Scale rule:** an observer of your own ([`qobserve::Observer`], named in a
//!   [`qobserve::QConfig`] by [`qobserve::ObserverSpec::Custom`]).
//! - **Mapping:** a quantizer ([`qobserve::Quantizer`]) on a configuration's activations or
//!   weights ([`qobserve::QConfig::with_activation_quantizer`],
//!   [`qobserve::QConfig::with_weight_quantizer`]), placed per module name or kind by
//!   [`QConfigMapping`]; model inputs are configured by their name or the kind `"input"`.
//!   Built in: affine, power-of-two scales, 2- to 8-bit ranges, per-group weights, log2 and
//!   codebooks ([`qobserve::quantizer`]).
//! - **Simulation:** [`Prepared::simulate`] runs the float model with every configured
//!   quantizer applied, custom layers included, to measure any method before converting.
//!   [`Prepared::convert`] runs int8 wherever the quantizers are affine; layers whose weight
//!   quantizer is not run in float on their quantized weights
//!   ([`FloatReason::SimulatedOnly`]); an activation quantizer that is not affine is an
//!   error naming the tensor.
//! - **Custom layers:** implement [`Module`]; give it [`Module::int8`] (which gets the
//!   module's name, configuration and parameters, and quantizes weights as configured through
//!   [`ops::LowerCx::quantize_weight`]) to run it in int8, or leave it out and it runs in
//!   float, reported. Register loaders ([`ops::register_layer`],
//!   [`ops::register_int8_layer`]) to save and load models that hold them.
//!
//! `tests/your_method.rs` does all of this on the digits model: a custom layer with and
//! without an int8 form, power-of-two scales, 4-bit per-group weights, a log2 grid, 4-bit
//! activations.
//!
//! It depends on [`qtensor`], [`qkernels`], [`qobserve`] and [`qfuse`]; none of them depends
//! on it.

mod bias;
mod config;
mod error;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod layers;
mod module;
pub mod ops;
pub mod plots;
mod quant;
mod saved;
mod scratch;
mod smooth;
mod state;
pub mod zoo;

pub use config::{PoolOutputs, QConfigMapping, ResidualStream, TableOutputs};
pub use error::{NnError, Result};
pub use fuse::{fuse, fuse_graph, fuse_modules, Fused};
pub use graph::{ElemType, Graph, GraphBuilder, Layout, Tensor, ValueInfo};
pub use module::{walk, Concat, FloatKernel, Int8Layer, Module, Residual, Sequential};
pub use quant::{
    prepare, report_json, sqnr_db, FloatReason, LayerReport, Mode, NodeTime, PlanEntry, Prepared, QuantizedModel,
    Value, DEFAULT_MAX_ACTIVATION_BYTES,
};
pub use scratch::release_thread_buffers;
pub use smooth::{smooth_quant, SmoothReport, Smoothed};
pub use state::{load_safetensors, load_safetensors_bytes, parameter_shapes, save_safetensors, state_dict_bytes};
pub use {qfuse, qkernels, qobserve, qtensor};
