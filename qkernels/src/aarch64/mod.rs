//! aarch64 kernels, one file per kernel family; every aarch64 CPU has NEON, `dotprod` and
//! `i8mm` add GEMM tiers. Each kernel is the twin of a scalar kernel in `generic` and is
//! reached only through the registry (`crate::registry`).

pub(crate) mod add;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod gemm;
pub(crate) mod lut;
