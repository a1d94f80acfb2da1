//! # qobserve: calibration observers
//!
//! **Status: created, not yet filled.** This crate will hold the `Observer` trait and the
//! built-in observers (min-max, moving average, per-channel, histogram, percentile, entropy,
//! MSE, fixed qparams). Every observer ends in [`qtensor::choose_qparams`], which already
//! reproduces PyTorch's `_calculate_qparams` bit for bit.

pub use qtensor::{choose_qparams, choose_qparams_per_channel};
