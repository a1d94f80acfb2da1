//! # qnn: write a float model once, quantize it by configuration
//!
//! **Status: the float side.** Models are trees of [`Module`]s (layers and named
//! [`Sequential`] containers) run in `f32` on NCHW tensors, with PyTorch's parameter names,
//! so a `state_dict` saved from PyTorch as safetensors loads unchanged
//! ([`load_safetensors`]), and every load mismatch is reported at once. The quantization
//! workflow (fuse, prepare, calibrate, convert, report) builds on this tree next.
//!
//! ```
//! use qnn::{zoo, Module};
//! let mut model = zoo::digits();
//! qnn::load_safetensors(&mut model, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors"))?;
//! let logits = model.forward(&ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 1, 8, 8])))?;
//! assert_eq!(logits.shape(), &[1, 10]);
//! # Ok::<(), qnn::NnError>(())
//! ```
//!
//! It depends on [`qtensor`], [`qkernels`], [`qobserve`] and [`qfuse`]; none of them depends
//! on it.

mod config;
mod error;
pub mod fuse;
pub mod layers;
mod module;
mod quant;
mod saved;
mod scratch;
mod state;
pub mod zoo;

pub use config::QConfigMapping;
pub use error::{NnError, Result};
pub use fuse::{fuse, fuse_modules, Fused};
pub use module::{walk, Concat, Int8Layer, Module, Residual, Sequential};
pub use quant::{prepare, report_json, sqnr_db, LayerReport, Mode, PlanEntry, Prepared, QuantizedModel, Value};
pub use state::{load_safetensors, load_safetensors_bytes, parameter_shapes};
pub use {qfuse, qkernels, qobserve, qtensor};
