//! Byte matrices transposed in blocks of up to 16 x 16: four rounds of unpacks (bytes, then
//! pairs, quads and halves of rows) turn sixteen loaded rows into sixteen columns. A side of
//! 2 to 7 (a small batch moved past the other axes) is an interleave of that many rows, or
//! its inverse, 16 columns at a time with byte shuffles.

use std::arch::x86_64::*;

use crate::generic::transpose::{starts, transpose as generic};

/// `src` (`rows x cols`, row-major) transposed into `dst` (`cols x rows`). Blocks of 16 x 16
/// (a size that is not a multiple of 16 ends with a block overlapping the one before); a
/// side of 8 to 15 is one narrower block across (an image's channels: 12 attention heads);
/// smaller matrices go to the generic kernel.
pub(crate) fn transpose(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    if (2..8).contains(&rows) && cols >= 16 {
        assert!(src.len() >= rows * cols && dst.len() >= rows * cols, "buffers hold rows x cols bytes");
        // SAFETY: 2 <= rows < 8 and cols >= 16, the buffers hold rows x cols bytes (checked);
        // this tier's table exists only on CPUs with AVX2.
        unsafe { interleave(src, rows, cols, dst) };
        return;
    }
    if (2..8).contains(&cols) && rows >= 16 {
        assert!(src.len() >= rows * cols && dst.len() >= rows * cols, "buffers hold rows x cols bytes");
        // SAFETY: 2 <= cols < 8 and rows >= 16, the buffers hold rows x cols bytes (checked);
        // this tier's table exists only on CPUs with AVX2.
        unsafe { deinterleave(src, rows, cols, dst) };
        return;
    }
    if rows < 8 || cols < 8 || (rows < 16 && cols < 16) {
        generic(src, rows, cols, dst);
        return;
    }
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols, "buffers hold rows x cols bytes");
    let (h, w) = (rows.min(16), cols.min(16));
    const T: usize = 64;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in starts(rows, r0, (r0 + T).min(rows), h) {
                for c in starts(cols, c0, (c0 + T).min(cols), w) {
                    // Each of the block's rows is read 16 bytes wide: past a narrow last
                    // column, into the next row, which must exist.
                    if (r + h - 1) * cols + c + 16 > src.len() {
                        for i in r..r + h {
                            for j in c..c + w {
                                dst[j * rows + i] = src[i * cols + j];
                            }
                        }
                        continue;
                    }
                    // SAFETY: the block's h rows, each read 16 bytes wide, lie inside `src`
                    // (checked above); its w output rows of h bytes lie inside `dst` (r + h
                    // <= rows, c + w <= cols by `starts`, and `dst` holds rows * cols bytes);
                    // this tier's table exists only on CPUs with AVX2, which include SSE2.
                    unsafe { block(src, cols, (r, c), (h, w), dst, rows) };
                }
            }
        }
    }
}

/// The `h x w` block (both at most 16) at row `r`, column `c` of `src` (row stride `cols`),
/// transposed into `dst` (row stride `rows`) at row `c`, column `r`.
///
/// # Safety
/// Rows `r..r + h` of `src`, each read 16 bytes wide from column `c`, lie inside it; the
/// block's `w` output rows of `h` bytes lie inside `dst`; SSE2 is available.
#[target_feature(enable = "avx2")]
unsafe fn block(src: &[u8], cols: usize, (r, c): (usize, usize), (h, w): (usize, usize), dst: &mut [u8], rows: usize) {
    let mut x = [_mm_setzero_si128(); 16];
    for (i, v) in x.iter_mut().enumerate().take(h) {
        // SAFETY: row r + i, 16 bytes from column c, inside `src` by the caller's contract.
        *v = unsafe { _mm_loadu_si128(src.as_ptr().add((r + i) * cols + c).cast()) };
    }
    // Register `g * chunks + k` holds row group `g` (consecutive rows) for column chunk `k`;
    // each round pairs row groups 2j and 2j + 1 and halves the chunks: the low half of the
    // units of both interleaved is chunk 2k, the high half chunk 2k + 1.
    for round in 0..4 {
        let chunks = 1 << round;
        let groups = 16 >> round;
        let mut y = [_mm_setzero_si128(); 16];
        for j in 0..groups / 2 {
            for k in 0..chunks {
                let (a, b) = (x[2 * j * chunks + k], x[(2 * j + 1) * chunks + k]);
                let (lo, hi) = match round {
                    0 => (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b)),
                    1 => (_mm_unpacklo_epi16(a, b), _mm_unpackhi_epi16(a, b)),
                    2 => (_mm_unpacklo_epi32(a, b), _mm_unpackhi_epi32(a, b)),
                    _ => (_mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b)),
                };
                y[j * 2 * chunks + 2 * k] = lo;
                y[j * 2 * chunks + 2 * k + 1] = hi;
            }
        }
        x = y;
    }
    for (j, col) in x.iter().enumerate().take(w) {
        let at = (c + j) * rows + r;
        if h == 16 {
            // SAFETY: row c + j of `dst`, bytes r..r + 16, inside it by the caller's contract.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(at).cast(), *col) };
        } else if at + 16 <= rows * cols {
            // A side under 16 is the whole of `rows` (h = rows, r = 0): the 16 - h bytes past
            // this output row are the start of the next ones, which later stores (j, then c,
            // only increase) write with their own values; the last row's stays in `dst`.
            // SAFETY: bytes at..at + 16 lie within the rows * cols that `dst` holds (checked).
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(at).cast(), *col) };
        } else {
            let mut t = [0u8; 16];
            // SAFETY: `t` holds 16 bytes.
            unsafe { _mm_storeu_si128(t.as_mut_ptr().cast(), *col) };
            dst[at..at + h].copy_from_slice(&t[..h]);
        }
    }
}

/// Shuffle masks of a block of `k` (2 to 7) vectors of 16 bytes: `masks[o][i]` takes from
/// vector `i` the bytes that output vector `o` holds, `from(o * 16 + b)` giving the vector and
/// byte that output byte `b` of vector `o` comes from (0x80 elsewhere: a zero to OR with).
#[target_feature(enable = "avx2")]
fn masks(k: usize, from: impl Fn(usize) -> (usize, usize)) -> [[__m128i; 7]; 7] {
    let mut m = [[[0x80u8; 16]; 7]; 7];
    for o in 0..k {
        for b in 0..16 {
            let (i, at) = from(o * 16 + b);
            m[o][i][b] = at as u8;
        }
    }
    // SAFETY: each mask is 16 bytes.
    std::array::from_fn(|o| std::array::from_fn(|i| unsafe { _mm_loadu_si128(m[o][i].as_ptr().cast()) }))
}

/// A block's `k` output vectors from its `k` input vectors `x`: output `o` is the OR of each
/// input `i` shuffled by `m[o][i]`.
#[target_feature(enable = "avx2")]
fn shuffled(x: &[__m128i; 7], m: &[[__m128i; 7]; 7], k: usize) -> [__m128i; 7] {
    let mut y = [_mm_setzero_si128(); 7];
    for (yo, mo) in y.iter_mut().zip(m).take(k) {
        for (v, mi) in x.iter().zip(mo).take(k) {
            *yo = _mm_or_si128(*yo, _mm_shuffle_epi8(*v, *mi));
        }
    }
    y
}

/// `rows` (2 to 7) rows of `cols >= 16` bytes interleaved: output row `c` is column `c`, one
/// byte from each row. 16 columns at a time (the last block overlapping the one before): the
/// rows' 16 bytes each make `rows` output vectors, each an OR of one shuffle per row.
///
/// # Safety
/// `2 <= rows < 8`, `cols >= 16`, `src` and `dst` hold `rows * cols` bytes, AVX2 is available.
#[target_feature(enable = "avx2")]
unsafe fn interleave(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    // Output byte p of a block is column p / rows of row p % rows.
    let m = masks(rows, |p| (p % rows, p / rows));
    for c in starts(cols, 0, cols, 16) {
        let mut x = [_mm_setzero_si128(); 7];
        for (i, v) in x.iter_mut().enumerate().take(rows) {
            // SAFETY: bytes c..c + 16 of row i: c + 16 <= cols by `starts`, i < rows.
            *v = unsafe { _mm_loadu_si128(src.as_ptr().add(i * cols + c).cast()) };
        }
        for (o, y) in shuffled(&x, &m, rows).iter().enumerate().take(rows) {
            // SAFETY: output bytes c * rows + 16 o .. + 16 lie below (c + 16) * rows <= rows * cols.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(c * rows + 16 * o).cast(), *y) };
        }
    }
}

/// The inverse of [`interleave`]: `rows >= 16` rows of `cols` (2 to 7) bytes into `cols` rows
/// of `rows` bytes, 16 input rows (`16 * cols` consecutive bytes) at a time, the last block
/// overlapping the one before.
///
/// # Safety
/// `2 <= cols < 8`, `rows >= 16`, `src` and `dst` hold `rows * cols` bytes, AVX2 is available.
#[target_feature(enable = "avx2")]
unsafe fn deinterleave(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    // Output vector j, byte b, is row b, column j of the block: its byte b * cols + j.
    let m = masks(cols, |p| {
        let (j, b) = (p / 16, p % 16);
        ((b * cols + j) / 16, (b * cols + j) % 16)
    });
    for r in starts(rows, 0, rows, 16) {
        let mut x = [_mm_setzero_si128(); 7];
        for (k, v) in x.iter_mut().enumerate().take(cols) {
            // SAFETY: bytes r * cols + 16 k .. + 16 lie below (r + 16) * cols <= rows * cols.
            *v = unsafe { _mm_loadu_si128(src.as_ptr().add(r * cols + 16 * k).cast()) };
        }
        for (j, y) in shuffled(&x, &m, cols).iter().enumerate().take(cols) {
            // SAFETY: row j of the output, bytes r..r + 16: r + 16 <= rows by `starts`, j < cols.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(j * rows + r).cast(), *y) };
        }
    }
}
