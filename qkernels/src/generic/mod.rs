//! The generic tier: a scalar reference for every kernel family (the twin every vector kernel
//! is tested against bit for bit), and the loops compiled per tier that the compiler
//! vectorises itself (`multiversion!`). Its table is the scalar tier's, and the start of
//! every other tier's (`crate::registry`).

pub(crate) mod add;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod fconv;
pub(crate) mod gemm;
pub(crate) mod lut;
pub(crate) mod min_max;
pub(crate) mod transpose;

use qtensor::isa::Isa;

use crate::frame::kernels::{AddKernel, DepthwiseKernels, F32Kernels, GemmKernels, Kernels};

/// The scalar tier's table.
pub(crate) fn kernels() -> Kernels {
    Kernels {
        isa: Isa::Scalar,
        gemm: GemmKernels {
            pack: gemm::pack,
            name: gemm::name,
            implicit_conv: false,
            block: gemm::block,
            tile: gemm::tile,
        },
        epilogue_u8: epilogue::requantize_row,
        depthwise: DepthwiseKernels {
            name: "scalar",
            pack: depthwise::pack,
            pixel: depthwise::pixel,
            run_inside: None,
            rows: None,
            flat_row: None,
        },
        add_u8: AddKernel { lanes: 1, run: add::add_u8 },
        lut: lut::lut,
        lookup_below: lut::lookup_below,
        min_max: min_max::min_max_lanes,
        transpose: transpose::transpose,
        f32: F32Kernels { tile: fconv::tile, depthwise_pixel: fconv::depthwise_pixel },
    }
}
