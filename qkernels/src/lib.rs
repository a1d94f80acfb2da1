//! # qkernels: int8 CPU kernels
//!
//! The compute under an int8 model: a packed `u8 x i8` GEMM with exact `i32` accumulation and
//! a fused requantization epilogue, and the layers built on it: [`PackedLinear`] and
//! [`PackedConv2d`] (1x1 convolutions as a plain GEMM over the NHWC input, k x k through a
//! chunked im2col, grouped, and depthwise with its own kernel). Plus `f32` twins of linear
//! and conv2d ([`linear_f32`], [`conv2d_f32`]) for layers that stay in float.
//!
//! ## Contents
//! 1. [Should I use this crate?](#should-i-use-this-crate)
//! 2. [Example](#example)
//! 3. [Numerics](#numerics)
//! 4. [Instruction sets and threads](#instruction-sets-and-threads)
//! 5. [Main types](#main-types)
//!
//! ## Should I use this crate?
//! Use it directly when you already have quantized tensors ([`qtensor`]) and want fast,
//! exact int8 linear and convolution layers. To quantize a whole model from float, use `qnn`,
//! which drives these kernels.
//!
//! ## Example
//! A 3x3 convolution with per-channel weights, fused ReLU, on a 1x8x8x4 NHWC input:
//! ```
//! use qkernels::{quantize_weights_per_channel, Activation, Conv2dGeometry, OutputQuant, PackedConv2d, QImage};
//!
//! let w = ndarray::Array4::from_shape_fn((16, 3, 3, 4), |(o, y, x, c)| ((o + y + x + c) % 5) as f32 * 0.1 - 0.2);
//! let wq = quantize_weights_per_channel(&w.view().into_dyn())?;
//! let geom = Conv2dGeometry { padding: [1, 1], ..Default::default() };
//! let conv = PackedConv2d::new(&wq, Some(&[0.1; 16]), geom)?;
//!
//! let x = vec![128u8; 8 * 8 * 4];
//! let img = QImage { data: &x, n: 1, h: 8, w: 8, c: 4, scale: 0.02, zero_point: 128 };
//! let (oh, ow) = conv.output_hw(8, 8)?;
//! let mut y = vec![0u8; oh * ow * 16];
//! conv.forward_u8(&img, OutputQuant { scale: 0.05, zero_point: 0, activation: Activation::Relu }, &mut y, 1)?;
//! // The input is all zero (q == zero point), so every output is the bias: 0.1 / 0.05 = 2.
//! assert!(y.iter().all(|&v| v == 2));
//! # Ok::<(), qtensor::QError>(())
//! ```
//!
//! ## Numerics
//! Inputs `u8` with a zero point, weights `i8` (per-tensor or per-output-channel, symmetric or
//! not), products summed exactly in `i32` (no 16-bit saturation on any path: AVX-512 uses
//! `vpdpbusd`; AVX2 uses `vpmaddubsw` only where the weights cannot saturate it for the
//! tile's inputs, else widens to i16 pairs and `vpmaddwd`; aarch64 uses `sdot`, `usmmla` or
//! widening `smlal`), for K up to [`MAX_K`]. The epilogue is
//! PyTorch's FBGEMM formula, in `f32`, in its order, without FMA:
//! `raw = Σ (a - za)(w - zw)`, `out = round_half_even((raw + bias / (sa * sw)) * (sa * sw / so)) + zo`,
//! clamped to `[0, 255]` (to `[zo, ..]` with fused ReLU, also to `q(6)` with ReLU6). The
//! scalar function [`requantize_scalar`] is that formula; every vector path equals it bit for
//! bit, and golden tests compare with fixtures PyTorch wrote.
//!
//! ## Instruction sets and threads
//! Weights are packed for the tier [`qtensor::isa::selected`] picks (AVX-512 VNNI, AVX2;
//! on aarch64 i8mm, dotprod, NEON; or scalar; `QUANT_FORCE_ISA` caps it; [`registry::tiers`]
//! lists them), and run by the kernels of that tier's table; every kernel has a scalar twin and the test suite
//! compares them bit for bit on random shapes. `threads` arguments split the work over a
//! cached rayon pool of that size; results are bit-identical for every thread count.
//!
//! ## Main types
//! - [`PackedWeights`]: `[N, K]` int8 weights in the micro-kernel's layout, with column sums.
//! - [`QMatrix`], [`QImage`]: borrowed `u8` activations (row-major / NHWC) with their
//!   quantization.
//! - [`gemm`] with [`GemmOutput`] (`u8` requantized with [`OutputQuant`], exact `i32`, or
//!   `f32`).
//! - [`PackedLinear`], [`PackedConv2d`] with [`Conv2dGeometry`].
//! - [`peak`]: this machine's measured int8 and f32 ceilings.

// Kernels index several parallel arrays (rows x vectors) by the same counters; iterator
// chains would hide the tile structure the loops spell out.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod frame;
mod generic;
pub mod peak;
pub mod registry;
mod threads;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use frame::conv::{quantize_weights_per_channel, Conv2dGeometry, PackedConv2d, QImage};
pub use frame::fconv::{PackedConv2dF32, WeightLayout};
pub use frame::float::{
    conv2d_f32, conv2d_f32_with, linear_f32, matmul_f32, matmul_f32_bt, matmul_f32_bt_with, matmul_f32_with,
};
pub use frame::fmath::{exp_f32, gelu_f32, gelu_in_place, layer_norm_in_place, softmax_in_place};
pub use frame::gemm::{bias_operands, gemm, requantize_scalar, Activation, BiasForm, GemmOutput, OutputQuant, QMatrix};
pub use frame::linear::{DynamicActivations, PackedLinear};
pub use frame::ops::{
    add, add_isa, add_scalar, batch_norm2d, cat_channels, dequantize_nhwc_to_nchw, flatten_nchw_order, layer_norm, mul,
    mul_channels, mul_scalar, quantize_nchw_to_nhwc, requantize_from_int, requantize_product, softmax_u8, transpose_u8,
    transpose_u8_isa, vector_prefix, Lut, QuantU8, ResidualAdd, UnaryOp, UnaryTables,
};
pub use frame::pack::{PackedWeights, MAX_K};
pub use frame::pool::{
    adaptive_avg_pool2d, adaptive_avg_pool2d_with, avg_pool2d, avg_pool2d_with, max_pool2d, max_pool2d_threads,
    max_pool2d_with, upsample_nearest, Pool2d,
};
pub use qtensor::isa;
pub use threads::with_threads;
