//! # qkernels: int8 CPU kernels
//!
//! **Status: created, not yet filled.** This crate will hold the packed int8 GEMM, linear and
//! conv2d (including depthwise), elementwise, pooling and activation kernels, each with a
//! scalar reference twin and runtime-dispatched SIMD paths. It builds on [`qtensor`] and
//! already shares its ISA selection ([`qtensor::isa`]), so that one environment variable
//! forces one instruction set for the whole workspace.
//!
//! Until the kernels land, nothing here is public API.

pub use qtensor::isa;
