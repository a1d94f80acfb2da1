//! The quantized addition with PyTorch's vectorized formula, one element at a time: each
//! input dequantized as `fma(s, q, s * -z)`, added, optional `max(.., 0)`, quantized.

use crate::frame::ops::QuantU8;

/// See `frame::kernels::AddKernel`.
///
/// # Safety
/// Every row's `ncols` elements are readable at `a`, `b` and writable at `out`, rows `ld`
/// apart; `out` is `a` or overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn add_u8(
    a: *const u8,
    (sa, za): (f32, i32),
    b: *const u8,
    (sb, zb): (f32, i32),
    out: *mut u8,
    (so, zo): (f32, i32),
    relu: bool,
    (rows, ncols, ld): (usize, usize, usize),
) {
    let (qa, qb, qo) = (
        QuantU8 { scale: sa, zero_point: za },
        QuantU8 { scale: sb, zero_point: zb },
        QuantU8 { scale: so, zero_point: zo },
    );
    for r in 0..rows {
        for i in r * ld..r * ld + ncols {
            // SAFETY: element i of row r is in bounds (precondition); out[i] is written after
            // a[i] is read.
            let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
            let mut c = qa.dequantize_vec(x) + qb.dequantize_vec(y);
            if relu {
                c = c.max(0.0);
            }
            // SAFETY: as above.
            unsafe { *out.add(i) = qo.quantize(c) };
        }
    }
}
