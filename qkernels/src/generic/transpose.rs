//! Byte matrices transposed: blocks of 8 x 8 bytes moved as eight `u64` rows transposed in
//! registers, in tiles of 32 x 32 so both sides move through the cache in lines.

/// `src` (`rows x cols` bytes, row-major) transposed into `dst` (`cols x rows`). A size that
/// is not a multiple of 8 ends with a block overlapping the one before (its bytes are
/// written twice, alike); below 8 rows or columns, byte by byte. The frame checks lengths.
pub(crate) fn transpose(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    const T: usize = 32;
    if rows < 8 || cols < 8 {
        bytes(src, rows, cols, dst);
        return;
    }
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in starts(rows, r0, (r0 + T).min(rows), 8) {
                for c in starts(cols, c0, (c0 + T).min(cols), 8) {
                    let block: [u64; 8] = std::array::from_fn(|i| {
                        let at = (r + i) * cols + c;
                        u64::from_le_bytes(src[at..at + 8].try_into().expect("8 bytes"))
                    });
                    for (j, row) in transpose8x8(block).into_iter().enumerate() {
                        let at = (c + j) * rows + r;
                        dst[at..at + 8].copy_from_slice(&row.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// The transpose one byte at a time.
pub(crate) fn bytes(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// Block starts in `from..to` of a dimension of `n >= side`: every multiple of `side`, the
/// last moved back to `n - side`.
pub(crate) fn starts(n: usize, from: usize, to: usize, side: usize) -> impl Iterator<Item = usize> {
    (from..to).step_by(side).map(move |v| v.min(n - side))
}

/// An 8 x 8 byte matrix, one row per `u64` (column `j` in byte `j`, little-endian),
/// transposed: the 4 x 4 blocks off the diagonal swapped, then the 2 x 2 blocks within each,
/// then the bytes within those.
fn transpose8x8(mut x: [u64; 8]) -> [u64; 8] {
    for (shift, mask, pairs) in [
        (32, 0x0000_0000_ffff_ffffu64, [(0, 4), (1, 5), (2, 6), (3, 7)]),
        (16, 0x0000_ffff_0000_ffff, [(0, 2), (1, 3), (4, 6), (5, 7)]),
        (8, 0x00ff_00ff_00ff_00ff, [(0, 1), (2, 3), (4, 5), (6, 7)]),
    ] {
        for (a, b) in pairs {
            let t = ((x[a] >> shift) ^ x[b]) & mask;
            x[a] ^= t << shift;
            x[b] ^= t;
        }
    }
    x
}
