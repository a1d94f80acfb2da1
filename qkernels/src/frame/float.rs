//! `f32` linear, matrix product and conv2d as one-call functions: `linear_f32` through
//! `matrixmultiply::sgemm`, `matmul_f32` through the float convolution's register tiles,
//! `conv2d_f32` packing its weights into a [`crate::PackedConv2dF32`] for the call.

use qtensor::{QError, Result};

use crate::frame::conv::Conv2dGeometry;

const OP: &str = "qkernels::float";

fn shape_err(expected: Vec<usize>, actual: Vec<usize>, hint: &'static str) -> QError {
    QError::ShapeMismatch { op: OP, expected, actual, hint }
}

/// `out[m x n] = x[m x k] · w[n x k]ᵀ + bias`, all row-major.
///
/// # Errors
/// Buffers whose lengths do not match `m`, `k`, `n`.
pub fn linear_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    if x.len() != m * k {
        return Err(shape_err(vec![m, k], vec![x.len()], "x must be m x k"));
    }
    if w.len() != n * k {
        return Err(shape_err(vec![n, k], vec![w.len()], "weights must be out_features x in_features"));
    }
    if out.len() != m * n {
        return Err(shape_err(vec![m, n], vec![out.len()], "out must be m x n"));
    }
    if let Some(b) = bias {
        if b.len() != n {
            return Err(shape_err(vec![n], vec![b.len()], "one bias per output"));
        }
    }
    gemm_f32(x, m, k, k, w, n, bias, out, n);
    Ok(())
}

/// `c[i*ldc + j] = Σ_k a[i*lda + k] * w[j*k + k'] + bias[j]`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k && w.len() >= n * k && c.len() >= (m - 1) * ldc + n, "gemm_f32 bounds");
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        match bias {
            Some(b) => row.copy_from_slice(b),
            None => row.fill(0.0),
        }
    }
    // SAFETY: the assert above shows every element addressed through these strides lies in
    // its slice: A is m x k with row stride lda, B = wᵀ is k x n with strides (1, k), C is
    // m x n with row stride ldc; C does not alias A or B (distinct borrows).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            lda as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            1.0,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// `out[m x n] = a[m x k] · b[k x n]`, all row-major: a matrix product of two run-time
/// operands (attention's `q · kᵀ` and `p · v` in the float paths). `b` is packed for the call
/// into panels of 32 columns, and blocks of 8 rows by 32 columns sum their `k` products by
/// fused multiply-adds in `k` order on the float convolution's register tiles: the same bits
/// on every tier.
///
/// # Errors
/// Buffers whose lengths do not match `m`, `k`, `n`.
pub fn matmul_f32(a: &[f32], b: &[f32], mkn: (usize, usize, usize), out: &mut [f32]) -> Result<()> {
    matmul_f32_with(qtensor::isa::selected(), a, b, mkn, out)
}

/// [`matmul_f32`] of `a` and the transpose of `bt` (`n x k`, row-major): attention's
/// `q · kᵀ` from `k` itself, with no transposed copy. The same bits as [`matmul_f32`] of `a`
/// and `bt` transposed.
///
/// # Errors
/// Buffers whose lengths do not match `m`, `k`, `n`.
pub fn matmul_f32_bt(a: &[f32], bt: &[f32], mkn: (usize, usize, usize), out: &mut [f32]) -> Result<()> {
    matmul_f32_bt_with(qtensor::isa::selected(), a, bt, mkn, out)
}

/// [`matmul_f32_bt`] on an explicit instruction set (capped to what the CPU has).
///
/// # Errors
/// As [`matmul_f32_bt`].
pub fn matmul_f32_bt_with(
    isa: qtensor::isa::Isa,
    a: &[f32],
    bt: &[f32],
    mkn: (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    matmul(isa, a, bt, true, mkn, out)
}

/// [`matmul_f32`] on an explicit instruction set (capped to what the CPU has), for
/// conformance tests.
///
/// # Errors
/// As [`matmul_f32`].
pub fn matmul_f32_with(
    isa: qtensor::isa::Isa,
    a: &[f32],
    b: &[f32],
    mkn: (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    matmul(isa, a, b, false, mkn, out)
}

/// `a · b`, or `a · btᵀ` with `transposed` (`b` then `n x k`).
fn matmul(
    isa: qtensor::isa::Isa,
    a: &[f32],
    b: &[f32],
    transposed: bool,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    use crate::frame::fconv::{run_tile, Tile, MR, PANEL};
    let len = |x: usize, y: usize| x.checked_mul(y);
    if len(m, k) != Some(a.len()) {
        return Err(shape_err(vec![m, k], vec![a.len()], "the left operand must be m x k"));
    }
    if len(k, n) != Some(b.len()) {
        return Err(if transposed {
            shape_err(vec![n, k], vec![b.len()], "the right operand, transposed, must be n x k")
        } else {
            shape_err(vec![k, n], vec![b.len()], "the right operand must be k x n")
        });
    }
    if len(m, n) != Some(out.len()) {
        return Err(shape_err(vec![m, n], vec![out.len()], "the output must be m x n"));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let kernels = crate::registry::kernels(isa);
    let panels = n.div_ceil(PANEL);
    // Panel p holds rows kk of b's columns 32p.. (zero past n), k rows of 32 values.
    let mut packed = PANELS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    packed.grow_to(panels * k * PANEL);
    for p in 0..panels {
        let cols = (n - p * PANEL).min(PANEL);
        let panel = &mut packed[p * k * PANEL..][..k * PANEL];
        if transposed {
            // Column j of the panel is row 32p + j of `bt`, read along k.
            panel.fill(0.0);
            for j in 0..cols {
                for (kk, &v) in b[(p * PANEL + j) * k..][..k].iter().enumerate() {
                    panel[kk * PANEL + j] = v;
                }
            }
        } else {
            for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                dst[..cols].copy_from_slice(&b[kk * n + p * PANEL..][..cols]);
                dst[cols..].fill(0.0);
            }
        }
    }
    const ZEROS: [f32; PANEL] = [0.0; PANEL];
    for p in 0..panels {
        let panel = &packed[p * k * PANEL..][..k * PANEL];
        let cols = (n - p * PANEL).min(PANEL);
        for r0 in (0..m).step_by(MR) {
            let rows = (m - r0).min(MR);
            // Rows past m repeat the block's first row: read, summed, never written.
            let ptrs: [*const f32; MR] = std::array::from_fn(|r| a[(r0 + if r < rows { r } else { 0 }) * k..].as_ptr());
            let t = Tile { ptrs: &ptrs, seg_len: k, panel, bias: &ZEROS, rows, cols, ldo: n };
            // SAFETY: every pointer starts a row of `a` with `k` values after it (rows below
            // m); the panel holds `k` rows of 32 values; the output from row r0, column 32p
            // holds `(rows - 1) * n + cols` values (rows r0..r0 + rows of n columns, cols of
            // them from 32p).
            unsafe { run_tile(kernels, &t, &mut out[r0 * n + p * PANEL..], crate::frame::gemm::Activation::None) };
        }
    }
    PANELS.with(|c| {
        let mut cur = c.borrow_mut();
        if cur.len() < packed.len() {
            *cur = packed;
        }
    });
    Ok(())
}

thread_local! {
    /// Each thread's buffer of [`matmul_f32`]'s packed right operand (taken out for a call).
    static PANELS: std::cell::RefCell<crate::frame::aligned::Aligned<f32>> =
        std::cell::RefCell::new(crate::frame::aligned::Aligned::default());
}

/// `f32` conv2d on NHWC input with OHWI weights (`[oc, kh, kw, c / groups]`), NHWC output.
///
/// # Errors
/// Shapes that do not agree, or an input smaller than the dilated kernel.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_f32(
    x: &[f32],
    nhwc: (usize, usize, usize, usize),
    weights: &[f32],
    okk: (usize, usize, usize),
    bias: Option<&[f32]>,
    geom: Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    conv2d_f32_with(qtensor::isa::selected(), x, nhwc, weights, okk, bias, geom, out)
}

/// [`conv2d_f32`] with an explicit instruction set, for conformance tests: the weights are
/// packed into a [`crate::PackedConv2dF32`] for this one call, which gives bit-identical
/// results on every tier.
///
/// # Errors
/// As [`conv2d_f32`].
#[allow(clippy::too_many_arguments)]
pub fn conv2d_f32_with(
    isa: qtensor::isa::Isa,
    x: &[f32],
    (n, h, w, c): (usize, usize, usize, usize),
    weights: &[f32],
    (oc, kh, kw): (usize, usize, usize),
    bias: Option<&[f32]>,
    geom: Conv2dGeometry,
    out: &mut [f32],
) -> Result<()> {
    // The packed kernel checks the weights, bias, geometry, input and output; only the
    // channel split it is given needs checking here.
    let g = geom.groups;
    if g == 0 || c % g != 0 {
        return Err(QError::Unsupported {
            op: OP,
            reason: format!("{c} input channels in {g} groups: groups must be positive and divide the channels"),
        });
    }
    let icg = c / g;
    let packed = crate::frame::fconv::PackedConv2dF32::with_isa(
        isa,
        weights,
        crate::frame::fconv::WeightLayout::Ohwi,
        (oc, icg, kh, kw),
        bias,
        geom,
        crate::frame::gemm::Activation::None,
    )?;
    packed.forward(x, (n, h, w, c), out, 1)
}
