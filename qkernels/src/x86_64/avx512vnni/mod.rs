//! The AVX-512 VNNI tier (AVX-512 F/BW/VL and VNNI; the lookup table also needs VBMI).

pub(crate) mod add;
pub(crate) mod conv_rows;
pub(crate) mod depthwise;
pub(crate) mod fconv;
pub(crate) mod gemm;
pub(crate) mod lut;
pub(crate) mod min_max;

use std::ops::Range;

use crate::frame::gemm::{QMatrix, Rows, SinkKind, Tile, MC};
use crate::frame::kernels::{AddKernel, Block, Kernels, PackFor};
use crate::frame::pack::{pack_vnni, Avx2Pairs, Packed, PackedWeights, VNNI_LANES};
use crate::x86_64::FusedOut;

// Every entry below runs only from the AVX-512 VNNI tier's table, which the registry builds
// only on a CPU with AVX-512 F/BW/VL and VNNI (and AVX2 and FMA): the precondition of each
// `unsafe` kernel here. The lookup table also needs VBMI, checked when it registers.

/// The AVX-512 VNNI tier's entries, over the AVX2 tier's.
pub(super) fn register(k: &mut Kernels) {
    k.gemm.pack = pack;
    k.gemm.name = |_| "avx512vnni: vpdpbusd".into();
    k.gemm.implicit_conv = true;
    k.gemm.block = block;
    k.gemm.tile = tile;
    k.depthwise.name = "avx512vnni: per pixel";
    k.depthwise.pack = depthwise::pack;
    k.depthwise.pixel = depthwise::pixel;
    k.depthwise.run_inside = None;
    k.depthwise.rows = Some(depthwise::ROWS);
    k.depthwise.flat_row = Some(depthwise::depthwise_vnni_flat_row);
    k.add_u8 = AddKernel { lanes: 16, run: add::add_u8_avx512 };
    if is_x86_feature_detected!("avx512vbmi") {
        k.lut = lut::lut;
    }
    k.lookup_below = lut::lookup_below;
    k.min_max = min_max::min_max;
    k.f32.tile = fconv::tile_avx512;
    k.f32.depthwise_pixel = fconv::depthwise_pixel;
}

fn pack(raw: &[i8], n: usize, k: usize, _purpose: PackFor) -> (Packed, Option<Avx2Pairs>) {
    (Packed::Vnni(pack_vnni(raw, n, k)), None)
}

/// `u8` output from any rows (dense, or a convolution read in place) and `f32` output from
/// dense rows, straight from the accumulators: all the block's rows in one call.
///
/// # Safety
/// As `GemmKernels::block`.
pub(super) unsafe fn block(b: &Block<'_>) -> bool {
    let Packed::Vnni(p) = &b.w.packed else { unreachable!("VNNI blocks read VNNI packings") };
    let fused = FusedOut::of(b);
    let panel0 = b.cols.start / VNNI_LANES;
    match (b.kind, b.src) {
        // SAFETY: AVX-512 VNNI (the table's tier); rows `rows` and columns `cols` lie inside
        // the rows, `p` and the output, as the driver's checks established; this task is the
        // only writer of those output elements.
        (SinkKind::U8, Rows::Dense(a)) => unsafe { gemm::vnni_dense_rows(&fused, a, b.rows.len(), p, b.w.k, panel0) },
        (SinkKind::U8, Rows::Conv(conv)) => {
            let mut bases = [std::ptr::null::<u8>(); MC];
            let bases = &mut bases[..b.rows.len()];
            conv.bases_into(b.rows.start, bases);
            // SAFETY: as above; every row's kh segments of `seg + tail` bytes, `row_step`
            // apart from its base, lie inside the padded image (the output size was derived
            // from it, and a padded segment's slack is part of it), and `gemm_conv` checked
            // the layout.
            unsafe {
                conv_rows::vnni_conv_rows(
                    &fused,
                    bases,
                    conv.kh,
                    conv.seg,
                    conv.tail,
                    conv.row_step(),
                    p,
                    b.w.k,
                    panel0,
                )
            }
        }
        // SAFETY: as for `u8` output, the output holding `f32` values (`ldc` in values);
        // per-row parameters cover every row of A, and the column offsets every column.
        (SinkKind::F32 { relu }, Rows::Dense(a)) => unsafe {
            gemm::vnni_dense_rows_f32(&fused, a, b.rows.len(), p, b.w.k, panel0, relu, b.per_row)
        },
        _ => return false,
    }
    true
}

/// Raw sums of up to 6 rows.
///
/// # Safety
/// As `GemmKernels::tile`.
unsafe fn tile(a: &QMatrix<'_>, r0: usize, rows: usize, w: &PackedWeights, cols: Range<usize>, t: &mut Tile) -> usize {
    let Packed::Vnni(p) = &w.packed else { unreachable!("VNNI tiles read VNNI packings") };
    let mr = rows.min(6);
    // SAFETY: AVX-512 VNNI (the table's tier); operands as the caller promised.
    unsafe { gemm::vnni_tile(a, r0, mr, p, w.k, cols.start / VNNI_LANES, cols.len(), t) };
    mr
}
