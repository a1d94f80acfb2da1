//! The frame: the drivers (GEMM blocks and threads, convolution geometry and im2col, the
//! element-wise ops' loops), plans, packing, and the basic types (`QMatrix`, `QImage`,
//! `QuantU8`). It reaches architecture kernels only through the registry.

pub(crate) mod aligned;
pub(crate) mod conv;
pub(crate) mod fconv;
pub(crate) mod float;
pub(crate) mod fmath;
pub(crate) mod gemm;
pub(crate) mod kernels;
pub(crate) mod linear;
pub(crate) mod ops;
pub(crate) mod pack;
pub(crate) mod pool;
