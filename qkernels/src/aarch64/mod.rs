//! aarch64 kernels, one file per kernel family; every aarch64 CPU has NEON, `dotprod` and
//! `i8mm` add GEMM tiers. Each kernel is the twin of a scalar kernel in `generic` and is
//! reached only through the registry (`crate::registry`).

pub(crate) mod add;
pub(crate) mod depthwise;
pub(crate) mod epilogue;
pub(crate) mod gemm;
pub(crate) mod lut;

use std::ops::Range;

use qtensor::isa::Isa;

use crate::frame::gemm::{Plan, QMatrix, Tile};
use crate::frame::kernels::{AddKernel, DwPacked, DwWeights, Kernels, PackFor};
use crate::frame::pack::{pack_vnni, Avx2Pairs, Packed, PackedWeights};
use gemm::{pack_mmla, pack_neon, ARM_LANES};

// Every entry below runs only from a table of an aarch64 tier, which the registry builds only
// on a CPU that has it; NEON is on every aarch64 CPU. That is the precondition of each
// `unsafe` kernel here.

/// Overrides `k`'s entries with the aarch64 kernels of the tiers `isa` includes: NEON's for
/// every family, then the GEMM of `dotprod` and `i8mm`. `isa` is supported by this CPU.
pub(crate) fn register(k: &mut Kernels, isa: Isa) {
    if isa.includes(Isa::Neon) {
        k.gemm.pack = |raw, n, kk, _| (Packed::Neon(pack_neon(raw, n, kk)), None);
        k.gemm.name = |_| "neon: smlal (widened to i16)".into();
        k.gemm.tile = tile;
        k.epilogue_u8 = requantize_row;
        k.depthwise.name = "neon: per pixel, smlal";
        k.depthwise.pack =
            |taps| Some(DwPacked::I16(depthwise::pack_depthwise_neon(&taps.raw, &taps.zero_points, taps.n, taps.k)));
        k.depthwise.pixel = depthwise_pixel;
        k.add_u8 = AddKernel { lanes: 16, run: add::add_u8_neon };
        k.lut = lut;
    }
    if isa.includes(Isa::Dotprod) {
        k.gemm.pack = pack_dot;
        k.gemm.name = |_| "dotprod: sdot on the inputs' top bit flipped, corrected per column".into();
    }
    if isa.includes(Isa::I8mm) {
        k.gemm.pack = |raw, n, kk, _| (Packed::Mmla(pack_mmla(raw, n, kk)), None);
        k.gemm.name = |_| "i8mm: usmmla".into();
    }
}

/// The VNNI layout, and `128 * Σw` per column (the accumulators' start, which undoes the
/// flip of the activations' top bit).
fn pack_dot(raw: &[i8], n: usize, k: usize, _purpose: PackFor) -> (Packed, Option<Avx2Pairs>) {
    let mut shift = vec![0i32; n.next_multiple_of(ARM_LANES)];
    for (j, s) in shift.iter_mut().take(n).enumerate() {
        *s = 128 * raw[j * k..(j + 1) * k].iter().map(|&w| w as i32).sum::<i32>();
    }
    (Packed::Dot { w: pack_vnni(raw, n, k), shift }, None)
}

/// Raw sums of as many rows as the packing's strip takes.
///
/// # Safety
/// As `GemmKernels::tile`.
unsafe fn tile(a: &QMatrix<'_>, r0: usize, rows: usize, w: &PackedWeights, cols: Range<usize>, t: &mut Tile) -> usize {
    let mr = rows.min(gemm::tile_rows(&w.packed));
    // SAFETY: the tier was supported when the table was built; rows, columns (from a
    // 16-column panel boundary) and `mr` as the caller promised.
    unsafe { gemm::arm_tile(a, r0, mr, &w.packed, w.k, cols.start / ARM_LANES, cols.len(), t) };
    mr
}

/// The NEON epilogue, the tail through the scalar reference.
///
/// # Safety
/// As `Kernels::epilogue_u8`.
unsafe fn requantize_row(plan: &Plan, acc: &[i32], rowsum: i32, j0: usize, out: &mut [u8]) {
    // SAFETY: NEON is on every aarch64 CPU; forwarded preconditions.
    let done = unsafe { epilogue::epilogue_u8_neon(plan, acc, rowsum, j0, out) };
    crate::generic::epilogue::requantize_row(plan, &acc[done..], rowsum, j0 + done, &mut out[done..]);
}

/// The NEON depthwise sums, then the NEON epilogue.
///
/// # Safety
/// As `DepthwiseKernels::pixel`.
unsafe fn depthwise_pixel(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, acc: &mut [i32], px: &mut [u8]) {
    let DwPacked::I16(packed) = w.packed else { unreachable!("packed by the NEON entry") };
    // SAFETY: NEON is on every aarch64 CPU; forwarded preconditions.
    unsafe {
        depthwise::depthwise_neon_pixel(taps, c, packed, acc);
        requantize_row(w.plan, &acc[..c], 0, 0, px);
    }
}

/// The four-`tbl` lookup, the tail a byte at a time.
fn lut(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    // SAFETY: NEON is on every aarch64 CPU.
    let done = unsafe { lut::lut_neon(table, x, out) };
    crate::generic::lut::lut(table, &x[done..], &mut out[done..]);
}
