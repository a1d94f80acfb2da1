//! AVX2 (+ FMA) kernels beyond the GEMM micro-kernel: the quantized addition and the
//! per-pixel depthwise convolution. Each is bit-identical to its scalar twin (the addition's
//! vector-prefix formula in `ops::add_raw`, `conv::depthwise_scalar_pixel`).

use std::arch::x86_64::*;

use crate::gemm::{Plan, REQUANT_LIMIT};

/// The constants of PyTorch's vectorized quantized addition, eight lanes at a time (the
/// AVX-512 kernel's `AddConsts`, on 256-bit vectors).
struct AddConsts {
    sa: __m256,
    pa: __m256,
    sb: __m256,
    pb: __m256,
    inv: __m256,
    lim: __m256,
    nlim: __m256,
    zo: __m256i,
    order: __m256i,
    relu: bool,
}

impl AddConsts {
    /// # Safety
    /// AVX2 available.
    #[inline(always)]
    unsafe fn new((sa, za): (f32, i32), (sb, zb): (f32, i32), (so, zo): (f32, i32), relu: bool) -> Self {
        // SAFETY: AVX (precondition).
        unsafe {
            AddConsts {
                sa: _mm256_set1_ps(sa),
                pa: _mm256_set1_ps(sa * -(za as f32)),
                sb: _mm256_set1_ps(sb),
                pb: _mm256_set1_ps(sb * -(zb as f32)),
                inv: _mm256_set1_ps(1.0 / so),
                lim: _mm256_set1_ps(REQUANT_LIMIT),
                nlim: _mm256_set1_ps(-REQUANT_LIMIT),
                zo: _mm256_set1_epi16(zo as i16),
                // After the packs, dword 4h + v holds lanes 4h..4h + 4 of vector v (h the
                // 128-bit half); put it at dword 2v + h.
                order: _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                relu,
            }
        }
    }

    /// `round_half_even(c * (1 / so))` of eight pairs of bytes, before the zero point.
    ///
    /// # Safety
    /// AVX2 and FMA available; 8 bytes readable at `a` and `b`.
    #[inline(always)]
    unsafe fn eight(&self, a: *const u8, b: *const u8) -> __m256i {
        // SAFETY: AVX2 + FMA (precondition); the loads read 8 bytes each.
        unsafe {
            let xa = _mm256_cvtepu8_epi32(_mm_loadl_epi64(a.cast()));
            let xb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.cast()));
            let fa = _mm256_fmadd_ps(self.sa, _mm256_cvtepi32_ps(xa), self.pa);
            let fb = _mm256_fmadd_ps(self.sb, _mm256_cvtepi32_ps(xb), self.pb);
            let mut c = _mm256_add_ps(fa, fb);
            if self.relu {
                c = _mm256_max_ps(c, _mm256_setzero_ps());
            }
            let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(c, self.inv), self.nlim), self.lim);
            // Rounds half to even: Rust code never changes MXCSR from its default.
            _mm256_cvtps_epi32(t)
        }
    }

    /// The sums of the 32 bytes at `a` and `b`, stored at `out` (which may be `a`): narrowed
    /// as the AVX-512 kernel narrows (signed saturation to i16, the zero point with signed
    /// saturation, unsigned saturation to u8: `clamp(q + zo, 0, 255)`).
    ///
    /// # Safety
    /// AVX2 and FMA available; 32 bytes readable at `a` and `b` and writable at `out`.
    #[inline(always)]
    unsafe fn thirty_two(&self, a: *const u8, b: *const u8, out: *mut u8) {
        // SAFETY: AVX2 + FMA (precondition); every access lies in the 32 bytes.
        unsafe {
            // A loop, not `array::from_fn`: a closure would not inherit the target features.
            let mut q = [_mm256_setzero_si256(); 4];
            for (v, qv) in q.iter_mut().enumerate() {
                *qv = self.eight(a.add(8 * v), b.add(8 * v));
            }
            let lo = _mm256_adds_epi16(_mm256_packs_epi32(q[0], q[1]), self.zo);
            let hi = _mm256_adds_epi16(_mm256_packs_epi32(q[2], q[3]), self.zo);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), self.order);
            _mm256_storeu_si256(out.cast(), bytes);
        }
    }
}

/// PyTorch's vectorized quantized add over `rows` rows of `ncols` bytes, row `r` at
/// `a + r * ld`, `b + r * ld` and `out + r * ld`, 32 bytes at a time; a row's last `< 32`
/// bytes go through a stack copy with the same formula. Each group of bytes is read before it
/// is written, so `out` may be `a`. The twin of `x86::add_u8_avx512`, and of the scalar loop's
/// vector-prefix formula.
///
/// # Safety
/// AVX2 and FMA available; those bytes are readable at `a` and `b` and writable at `out`;
/// `out` is exactly `a` or overlaps neither input.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8_avx2(
    a: *const u8,
    qa: (f32, i32),
    b: *const u8,
    qb: (f32, i32),
    out: *mut u8,
    qo: (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    // Rows that fill their stride are one run of bytes.
    let (rows, ncols, ld) = if ncols == ld && rows > 1 { (1, rows * ncols, rows * ncols) } else { (rows, ncols, ld) };
    // SAFETY: AVX2 + FMA (this function's features); every group of bytes lies in its row
    // (or the run of whole rows), in bounds (caller's precondition).
    unsafe {
        let k = AddConsts::new(qa, qb, qo, relu);
        for r in 0..rows {
            let row = r * ld;
            let mut j = 0;
            while j + 32 <= ncols {
                k.thirty_two(a.add(row + j), b.add(row + j), out.add(row + j));
                j += 32;
            }
            let rest = ncols - j;
            if rest > 0 {
                let (mut ta, mut tb) = ([0u8; 32], [0u8; 32]);
                std::ptr::copy_nonoverlapping(a.add(row + j), ta.as_mut_ptr(), rest);
                std::ptr::copy_nonoverlapping(b.add(row + j), tb.as_mut_ptr(), rest);
                let mut to = [0u8; 32];
                k.thirty_two(ta.as_ptr(), tb.as_ptr(), to.as_mut_ptr());
                std::ptr::copy_nonoverlapping(to.as_ptr(), out.add(row + j), rest);
            }
        }
    }
}

/// Channels per block of the AVX2 depthwise layout.
pub(crate) const DW_BLOCK: usize = 16;

/// Where a depthwise pixel's taps start: one slice per tap (padding taps point at a row of
/// zero points), or, for a pixel whose taps all lie inside the image, one base pointer and
/// each tap's byte offset from it.
pub(crate) trait TapStarts {
    /// The number of taps.
    fn len(&self) -> usize;
    /// The start of tap `t`'s channels.
    fn start(&self, t: usize) -> *const u8;
}

impl TapStarts for [&[u8]] {
    fn len(&self) -> usize {
        <[&[u8]]>::len(self)
    }
    fn start(&self, t: usize) -> *const u8 {
        self[t].as_ptr()
    }
}

/// The taps of an interior pixel: `base + offsets[t]`.
pub(crate) struct TapOffsets<'a> {
    pub base: *const u8,
    pub offsets: &'a [usize],
}

impl TapStarts for TapOffsets<'_> {
    fn len(&self) -> usize {
        self.offsets.len()
    }
    fn start(&self, t: usize) -> *const u8 {
        self.base.wrapping_add(self.offsets[t])
    }
}

/// Requantizes eight raw sums of channels `j..j + n` (`n <= 8`, symmetric weights: no row
/// sum term) and stores their `n` bytes at `dst`: `requantize_scalar`'s arithmetic lane for
/// lane (the fma of the bias, the multiply, round half to even, the zero point, the clamp).
///
/// # Safety
/// AVX2 and FMA available; the plan covers channels `j..j + n`; `n` bytes writable at `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn requantize8(plan: &Plan, acc: __m256i, j: usize, n: usize, dst: *mut u8) {
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // SAFETY: masked loads read only channels j..j + n of the plan.
    let (colterm, bias, bscale, mult) = unsafe {
        (
            _mm256_maskload_epi32(plan.colterm.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.bias_term.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.bias_scale.as_ptr().add(j), mask),
            _mm256_maskload_ps(plan.mult.as_ptr().add(j), mask),
        )
    };
    let raw = _mm256_sub_epi32(acc, colterm);
    let x = _mm256_mul_ps(_mm256_fmadd_ps(bias, bscale, _mm256_cvtepi32_ps(raw)), mult);
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-REQUANT_LIMIT)), _mm256_set1_ps(REQUANT_LIMIT));
    let q = _mm256_add_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(plan.zo));
    let q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(plan.lo)), _mm256_set1_epi32(plan.hi));
    // i32 -> i16 -> u8 with saturation: exact, the values being within lo..=hi in 0..=255.
    let w = _mm256_packs_epi32(q, q);
    let b = _mm256_packus_epi16(w, w);
    let bytes = (_mm256_cvtsi256_si32(b) as u32 as u64) | ((_mm256_extract_epi32::<4>(b) as u32 as u64) << 32);
    if n == 8 {
        // SAFETY: 8 bytes writable at dst.
        unsafe { std::ptr::write_unaligned(dst.cast::<u64>(), bytes) };
    } else {
        for (l, v) in bytes.to_le_bytes().into_iter().take(n).enumerate() {
            // SAFETY: l < n bytes writable at dst.
            unsafe { *dst.add(l) = v };
        }
    }
}

/// One output pixel of a depthwise convolution with symmetric weights, requantized: for
/// every channel `Σ_t x_t[c] * w_t[c]` over the taps (padding taps point at a row of zero
/// points, which the plan's `za * Σ_t w_t` term cancels), then the plan's requantization, the
/// `c` bytes written to `out`: the bytes `conv::depthwise_scalar_pixel` writes.
///
/// Channels go 16 at a time, taps two at a time: a byte unpack interleaves two taps' bytes
/// per channel, zero-extension makes each 32-bit lane one channel's two taps as i16, and
/// `vpmaddwd` with the two taps' weights (i16 pairs) adds both products exactly into i32.
///
/// # Safety
/// AVX2 and FMA available; `c` bytes are readable from each tap's start; `packed` is
/// `conv::pack_depthwise_avx2` of these weights (`c` channels, `taps.len()` taps); `plan` is
/// this layer's (symmetric weights, `c` channels); `out` holds `c` bytes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn depthwise_avx2_pixel_u8<T: TapStarts + ?Sized>(
    taps: &T,
    c: usize,
    packed: &[i16],
    plan: &Plan,
    out: &mut [u8],
) {
    let t = taps.len();
    let pairs = t.div_ceil(2);
    for b in 0..c.div_ceil(DW_BLOCK) {
        let at = DW_BLOCK * b;
        let valid = (c - at).min(DW_BLOCK);
        // SAFETY: as `depthwise_avx2_pixel` (precondition).
        let (r0, r1) = unsafe { block_sums(taps, at, valid, &packed[b * pairs * 2 * DW_BLOCK..], pairs) };
        // SAFETY: channels at..at + valid exist in the plan and in `out`.
        unsafe {
            requantize8(plan, r0, at, valid.min(8), out.as_mut_ptr().add(at));
            if valid > 8 {
                requantize8(plan, r1, at + 8, valid - 8, out.as_mut_ptr().add(at + 8));
            }
        }
    }
}

/// The sums of channels `at..at + valid` (`valid <= 16`) over every tap pair: channels
/// `at..at + 8` in the first vector, the next 8 in the second.
///
/// # Safety
/// AVX2 available; `at + valid` bytes are readable from each tap's start; `w` starts at this
/// block's `pairs` groups of 32 i16.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_sums<T: TapStarts + ?Sized>(
    taps: &T,
    at: usize,
    valid: usize,
    w: &[i16],
    pairs: usize,
) -> (__m256i, __m256i) {
    let t = taps.len();
    let (mut r0, mut r1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for g in 0..pairs {
        // Past the last tap the weights are 0; reading the last tap again is harmless.
        let (t0, t1) = (2 * g, (2 * g + 1).min(t - 1));
        let (p0, p1) = (taps.start(t0).wrapping_add(at), taps.start(t1).wrapping_add(at));
        let (x0, x1) = if valid == DW_BLOCK {
            // SAFETY: bytes at..at + 16 of each tap are readable (precondition).
            unsafe { (_mm_loadu_si128(p0.cast()), _mm_loadu_si128(p1.cast())) }
        } else {
            let (mut a, mut b) = ([0u8; DW_BLOCK], [0u8; DW_BLOCK]);
            // SAFETY: bytes at..at + valid of each tap are readable (precondition); 16-byte
            // locals.
            unsafe {
                std::ptr::copy_nonoverlapping(p0, a.as_mut_ptr(), valid);
                std::ptr::copy_nonoverlapping(p1, b.as_mut_ptr(), valid);
                (_mm_loadu_si128(a.as_ptr().cast()), _mm_loadu_si128(b.as_ptr().cast()))
            }
        };
        let lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x0, x1));
        let hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x0, x1));
        // SAFETY: the block holds `pairs` groups of 32 i16.
        let (w0, w1) = unsafe {
            (
                _mm256_loadu_si256(w.as_ptr().add(g * 2 * DW_BLOCK).cast()),
                _mm256_loadu_si256(w.as_ptr().add(g * 2 * DW_BLOCK + DW_BLOCK).cast()),
            )
        };
        r0 = _mm256_add_epi32(r0, _mm256_madd_epi16(lo, w0));
        r1 = _mm256_add_epi32(r1, _mm256_madd_epi16(hi, w1));
    }
    (r0, r1)
}
