//! `f32` linear and conv2d as one-call functions: `linear_f32` through `matrixmultiply::sgemm`,
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
