//! The AVX-512 VNNI depthwise kernels: per pixel, flat rows, and row-interleaved.

use std::arch::x86_64::*;

use crate::frame::aligned::Aligned;
use crate::frame::conv::{FlatConsts, RowConsts};
use crate::frame::gemm::REQUANT_LIMIT;
use crate::frame::kernels::{DwPacked, DwRowKernels, DwWeights};
use crate::frame::pack::PackedWeights;

/// Interleaves four taps' 64 channels so that each 32-bit lane holds one channel's four tap
/// bytes: vector `q`, 128-bit lane `l`, dword `d` is channel `16l + 4q + d` (byte unpacks
/// stay within 128-bit lanes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_taps(x: [__m512i; 4]) -> [__m512i; 4] {
    let lo01 = _mm512_unpacklo_epi8(x[0], x[1]);
    let hi01 = _mm512_unpackhi_epi8(x[0], x[1]);
    let lo23 = _mm512_unpacklo_epi8(x[2], x[3]);
    let hi23 = _mm512_unpackhi_epi8(x[2], x[3]);
    [
        _mm512_unpacklo_epi16(lo01, lo23),
        _mm512_unpackhi_epi16(lo01, lo23),
        _mm512_unpacklo_epi16(hi01, hi23),
        _mm512_unpackhi_epi16(hi01, hi23),
    ]
}

/// Undoes [`interleave_taps`]' channel order on i32 accumulators: a 4 x 4 transpose of 128-bit
/// lanes, after which vector `l` holds channels `16l .. 16l + 16` in order.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_lanes(r: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(r[0], r[1]);
    let t1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(r[0], r[1]);
    let t2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(r[2], r[3]);
    let t3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(r[2], r[3]);
    [
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t0, t2),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t0, t2),
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t1, t3),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t1, t3),
    ]
}

/// One output pixel of a depthwise convolution with symmetric weights: for every channel,
/// `acc[c] = Σ_t x_t[c] * w_t[c]` over the taps (padding taps point at a row of zero points,
/// so the epilogue's `za * Σ_t w_t` correction makes them count as real zeros).
///
/// Channels go 64 at a time; taps 4 at a time. Byte unpacks interleave four taps' 64
/// channels into four vectors whose 32-bit lanes hold one channel's four tap values, in the
/// order `16l + 4q + d` (vector q, 128-bit lane l, dword d); `vpdpbusd` then does four taps
/// of sixteen channels per instruction; a 4 x 4 transpose of 128-bit lanes restores channel
/// order before the store.
///
/// # Safety
/// AVX-512 F/BW/VNNI available; each `taps[i]` holds at least `c` bytes; `acc` holds `c`
/// rounded up to 64; `packed` is `pack_depthwise_vnni` of these weights (c channels,
/// `taps.len()` taps).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn depthwise_vnni_pixel(taps: &[&[u8]], c: usize, packed: &[i8], acc: &mut [i32]) {
    let t = taps.len();
    let groups = t.div_ceil(4);
    let blocks = c.div_ceil(64);
    for b in 0..blocks {
        let valid = (c - 64 * b).min(64);
        let mask: __mmask64 = if valid == 64 { !0 } else { (1u64 << valid) - 1 };
        let mut r = [_mm512_setzero_si512(); 4];
        for g in 0..groups {
            let mut x = [_mm512_setzero_si512(); 4];
            for (i, xi) in x.iter_mut().enumerate() {
                // Past the last tap the weights are 0.
                let tap = (4 * g + i).min(t - 1);
                // SAFETY: the masked load reads only the `valid` bytes 64b..64b+valid < c of a
                // tap slice that holds c bytes.
                *xi = unsafe { _mm512_maskz_loadu_epi8(mask, taps[tap].as_ptr().add(64 * b).cast()) };
            }
            let quads = interleave_taps(x);
            let wbase = (b * groups + g) * 256;
            for q in 0..4 {
                // SAFETY: the packing holds blocks * groups * 256 bytes.
                let w = unsafe { _mm512_loadu_si512(packed.as_ptr().add(wbase + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], quads[q], w);
            }
        }
        // r[q] lane l = channels 16l + 4q .. +3; transpose the 4 x 4 grid of 128-bit lanes.
        let v = transpose_lanes(r);
        for (l, vl) in v.into_iter().enumerate() {
            // SAFETY: acc holds c rounded up to 64 >= 64b + 16l + 16 entries.
            unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(64 * b + 16 * l).cast(), vl) };
        }
    }
}

/// One output row of a depthwise convolution whose taps advance `c` bytes per output pixel
/// (stride 1 along the width over a padded row, or stride 2 over a row split into its even
/// and odd pixels), as a 1-D correlation over the row flattened to `ow * c` bytes: output byte
/// `e` (pixel `e / c`, channel `e % c`) sums tap `i` at byte `e` from `taps[i]`. So 64
/// consecutive output bytes read 64 consecutive bytes per tap, whatever `c` is, and no lane
/// is wasted on small channel counts. The weights for a 64-byte chunk depend only on `e % c`
/// (its "class"); they are pre-interleaved per class like the per-pixel kernel's.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `1 <= taps.len() <= 64`; from each `taps[i]`,
/// `len.next_multiple_of(64)` bytes are readable; `weights` and `consts` are this layer's
/// for `c` channels and `taps.len()` taps; `out` has `len` writable bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn depthwise_vnni_flat_row(
    tap_starts: &[*const u8],
    c: usize,
    weights: &[i8],
    consts: &FlatConsts,
    len: usize,
    out: *mut u8,
) {
    let t = tap_starts.len();
    let groups = t.div_ceil(4);
    let g = crate::frame::conv::gcd(c, 64);
    // Every tap's start, padded to whole groups of 4 with the last tap (its weights are 0).
    let mut taps = [std::ptr::null::<u8>(); 64];
    assert!((1..=taps.len()).contains(&t), "kernel of {t} taps: the depthwise kernel's table holds 1 to 64");
    for (i, p) in taps.iter_mut().enumerate().take(groups * 4) {
        *p = tap_starts[i.min(t - 1)];
    }
    let (lim, nlim) = (_mm512_set1_ps(REQUANT_LIMIT), _mm512_set1_ps(-REQUANT_LIMIT));
    let (zo, lo, hi) = (_mm512_set1_epi32(consts.zo), _mm512_set1_epi32(consts.lo), _mm512_set1_epi32(consts.hi));
    let (clamp_free, clip_hi) = (consts.clamp_free, consts.hi < 255);
    let shift = g.trailing_zeros(); // g divides 64: a power of two
    let (mut e0, mut offset) = (0, 0);
    while e0 < len {
        let class = offset >> shift;
        let mut r = [_mm512_setzero_si512(); 4];
        for grp in 0..groups {
            let mut x = [_mm512_setzero_si512(); 4];
            for (i, xi) in x.iter_mut().enumerate() {
                // SAFETY: from every tap start, len rounded up to 64 >= e0 + 64 bytes are
                // readable (precondition).
                *xi = unsafe { _mm512_loadu_si512(taps[4 * grp + i].add(e0).cast()) };
            }
            let quads = interleave_taps(x);
            let wbase = (class * groups + grp) * 256;
            for q in 0..4 {
                // SAFETY: the weights hold classes * groups * 256 bytes.
                let w = unsafe { _mm512_loadu_si512(weights.as_ptr().add(wbase + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], quads[q], w);
            }
        }
        let v = transpose_lanes(r);
        let cbase = class * 64;
        let requant = |l: usize, acc: __m512i| -> __m128i {
            // SAFETY: the constants hold classes * 64 entries; cbase + 16l + 16 <= that.
            let (colterm, bias, mult) = unsafe {
                (
                    _mm512_loadu_si512(consts.colterm.as_ptr().add(cbase + 16 * l).cast()),
                    _mm512_loadu_ps(consts.bias_term.as_ptr().add(cbase + 16 * l)),
                    _mm512_loadu_ps(consts.mult.as_ptr().add(cbase + 16 * l)),
                )
            };
            // The depthwise bias forms add a precomputed term (`bias_scale` is 1: an exact fma
            // is this add).
            let raw = _mm512_sub_epi32(acc, colterm);
            let mut f = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(raw), bias), mult);
            if !clamp_free {
                f = _mm512_min_ps(_mm512_max_ps(f, nlim), lim);
            }
            // Rounds half to even: Rust code never changes MXCSR from its default.
            let mut q = _mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(f), zo), lo);
            if clip_hi {
                q = _mm512_min_epi32(q, hi);
            }
            _mm512_cvtusepi32_epi8(q)
        };
        if e0 + 64 <= len {
            for (l, acc) in v.into_iter().enumerate() {
                // SAFETY: bytes e0..e0+64 <= len are writable (precondition).
                unsafe { _mm_storeu_si128(out.add(e0 + 16 * l).cast(), requant(l, acc)) };
            }
        } else {
            for (l, acc) in v.into_iter().enumerate() {
                let start = e0 + 16 * l;
                if start >= len {
                    break;
                }
                let valid = (len - start).min(16);
                let m: __mmask16 = if valid == 16 { 0xFFFF } else { (1u16 << valid) - 1 };
                // SAFETY: bytes start..start+valid < len are writable (precondition).
                unsafe { _mm_mask_storeu_epi8(out.add(start).cast(), m, requant(l, acc)) };
            }
        }
        e0 += 64;
        offset += 64;
        while offset >= c {
            offset -= c;
        }
    }
}

/// The kx-interleaved form of `count` 64-byte chunks of one padded input row, `step` bytes
/// apart from `row`, for the row-interleaved depthwise kernel: per chunk at `e0`, four
/// vectors `q` (256 bytes, stored one chunk after another) whose dword `(l, d)` holds the
/// bytes at `e0 + 16l + 4q + d + j * dw_bytes` for taps `j = 0..4` (taps past `kw` repeat the
/// last one; their weights are 0).
///
/// # Safety
/// AVX-512 F/BW available; `1 <= kw <= 4`; from `row + i * step` (`i < count`),
/// `(kw - 1) * dw_bytes + 64` bytes are readable; `out` has `256 * count` writable bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn depthwise_rows_build(
    row: *const u8,
    kw: usize,
    dw_bytes: usize,
    count: usize,
    step: usize,
    out: *mut u8,
) {
    let offs = [0, 1, 2, 3].map(|j: usize| j.min(kw - 1) * dw_bytes);
    for i in 0..count {
        let mut x = [_mm512_setzero_si512(); 4];
        for (xj, o) in x.iter_mut().zip(offs) {
            // SAFETY: o <= (kw - 1) * dw_bytes: 64 readable bytes from row + i * step + o.
            *xj = unsafe { _mm512_loadu_si512(row.add(i * step + o).cast()) };
        }
        for (q, v) in interleave_taps(x).into_iter().enumerate() {
            // SAFETY: 256i + 64q + 64 <= 256 * count writable bytes.
            unsafe { _mm512_storeu_si512(out.add(256 * i + 64 * q).cast(), v) };
        }
    }
}

/// `count` chunks of 64 output bytes of one output row of a depthwise convolution with
/// stride 1 along the width, all of channel class `class` (so `step` bytes apart), from the
/// kx-interleaved rows ([`depthwise_rows_build`] of the same chunks) of its `KH` kernel
/// rows. Per chunk, one `vpdpbusd` per kernel row and vector does all `kw <= 4` taps of 16
/// outputs, with no shuffles; the accumulators come out in the order that two saturating
/// packs turn back into byte order, which also clamps to `0..=255`. The class's weights and
/// constants stay in registers for all `count` chunks: loads bound this kernel.
///
/// # Safety
/// AVX-512 F/BW/VNNI available; each `x4[ky]` holds `256 * count` bytes; `weights`
/// (`pack_depthwise_rows`) and `consts` are this layer's for `KH` kernel rows and hold class
/// `class`; `out + i * step` has 64 writable bytes for `i < count - 1`, and `last` (1..=64)
/// for the last chunk.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn depthwise_rows_compute<const KH: usize>(
    x4: &[*const u8; KH],
    weights: &[i8],
    consts: &RowConsts,
    class: usize,
    count: usize,
    step: usize,
    last: usize,
    out: *mut u8,
) {
    let (lim, nlim) = (_mm512_set1_ps(REQUANT_LIMIT), _mm512_set1_ps(-REQUANT_LIMIT));
    debug_assert!((0..=255).contains(&consts.zo) && consts.lo <= consts.hi);
    let zo = _mm512_set1_epi16(consts.zo as i16);
    let (lo, hi) = (_mm512_set1_epi8(consts.lo as i8), _mm512_set1_epi8(consts.hi as i8));
    // Locals: the stores below may alias the constants as far as the compiler knows.
    let (clamp_free, clip_lo, clip_hi) = (consts.clamp_free, consts.lo > 0, consts.hi < 255);
    let cb = 64 * class;
    let mut w = [[_mm512_setzero_si512(); 4]; KH];
    let (mut bias, mut mult, mut colterm) =
        ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4], [_mm512_setzero_si512(); 4]);
    for q in 0..4 {
        for (ky, wk) in w.iter_mut().enumerate() {
            // SAFETY: the weights hold (class + 1) * KH * 256 bytes or more.
            wk[q] = unsafe { _mm512_loadu_si512(weights.as_ptr().add((class * KH + ky) * 256 + 64 * q).cast()) };
        }
        // SAFETY: the constants hold (class + 1) * 64 entries or more.
        unsafe {
            bias[q] = _mm512_loadu_ps(consts.bias_term.as_ptr().add(cb + 16 * q));
            mult[q] = _mm512_loadu_ps(consts.mult.as_ptr().add(cb + 16 * q));
            colterm[q] = _mm512_loadu_si512(consts.neg_colterm.as_ptr().add(cb + 16 * q).cast());
        }
    }
    for i in 0..count {
        let mut r = colterm;
        for (row, wk) in x4.iter().zip(&w) {
            for q in 0..4 {
                // SAFETY: 256i + 64q + 64 <= 256 * count bytes of the row (precondition).
                let x = unsafe { _mm512_loadu_si512(row.add(256 * i + 64 * q).cast()) };
                r[q] = _mm512_dpbusd_epi32(r[q], x, wk[q]);
            }
        }
        let mut v = [_mm512_setzero_si512(); 4];
        for q in 0..4 {
            // The depthwise bias forms add a precomputed term (FBGEMM's order, no fma).
            let mut f = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(r[q]), bias[q]), mult[q]);
            if !clamp_free {
                f = _mm512_min_ps(_mm512_max_ps(f, nlim), lim);
            }
            // Rounds half to even: Rust code never changes MXCSR from its default.
            v[q] = _mm512_cvtps_epi32(f);
        }
        // Per 128-bit lane l the packs put vector q's dword d at byte 4q + d: output byte
        // 16l + 4q + d, in order. Signed saturation to i16, the zero point added there (the
        // same bytes as adding it before: see `Requant`), then unsigned saturation to u8 is a
        // clamp to 0..=255; lo and hi (within it) clamp the bytes.
        let lo_half = _mm512_adds_epi16(_mm512_packs_epi32(v[0], v[1]), zo);
        let hi_half = _mm512_adds_epi16(_mm512_packs_epi32(v[2], v[3]), zo);
        let mut bytes = _mm512_packus_epi16(lo_half, hi_half);
        if clip_lo {
            bytes = _mm512_max_epu8(bytes, lo);
        }
        if clip_hi {
            bytes = _mm512_min_epu8(bytes, hi);
        }
        if i + 1 < count || last == 64 {
            // SAFETY: 64 writable bytes at out + i * step (precondition).
            unsafe { _mm512_storeu_si512(out.add(i * step).cast(), bytes) };
        } else {
            let m: __mmask64 = (1u64 << last) - 1;
            // SAFETY: `last` writable bytes at the last chunk (precondition).
            unsafe { _mm512_mask_storeu_epi8(out.add(i * step).cast(), m, bytes) };
        }
    }
}

/// Weight layout of the VNNI depthwise kernel: per block of 64 channels, per group of 4 taps,
/// four 64-byte vectors `q`; byte `4 * (4l + d) + t` of vector `q` is the weight of channel
/// `64b + 16l + 4q + d` at tap `4g + t` (0 past the last channel or tap). That is the order
/// in which byte unpacks leave the activations (see [`depthwise_vnni_pixel`]).
pub(crate) fn pack_depthwise_vnni(taps: &PackedWeights) -> Aligned<i8> {
    let (c, t) = (taps.n, taps.k);
    let (blocks, groups) = (c.div_ceil(64), t.div_ceil(4));
    let mut out = Aligned::zeroed(blocks * groups * 256);
    for b in 0..blocks {
        for g in 0..groups {
            for q in 0..4 {
                for l in 0..4 {
                    for d in 0..4 {
                        let ch = 64 * b + 16 * l + 4 * q + d;
                        for tt in 0..4 {
                            let tap = 4 * g + tt;
                            if ch < c && tap < t {
                                out[((b * groups + g) * 4 + q) * 64 + 4 * (4 * l + d) + tt] = taps.raw[ch * t + tap];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The table's packing: symmetric weights only.
pub(crate) fn pack(taps: &PackedWeights) -> Option<DwPacked> {
    taps.is_symmetric().then(|| DwPacked::I8(pack_depthwise_vnni(taps)))
}

/// The table's pixel entry: the sums, then the AVX2 epilogue.
///
/// # Safety
/// AVX-512 VNNI available; as `DepthwiseKernels::pixel`.
pub(crate) unsafe fn pixel(taps: &[&[u8]], c: usize, w: &DwWeights<'_>, acc: &mut [i32], px: &mut [u8]) {
    let DwPacked::I8(packed) = w.packed else { unreachable!("packed by `pack`") };
    // SAFETY: forwarded preconditions; the tier includes AVX2 for the epilogue.
    unsafe {
        depthwise_vnni_pixel(taps, c, packed, acc);
        crate::x86_64::avx2::epilogue::requantize_row(w.plan, &acc[..c], 0, 0, px);
    }
}

/// The row-interleaved kernel's entries.
pub(crate) const ROWS: DwRowKernels = DwRowKernels { build: depthwise_rows_build, compute: rows_compute };

/// [`depthwise_rows_compute`] for `rows.len()` (1..=5) kernel rows.
///
/// # Safety
/// As [`depthwise_rows_compute`].
#[allow(clippy::too_many_arguments)]
unsafe fn rows_compute(
    rows: &[*const u8],
    w: &[i8],
    cs: &RowConsts,
    class: usize,
    count: usize,
    step: usize,
    last: usize,
    out: *mut u8,
) {
    // SAFETY: forwarded preconditions.
    unsafe {
        match *rows {
            [r0] => depthwise_rows_compute::<1>(&[r0], w, cs, class, count, step, last, out),
            [r0, r1] => depthwise_rows_compute::<2>(&[r0, r1], w, cs, class, count, step, last, out),
            [r0, r1, r2] => depthwise_rows_compute::<3>(&[r0, r1, r2], w, cs, class, count, step, last, out),
            [r0, r1, r2, r3] => depthwise_rows_compute::<4>(&[r0, r1, r2, r3], w, cs, class, count, step, last, out),
            [r0, r1, r2, r3, r4] => {
                depthwise_rows_compute::<5>(&[r0, r1, r2, r3, r4], w, cs, class, count, step, last, out)
            }
            _ => unreachable!("the row kernel takes 1 to 5 kernel rows, not {}", rows.len()),
        }
    }
}
