//! Quantize, dequantize and requantize on flat slices: the loops under [`crate::QTensor`],
//! public so that other crates (kernels, observers) can convert buffers without building a
//! tensor.
//!
//! Each loop has a scalar reference (the `*_scalar` functions, which spell out PyTorch's
//! formula) and, for `u8` / `i8`, an AVX2 version selected at run time ([`crate::isa`]); the
//! test suite checks them bit for bit against each other on random data. Slices longer than
//! [`PARALLEL_MIN_LEN`] are split across the rayon thread pool; every element is independent,
//! so the result does not depend on the thread count.

use rayon::prelude::*;

use crate::isa::Isa;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::DType;
use crate::{QElement, QError, QuantRange, Result};

/// Slices at least this long are processed in parallel chunks.
pub const PARALLEL_MIN_LEN: usize = 1 << 16;
/// Elements per parallel chunk (a multiple of every vector width).
pub(crate) const CHUNK: usize = 1 << 14;

/// Quantizes one value: PyTorch's `fbgemm::Quantize` formula, the scalar reference.
///
/// `q = clamp(zero_point + round_half_even(x * inv_scale), qmin, qmax)`, where the sum is
/// computed in `f32` (as FBGEMM does) and the clamp in `f64`. `inv_scale` must be
/// `1.0f32 / scale`: multiplying by the reciprocal, not dividing, is what PyTorch does, and the
/// two differ on some inputs. NaN maps to 0 here; callers reject NaN before trusting a result.
#[inline(always)]
pub fn quantize_scalar(x: f32, inv_scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let rounded = (x * inv_scale).round_ties_even();
    let shifted = zero_point as f32 + rounded;
    (shifted as f64).clamp(qmin as f64, qmax as f64) as i32
}

/// Dequantizes one value: `scale * (q - zero_point)`, one `f32` rounding.
#[inline(always)]
pub fn dequantize_scalar(q: i32, scale: f32, zero_point: i32) -> f32 {
    scale * ((q as i64 - zero_point as i64) as f32)
}

fn len_check(op: &'static str, src: usize, dst: usize) -> Result<()> {
    if src == dst {
        Ok(())
    } else {
        Err(QError::ShapeMismatch {
            op,
            expected: vec![src],
            actual: vec![dst],
            hint: "the output slice must have as many elements as the input",
        })
    }
}

/// Runs `f(block_index, src_block, dst_block)` over matching blocks of `block` elements (the
/// last may be shorter), in parallel when the slices are long; ORs the flags `f` returns.
pub(crate) fn for_blocks<A: Sync, B: Send>(
    src: &[A],
    dst: &mut [B],
    block: usize,
    f: impl Fn(usize, &[A], &mut [B]) -> bool + Sync,
) -> bool {
    let block = block.max(1);
    if src.len() < PARALLEL_MIN_LEN {
        src.chunks(block).zip(dst.chunks_mut(block)).enumerate().fold(false, |acc, (b, (s, d))| f(b, s, d) | acc)
    } else {
        src.par_chunks(block)
            .zip(dst.par_chunks_mut(block))
            .enumerate()
            .with_min_len(CHUNK.div_ceil(block))
            .map(|(b, (s, d))| f(b, s, d))
            .reduce(|| false, |a, b| a | b)
    }
}

/// Quantizes `src` into `dst` with one scale and zero point, clamping to `range`, using the
/// instruction set of [`crate::isa::selected`].
///
/// ```
/// use qtensor::{kernels, DType, QuantRange};
/// let mut q = [0u8; 4];
/// kernels::quantize_slice(&[-1.0, 0.0, 0.25, 100.0], &mut q, 0.5, 10, QuantRange::full(DType::U8))?;
/// assert_eq!(q, [8, 10, 10, 210]); // 0.25 / 0.5 = 0.5 rounds half to even: 0
/// # Ok::<(), qtensor::QError>(())
/// ```
///
/// # Errors
/// [`QError::ShapeMismatch`] for slices of different lengths, [`QError::InvalidScale`],
/// [`QError::ZeroPointOutOfRange`], a range of another dtype ([`QError::Unsupported`]), and
/// [`QError::NanInput`] if `src` holds a NaN (then `dst` holds unspecified values).
pub fn quantize_slice<T: QElement>(
    src: &[f32],
    dst: &mut [T],
    scale: f32,
    zero_point: i32,
    range: QuantRange,
) -> Result<()> {
    quantize_slice_with(crate::isa::selected(), src, dst, scale, zero_point, range)
}

/// [`quantize_slice`] with an explicit instruction set (capped to what the CPU supports), for
/// conformance tests and benchmarks.
///
/// # Errors
/// As [`quantize_slice`].
pub fn quantize_slice_with<T: QElement>(
    isa: Isa,
    src: &[f32],
    dst: &mut [T],
    scale: f32,
    zero_point: i32,
    range: QuantRange,
) -> Result<()> {
    const OP: &str = "quantize_slice";
    len_check(OP, src.len(), dst.len())?;
    let params = crate::QParams::PerTensor { scale, zero_point };
    check_range_dtype::<T>(OP, &range)?;
    params.validate(OP, &[src.len()], &range)?;
    let isa = isa.capped_to_supported();
    let inv = 1.0f32 / scale;
    let nan =
        for_blocks(src, dst, CHUNK, |_, s, d| quantize_block(isa, s, d, inv, zero_point, range.qmin(), range.qmax()));
    if nan {
        return Err(nan_error(OP, src, &[src.len()]));
    }
    Ok(())
}

/// Dequantizes `src` into `dst`: `dst[i] = scale * (src[i] - zero_point)`.
///
/// # Errors
/// [`QError::ShapeMismatch`] for slices of different lengths, [`QError::InvalidScale`].
pub fn dequantize_slice<T: QElement>(src: &[T], dst: &mut [f32], scale: f32, zero_point: i32) -> Result<()> {
    dequantize_slice_with(crate::isa::selected(), src, dst, scale, zero_point)
}

/// [`dequantize_slice`] with an explicit instruction set.
///
/// # Errors
/// As [`dequantize_slice`].
pub fn dequantize_slice_with<T: QElement>(
    isa: Isa,
    src: &[T],
    dst: &mut [f32],
    scale: f32,
    zero_point: i32,
) -> Result<()> {
    const OP: &str = "dequantize_slice";
    len_check(OP, src.len(), dst.len())?;
    crate::params::check_scale(OP, scale, None)?;
    let isa = isa.capped_to_supported();
    for_blocks(src, dst, CHUNK, |_, s, d| {
        dequantize_block(isa, s, d, scale, zero_point);
        false
    });
    Ok(())
}

pub(crate) fn check_range_dtype<T: QElement>(op: &'static str, range: &QuantRange) -> Result<()> {
    if range.dtype() == T::DTYPE {
        Ok(())
    } else {
        Err(QError::Unsupported {
            op,
            reason: format!(
                "the quantization range is for {} but the values are {}; build the range for \
                 the element type (QuantRange::full({:?}))",
                range.dtype(),
                T::DTYPE,
                T::DTYPE
            ),
        })
    }
}

pub(crate) fn nan_error(op: &'static str, src: &[f32], shape: &[usize]) -> QError {
    let index = src.iter().position(|x| x.is_nan()).unwrap_or(0);
    QError::NanInput { op, index, shape: shape.to_vec() }
}

/// Quantizes a block with per-tensor parameters already validated; returns whether any input
/// was NaN.
pub(crate) fn quantize_block<T: QElement>(
    isa: Isa,
    src: &[f32],
    dst: &mut [T],
    inv: f32,
    zp: i32,
    qmin: i32,
    qmax: i32,
) -> bool {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx512Vnni) {
        match T::DTYPE {
            DType::U8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: `isa` was capped to what the CPU supports, so AVX-512 F/BW are available.
                return unsafe { x86::quantize8_avx512::<false>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: as above.
                return unsafe { x86::quantize8_avx512::<true>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I32 => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx2) {
        match T::DTYPE {
            DType::U8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: `isa` was capped to what the CPU supports, so AVX2 is available.
                return unsafe { x86::quantize8_avx2::<false>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: as above.
                return unsafe { x86::quantize8_avx2::<true>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I32 => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa.includes(Isa::Neon) {
        match T::DTYPE {
            DType::U8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: `isa` was capped to what the CPU supports, so NEON is available.
                return unsafe { arm::quantize8_neon::<false>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I8 => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                // SAFETY: as above.
                return unsafe { arm::quantize8_neon::<true>(src, dst, inv, zp, qmin, qmax) };
            }
            DType::I32 => {}
        }
    }
    let _ = isa;
    quantize_block_scalar(src, dst, inv, zp, qmin, qmax)
}

/// The scalar twin of [`quantize_block`].
pub(crate) fn quantize_block_scalar<T: QElement>(
    src: &[f32],
    dst: &mut [T],
    inv: f32,
    zp: i32,
    qmin: i32,
    qmax: i32,
) -> bool {
    let mut nan = false;
    for (x, y) in src.iter().zip(dst.iter_mut()) {
        nan |= x.is_nan();
        *y = T::from_i32_clamped(quantize_scalar(*x, inv, zp, qmin, qmax));
    }
    nan
}

/// Dequantizes a block with a validated scale.
pub(crate) fn dequantize_block<T: QElement>(isa: Isa, src: &[T], dst: &mut [f32], scale: f32, zp: i32) {
    debug_assert_eq!(src.len(), dst.len());
    // The vector paths subtract the zero point from an 8-bit code in i32, which cannot wrap
    // for zero points this far from i32's ends; the scalar path subtracts in i64.
    let isa = if (i32::MIN + 256..=i32::MAX - 256).contains(&zp) { isa } else { Isa::Scalar };
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx512Vnni) {
        match T::DTYPE {
            DType::U8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: `isa` was capped to what the CPU supports, so AVX-512 F/BW are available.
                return unsafe { x86::dequantize8_avx512::<false>(src, dst, scale, zp) };
            }
            DType::I8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: as above.
                return unsafe { x86::dequantize8_avx512::<true>(src, dst, scale, zp) };
            }
            DType::I32 => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx2) {
        match T::DTYPE {
            DType::U8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: `isa` was capped to what the CPU supports, so AVX2 is available.
                return unsafe { x86::dequantize8_avx2::<false>(src, dst, scale, zp) };
            }
            DType::I8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: as above.
                return unsafe { x86::dequantize8_avx2::<true>(src, dst, scale, zp) };
            }
            DType::I32 => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa.includes(Isa::Neon) {
        match T::DTYPE {
            DType::U8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: `isa` was capped to what the CPU supports, so NEON is available.
                return unsafe { arm::dequantize8_neon::<false>(src, dst, scale, zp) };
            }
            DType::I8 => {
                let src: &[u8] = bytemuck::cast_slice(src);
                // SAFETY: as above.
                return unsafe { arm::dequantize8_neon::<true>(src, dst, scale, zp) };
            }
            DType::I32 => {}
        }
    }
    let _ = isa;
    dequantize_block_scalar(src, dst, scale, zp);
}

/// The scalar twin of [`dequantize_block`].
pub(crate) fn dequantize_block_scalar<T: QElement>(src: &[T], dst: &mut [f32], scale: f32, zp: i32) {
    for (q, y) in src.iter().zip(dst.iter_mut()) {
        *y = dequantize_scalar(q.to_i32(), scale, zp);
    }
}

/// The scalar tail of the 8-bit vector loops (bytes stored as `u8`; `SIGNED` for i8).
fn quantize8_tail<const SIGNED: bool>(src: &[f32], dst: &mut [u8], inv: f32, zp: i32, qmin: i32, qmax: i32) -> bool {
    let mut any_nan = false;
    for (x, d) in src.iter().zip(dst.iter_mut()) {
        any_nan |= x.is_nan();
        let q = quantize_scalar(*x, inv, zp, qmin, qmax);
        *d = if SIGNED { q as i8 as u8 } else { q as u8 };
    }
    any_nan
}

/// The scalar tail of the 8-bit dequantize loops.
fn dequantize8_tail<const SIGNED: bool>(src: &[u8], dst: &mut [f32], scale: f32, zp: i32) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        let q = if SIGNED { *s as i8 as i32 } else { *s as i32 };
        *d = dequantize_scalar(q, scale, zp);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{dequantize8_tail, quantize8_tail};

    /// Largest magnitude the vector path converts to an integer: every value beyond it
    /// saturates to a range end anyway, and 2^24 is exact in f32 and far from i32 overflow.
    const LIMIT: f32 = 16_777_216.0;

    /// AVX2 twin of `quantize_block_scalar` for 8-bit outputs (`SIGNED` selects i8).
    ///
    /// Equal to the scalar formula bit for bit: for |x * inv| <= 2^24, `cvtps_epi32` rounds
    /// half to even exactly like `round_ties_even`, and adding the zero point in i32 equals the
    /// f32 sum whenever the result can land inside an 8-bit range; beyond 2^24 both paths
    /// clamp to the same range end. The epi32 clamp to [qmin, qmax] makes the saturating
    /// packs lossless.
    ///
    /// # Safety
    /// The CPU must support AVX2; `src` and `dst` must have equal lengths.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize8_avx2<const SIGNED: bool>(
        src: &[f32],
        dst: &mut [u8],
        inv: f32,
        zp: i32,
        qmin: i32,
        qmax: i32,
    ) -> bool {
        let n = src.len().min(dst.len());
        let vinv = _mm256_set1_ps(inv);
        let hi = _mm256_set1_ps(LIMIT);
        let lo = _mm256_set1_ps(-LIMIT);
        let vzp = _mm256_set1_epi32(zp);
        let vmin = _mm256_set1_epi32(qmin);
        let vmax = _mm256_set1_epi32(qmax);
        // packs interleave 128-bit lanes; this puts the 8 groups of 4 bytes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut nan = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            let mut q = [_mm256_setzero_si256(); 4];
            for (j, qj) in q.iter_mut().enumerate() {
                // SAFETY: i + 8j + 8 <= i + 32 <= n = src.len(): the 8 floats are in bounds.
                let x = unsafe { _mm256_loadu_ps(src.as_ptr().add(i + 8 * j)) };
                nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, vinv), lo), hi);
                // Rounds half to even: Rust code never changes MXCSR from its default.
                let r = _mm256_add_epi32(_mm256_cvtps_epi32(t), vzp);
                *qj = _mm256_max_epi32(_mm256_min_epi32(r, vmax), vmin);
            }
            let w0 = _mm256_packs_epi32(q[0], q[1]);
            let w1 = _mm256_packs_epi32(q[2], q[3]);
            let b = if SIGNED { _mm256_packs_epi16(w0, w1) } else { _mm256_packus_epi16(w0, w1) };
            let b = _mm256_permutevar8x32_epi32(b, order);
            // SAFETY: i + 32 <= n = dst.len(): the 32 bytes are in bounds; storeu needs no alignment.
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), b) };
            i += 32;
        }
        let any_nan = _mm256_movemask_ps(nan) != 0;
        quantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], inv, zp, qmin, qmax) | any_nan
    }

    /// AVX2 twin of `dequantize_block_scalar` for 8-bit inputs (`SIGNED` selects i8): the
    /// difference `q - zp` is exact in i32 and in f32, then one f32 multiply, as in the scalar.
    ///
    /// # Safety
    /// The CPU must support AVX2; `src` and `dst` must have equal lengths.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize8_avx2<const SIGNED: bool>(src: &[u8], dst: &mut [f32], scale: f32, zp: i32) {
        let n = src.len().min(dst.len());
        let vscale = _mm256_set1_ps(scale);
        let vzp = _mm256_set1_epi32(zp);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n = src.len(): the 16 bytes are in bounds.
            let b = unsafe { _mm_loadu_si128(src.as_ptr().add(i).cast()) };
            let halves = [b, _mm_srli_si128::<8>(b)];
            for (j, h) in halves.into_iter().enumerate() {
                let w = if SIGNED { _mm256_cvtepi8_epi32(h) } else { _mm256_cvtepu8_epi32(h) };
                let y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(w, vzp)), vscale);
                // SAFETY: i + 8j + 8 <= i + 16 <= n = dst.len(): the 8 floats are in bounds.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i + 8 * j), y) };
            }
            i += 16;
        }
        dequantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], scale, zp);
    }

    /// AVX-512 twin of `quantize_block_scalar` for 8-bit outputs; the same argument as for
    /// [`quantize8_avx2`] makes it exact. After the epi32 clamp every lane fits the output
    /// type, so the saturating down-conversions (`vpmovusdb` / `vpmovsdb`) are lossless.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW; `src` and `dst` must have equal lengths.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize8_avx512<const SIGNED: bool>(
        src: &[f32],
        dst: &mut [u8],
        inv: f32,
        zp: i32,
        qmin: i32,
        qmax: i32,
    ) -> bool {
        let n = src.len().min(dst.len());
        let vinv = _mm512_set1_ps(inv);
        let hi = _mm512_set1_ps(LIMIT);
        let lo = _mm512_set1_ps(-LIMIT);
        let vzp = _mm512_set1_epi32(zp);
        let vmin = _mm512_set1_epi32(qmin);
        let vmax = _mm512_set1_epi32(qmax);
        let mut nan: __mmask16 = 0;
        let mut i = 0;
        while i + 64 <= n {
            for j in 0..4 {
                // SAFETY: i + 16j + 16 <= i + 64 <= n = src.len(): the 16 floats are in bounds.
                let x = unsafe { _mm512_loadu_ps(src.as_ptr().add(i + 16 * j)) };
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, vinv), lo), hi);
                // Rounds half to even: Rust code never changes MXCSR from its default.
                let r = _mm512_add_epi32(_mm512_cvtps_epi32(t), vzp);
                let r = _mm512_max_epi32(_mm512_min_epi32(r, vmax), vmin);
                let b = if SIGNED { _mm512_cvtsepi32_epi8(r) } else { _mm512_cvtusepi32_epi8(r) };
                // SAFETY: i + 16j + 16 <= n = dst.len(): the 16 bytes are in bounds; no alignment needed.
                unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(i + 16 * j).cast(), b) };
            }
            i += 64;
        }
        quantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], inv, zp, qmin, qmax) | (nan != 0)
    }

    /// AVX-512 twin of `dequantize_block_scalar` for 8-bit inputs.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW; `src` and `dst` must have equal lengths.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize8_avx512<const SIGNED: bool>(src: &[u8], dst: &mut [f32], scale: f32, zp: i32) {
        let n = src.len().min(dst.len());
        let vscale = _mm512_set1_ps(scale);
        let vzp = _mm512_set1_epi32(zp);
        let mut i = 0;
        while i + 64 <= n {
            for j in 0..4 {
                // SAFETY: i + 16j + 16 <= i + 64 <= n = src.len(): the 16 bytes are in bounds.
                let b = unsafe { _mm_loadu_si128(src.as_ptr().add(i + 16 * j).cast()) };
                let w = if SIGNED { _mm512_cvtepi8_epi32(b) } else { _mm512_cvtepu8_epi32(b) };
                let y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(w, vzp)), vscale);
                // SAFETY: i + 16j + 16 <= n = dst.len(): the 16 floats are in bounds.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i + 16 * j), y) };
            }
            i += 64;
        }
        dequantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], scale, zp);
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::{dequantize8_tail, quantize8_tail};

    /// Largest magnitude the vector path converts to an integer (as on x86: beyond it every
    /// value saturates to a range end anyway; 2^24 is exact in f32).
    const LIMIT: f32 = 16_777_216.0;

    /// NEON twin of `quantize_block_scalar` for 8-bit outputs (`SIGNED` selects i8), 16 values
    /// per step. Exact for the reasons the x86 twins are: `fcvtns` rounds half to even like
    /// `round_ties_even`; adding the zero point in i32 equals the f32 sum wherever the result
    /// can land inside an 8-bit range, and beyond 2^24 both paths clamp to the same end; after
    /// the i32 clamp to `[qmin, qmax]` the narrowing keeps every value.
    ///
    /// # Safety
    /// The CPU has NEON (every aarch64 CPU).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn quantize8_neon<const SIGNED: bool>(
        src: &[f32],
        dst: &mut [u8],
        inv: f32,
        zp: i32,
        qmin: i32,
        qmax: i32,
    ) -> bool {
        let n = src.len().min(dst.len());
        let (vinv, hi, lo) = (vdupq_n_f32(inv), vdupq_n_f32(LIMIT), vdupq_n_f32(-LIMIT));
        let (vzp, vmin, vmax) = (vdupq_n_s32(zp), vdupq_n_s32(qmin), vdupq_n_s32(qmax));
        let mut ordered = vdupq_n_u32(u32::MAX);
        let mut i = 0;
        while i + 16 <= n {
            let q: [int32x4_t; 4] = std::array::from_fn(|j| {
                // SAFETY: i + 4j + 4 <= i + 16 <= n = src.len().
                let x = unsafe { vld1q_f32(src.as_ptr().add(i + 4 * j)) };
                ordered = vandq_u32(ordered, vceqq_f32(x, x));
                let t = vminq_f32(vmaxq_f32(vmulq_f32(x, vinv), lo), hi);
                vmaxq_s32(vminq_s32(vaddq_s32(vcvtnq_s32_f32(t), vzp), vmax), vmin)
            });
            let h0 = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
            let h1 = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
            // Every lane lies in [qmin, qmax], an 8-bit range: the low byte is the value.
            let b = vreinterpretq_u8_s8(vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
            // SAFETY: i + 16 <= n = dst.len().
            unsafe { vst1q_u8(dst.as_mut_ptr().add(i), b) };
            i += 16;
        }
        let any_nan = vminvq_u32(ordered) == 0;
        quantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], inv, zp, qmin, qmax) | any_nan
    }

    /// NEON twin of `dequantize_block_scalar` for 8-bit inputs: `q - zp` exact in i32 and
    /// f32, then one multiply.
    ///
    /// # Safety
    /// The CPU has NEON.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dequantize8_neon<const SIGNED: bool>(src: &[u8], dst: &mut [f32], scale: f32, zp: i32) {
        let n = src.len().min(dst.len());
        let (vscale, vzp) = (vdupq_n_f32(scale), vdupq_n_s32(zp));
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n = src.len().
            let b = unsafe { vld1q_u8(src.as_ptr().add(i)) };
            let (w0, w1) = if SIGNED {
                let s = vreinterpretq_s8_u8(b);
                (vmovl_s8(vget_low_s8(s)), vmovl_high_s8(s))
            } else {
                (vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(b))), vreinterpretq_s16_u16(vmovl_high_u8(b)))
            };
            let quads =
                [vmovl_s16(vget_low_s16(w0)), vmovl_high_s16(w0), vmovl_s16(vget_low_s16(w1)), vmovl_high_s16(w1)];
            for (j, q) in quads.into_iter().enumerate() {
                let y = vmulq_f32(vcvtq_f32_s32(vsubq_s32(q, vzp)), vscale);
                // SAFETY: i + 4j + 4 <= i + 16 <= n = dst.len().
                unsafe { vst1q_f32(dst.as_mut_ptr().add(i + 4 * j), y) };
            }
            i += 16;
        }
        dequantize8_tail::<SIGNED>(&src[i..n], &mut dst[i..n], scale, zp);
    }
}
