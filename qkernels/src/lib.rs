//! # qkernels: int8 CPU kernels
//!
//! Packed int8 GEMM with a fused requantization epilogue, and the layers built on it
//! (linear, conv2d). Activations are `u8` with a zero point, weights `i8` (per-tensor or
//! per-channel, symmetric or not), accumulation exact in `i32`, output `u8` requantized
//! exactly as PyTorch's FBGEMM does it (or `i32` / `f32` on request).
//!
//! Every kernel has a scalar twin; the SIMD versions (AVX-512 VNNI, AVX2) are chosen at run
//! time through [`qtensor::isa`] and tested bit for bit against the scalar one.

// Kernels index several parallel arrays (rows x vectors) by the same counters; iterator
// chains would hide the tile structure the loops spell out.
#![allow(clippy::needless_range_loop)]

mod conv;
mod float;
mod gemm;
mod pack;
pub mod peak;
mod threads;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use conv::{quantize_weights_per_channel, Conv2dGeometry, PackedConv2d, QImage};
pub use float::{conv2d_f32, linear_f32};
pub use gemm::{gemm, requantize_scalar, Activation, GemmOutput, OutputQuant, QMatrix};
pub use pack::{PackedWeights, MAX_K};
pub use qtensor::isa;
