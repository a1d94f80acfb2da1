//! Bad shapes and parameters are errors that say what to do, never panics.

use qkernels::{
    gemm, Activation, Conv2dGeometry, GemmOutput, OutputQuant, PackedConv2d, PackedLinear, PackedWeights, QImage,
    QMatrix,
};
use qtensor::{QError, QParams, QTensor};

fn w(n: usize, k: usize) -> QTensor<i8> {
    QTensor::quantize(&ndarray::Array2::<f32>::zeros((n, k)), QParams::per_tensor(0.1, 0).unwrap()).unwrap()
}

const Q: OutputQuant = OutputQuant { scale: 0.1, zero_point: 0, activation: Activation::None };

#[test]
fn gemm_rejects_mismatched_shapes_and_buffers() {
    let packed = PackedWeights::new(&w(4, 8)).unwrap();
    let x = [0u8; 14];
    let a = QMatrix { data: &x, m: 2, k: 7, lda: 7, scale: 0.1, zero_point: 0 };
    let mut out = [0u8; 8];
    let e = gemm(&a, &packed, None, GemmOutput::U8 { data: &mut out, ldc: 4, quant: Q }, 1).unwrap_err().to_string();
    assert!(e.contains("expected [2, 8], got [2, 7]") && e.contains("in_features"), "{e}");
    let a = QMatrix { data: &x, m: 2, k: 8, lda: 8, scale: 0.1, zero_point: 0 };
    let e = gemm(&a, &packed, None, GemmOutput::U8 { data: &mut out, ldc: 4, quant: Q }, 1).unwrap_err().to_string();
    assert!(e.contains("14 bytes cannot hold 2 rows of 8"), "{e}");
    let x = [0u8; 16];
    let a = QMatrix { data: &x, m: 2, k: 8, lda: 8, scale: 0.1, zero_point: 0 };
    let mut small = [0u8; 7];
    let e = gemm(&a, &packed, None, GemmOutput::U8 { data: &mut small, ldc: 4, quant: Q }, 1).unwrap_err().to_string();
    assert!(e.contains("output buffer of 7 elements cannot hold 2 rows of 4"), "{e}");
    let e = gemm(&a, &packed, Some(&[0.0; 3]), GemmOutput::U8 { data: &mut out, ldc: 4, quant: Q }, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected [4], got [3]") && e.contains("bias"), "{e}");
    let a = QMatrix { data: &x, m: 2, k: 8, lda: 8, scale: 0.1, zero_point: 300 };
    let e = gemm(&a, &packed, None, GemmOutput::U8 { data: &mut out, ldc: 4, quant: Q }, 1).unwrap_err().to_string();
    assert!(e.contains("zero point 300"), "{e}");
    let e = PackedLinear::new(&w(4, 8), Some(&[0.0, f32::NAN, 0.0, 0.0])).unwrap_err().to_string();
    assert!(e.contains("bias[1] = NaN"), "{e}");
}

#[test]
fn conv_rejects_bad_weights_geometry_and_inputs() {
    let w3 = QTensor::<i8>::quantize(&ndarray::Array3::<f32>::zeros((2, 3, 3)), QParams::per_tensor(0.1, 0).unwrap())
        .unwrap();
    let e = PackedConv2d::new(&w3, None, Conv2dGeometry::default()).unwrap_err().to_string();
    assert!(e.contains("OHWI") && e.contains("[2, 3, 3]"), "{e}");
    let w4 =
        QTensor::<i8>::quantize(&ndarray::Array4::<f32>::zeros((6, 3, 3, 2)), QParams::per_tensor(0.1, 0).unwrap())
            .unwrap();
    let e = PackedConv2d::new(&w4, None, Conv2dGeometry { groups: 4, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("groups = 4"), "{e}");
    let conv = PackedConv2d::new(&w4, None, Conv2dGeometry::default()).unwrap();
    let x = vec![0u8; 5 * 5 * 3];
    let img = QImage { data: &x, n: 1, h: 5, w: 5, c: 3, scale: 0.1, zero_point: 0 };
    let mut out = vec![0u8; 9 * 6];
    let e = conv.forward_u8(&img, Q, &mut out, 1).unwrap_err().to_string();
    assert!(e.contains("[1, 5, 5, 2]") && e.contains("in_channels"), "{e}");
    let x = vec![0u8; 2 * 2 * 2];
    let img = QImage { data: &x, n: 1, h: 2, w: 2, c: 2, scale: 0.1, zero_point: 0 };
    let e = conv.forward_u8(&img, Q, &mut out, 1).unwrap_err().to_string();
    assert!(e.contains("smaller than the 3x3 kernel"), "{e}");
    let x = vec![0u8; 5 * 5 * 2];
    let img = QImage { data: &x, n: 1, h: 5, w: 5, c: 2, scale: 0.1, zero_point: 0 };
    let e = conv.forward_u8(&img, Q, &mut out[..10], 1).unwrap_err().to_string();
    assert!(e.contains("[1, 3, 3, 6]"), "{e}");
}

#[test]
fn quantize_boundary_reports_nan_at_its_nchw_index() {
    // Planes longer than the kernel's 1024-value blocks: the index must count whole planes
    // and blocks before the one holding the NaN.
    let (n, c, h, w) = (2, 3, 40, 40);
    let mut x = vec![0.25f32; n * c * h * w];
    let at = (3 + 2) * h * w + 1500;
    x[at] = f32::NAN;
    x[at + 7] = f32::NAN;
    let mut out = vec![0u8; x.len()];
    let q = qkernels::QuantU8 { scale: 0.1, zero_point: 3 };
    let e = qkernels::quantize_nchw_to_nhwc(&x, (n, c, h, w), q, &mut out).unwrap_err();
    assert!(matches!(e, QError::NanInput { index, .. } if index == at), "{e}");
    assert!(e.to_string().contains("[2, 3, 40, 40]"), "{e}");
}

/// Codes packed at run time (`PackedWeights::from_codes`) multiply exactly as the same codes
/// packed from a tensor, on every tier; bad lengths and parameters are errors.
#[test]
fn codes_packed_at_run_time_match_a_tensor_and_are_checked() {
    let (n, k) = (5, 13);
    let codes: Vec<i8> = (0..n * k).map(|i| ((i * 37) % 251) as u8 as i8).collect();
    let t = QTensor::from_int_repr(
        ndarray::Array2::from_shape_vec((n, k), codes.clone()).unwrap(),
        QParams::per_tensor(0.05, -7).unwrap(),
        qtensor::QuantRange::full(qtensor::DType::I8),
    )
    .unwrap();
    let x: Vec<u8> = (0..3 * k).map(|i| (i * 11 % 256) as u8).collect();
    let a = QMatrix { data: &x, m: 3, k, lda: k, scale: 0.02, zero_point: 9 };
    for isa in crate::isas_under_test() {
        let (mut want, mut got) = ([0i32; 15], [0i32; 15]);
        let from_tensor = PackedWeights::with_isa(isa, &t).unwrap();
        let from_codes = PackedWeights::from_codes(isa, codes.clone(), n, k, 0.05, -7).unwrap();
        assert_eq!(from_codes.isa(), from_tensor.isa());
        gemm(&a, &from_tensor, None, GemmOutput::I32 { data: &mut want, ldc: n }, 1).unwrap();
        gemm(&a, &from_codes, None, GemmOutput::I32 { data: &mut got, ldc: n }, 1).unwrap();
        assert_eq!(got, want, "{isa}");
    }
    // Weights small enough for the AVX2 tier to pair quads in a layer's packing (a run-time
    // packing does not search for pairs), rows within the pair bound and above it, u8 output.
    let (m, n, k) = (7, 40, 64);
    let codes: Vec<i8> = (0..n * k).map(|i| ((i * 29 + i / 7) % 81) as i8 - 40).collect();
    let t = QTensor::from_int_repr(
        ndarray::Array2::from_shape_vec((n, k), codes.clone()).unwrap(),
        QParams::per_tensor(0.01, 3).unwrap(),
        qtensor::QuantRange::full(qtensor::DType::I8),
    )
    .unwrap();
    let x: Vec<u8> = (0..m * k).map(|i| if i < 4 * k { (i * 13 % 128) as u8 } else { (i * 53 % 256) as u8 }).collect();
    let a = QMatrix { data: &x, m, k, lda: k, scale: 0.02, zero_point: 9 };
    let quant = qkernels::OutputQuant { scale: 0.3, zero_point: 5, activation: qkernels::Activation::None };
    for isa in crate::isas_under_test() {
        let (mut want, mut got) = (vec![0u8; m * n], vec![0u8; m * n]);
        let from_tensor = PackedWeights::with_isa(isa, &t).unwrap();
        let from_codes = PackedWeights::from_codes(isa, codes.clone(), n, k, 0.01, 3).unwrap();
        gemm(&a, &from_tensor, None, GemmOutput::U8 { data: &mut want, ldc: n, quant }, 1).unwrap();
        gemm(&a, &from_codes, None, GemmOutput::U8 { data: &mut got, ldc: n, quant }, 1).unwrap();
        assert_eq!(got, want, "{isa}");
    }
    let isa = qtensor::isa::selected();
    let e = PackedWeights::from_codes(isa, vec![0; 10], 3, 4, 0.1, 0).unwrap_err().to_string();
    assert!(e.contains("10 codes for [n, k] = [3, 4]"), "{e}");
    let e = PackedWeights::from_codes(isa, vec![0; 12], 3, 4, 0.0, 0).unwrap_err().to_string();
    assert!(e.contains("scale 0"), "{e}");
    let e = PackedWeights::from_codes(isa, vec![0; 12], 3, 4, 0.1, 128).unwrap_err().to_string();
    assert!(e.contains("zero point 128"), "{e}");
}
