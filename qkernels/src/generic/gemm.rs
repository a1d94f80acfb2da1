//! The scalar GEMM: plain dot products from the row-major weights.

use std::ops::Range;

use crate::frame::gemm::{QMatrix, Tile, TILE_ROWS};
use crate::frame::kernels::{Block, PackFor};
use crate::frame::pack::{Avx2Pairs, Packed, PackedWeights};

/// The scalar kernel reads the row-major weights: nothing to pack.
pub(crate) fn pack(_raw: &[i8], _n: usize, _k: usize, _purpose: PackFor) -> (Packed, Option<Avx2Pairs>) {
    (Packed::None, None)
}

pub(crate) fn name(_groups: &[PackedWeights]) -> String {
    "scalar".into()
}

/// No whole-block kernel: every block goes through tiles and the epilogue.
pub(crate) fn block(_b: &Block<'_>) -> bool {
    false
}

/// Raw sums of up to [`TILE_ROWS`] rows.
pub(crate) fn tile(
    a: &QMatrix<'_>,
    r0: usize,
    rows: usize,
    w: &PackedWeights,
    cols: Range<usize>,
    tile: &mut Tile,
) -> usize {
    let mr = rows.min(TILE_ROWS);
    for r in 0..mr {
        let row = &a.data[(r0 + r) * a.lda..(r0 + r) * a.lda + a.k];
        for (c, j) in cols.clone().enumerate() {
            let wr = &w.raw[j * w.k..(j + 1) * w.k];
            tile[r][c] = row.iter().zip(wr).fold(0i32, |s, (&x, &y)| s.wrapping_add(x as i32 * y as i32));
        }
    }
    mr
}
