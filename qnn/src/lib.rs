//! # qnn: write a float model once, quantize it by configuration
//!
//! **Status: created, not yet filled.** This crate will hold the float module API, the
//! fuse / prepare / calibrate / convert workflow and the numeric report. It is the only crate
//! that sees the others together: it depends on [`qtensor`], [`qkernels`], [`qobserve`] and
//! [`qfuse`], and none of them depends on it.

pub use {qfuse, qkernels, qobserve, qtensor};
