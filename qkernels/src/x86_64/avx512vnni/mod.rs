//! The AVX-512 VNNI tier (AVX-512 F/BW/VL and VNNI; the lookup table also needs VBMI).

pub(crate) mod add;
pub(crate) mod conv_rows;
pub(crate) mod depthwise;
pub(crate) mod fconv;
pub(crate) mod gemm;
pub(crate) mod lut;
pub(crate) mod min_max;
