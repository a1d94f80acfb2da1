//! The AVX2 tier (AVX2 and FMA).

pub(crate) mod add;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod fconv;
pub(crate) mod gemm;
