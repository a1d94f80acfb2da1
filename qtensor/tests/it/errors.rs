//! Bad input is an error that names the operation, the values and the fix; never a panic.

use ndarray::{array, Array3};
use qtensor::{choose_qparams, DType, QError, QParams, QScheme, QTensor, QuantRange, DEFAULT_EPS};

fn msg<T: std::fmt::Debug>(r: Result<T, QError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_scales_are_rejected_with_the_value() {
    for s in [0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e-40] {
        let m = msg(QParams::per_tensor(s, 0));
        assert!(m.contains("QParams::per_tensor") && m.contains("scale") && m.contains("must be finite"), "{m}");
    }
    let m = msg(QParams::per_channel(vec![0.1, 0.0, 0.2], vec![0, 0, 0], 0));
    assert!(m.contains("(channel 1)"), "{m}");
    // A hand-built per-tensor value is checked where it is used.
    let m = msg(QTensor::<u8>::quantize(&array![1.0f32], QParams::PerTensor { scale: -2.0, zero_point: 0 }));
    assert!(m.contains("QTensor::quantize") && m.contains("-2e0"), "{m}");
}

#[test]
fn zero_point_outside_the_range() {
    let m = msg(QTensor::<i8>::quantize(&array![1.0f32], QParams::per_tensor(0.1, 128).unwrap()));
    assert!(m.contains("zero point 128") && m.contains("[-128, 127]") && m.contains("qint8"), "{m}");
    let r = QuantRange::custom(DType::I8, -127, 127).unwrap();
    let m = msg(QTensor::<i8>::quantize_in_range(&array![1.0f32], QParams::per_tensor(0.1, -128).unwrap(), r));
    assert!(m.contains("[-127, 127]"), "{m}");
}

#[test]
fn per_channel_axis_and_lengths() {
    let x = Array3::<f32>::zeros((2, 3, 4));
    let m = msg(QTensor::<u8>::quantize(&x, QParams::per_channel(vec![1.0; 3], vec![0; 3], 3).unwrap()));
    assert!(m.contains("axis 3") && m.contains("[2, 3, 4]") && m.contains("0..3"), "{m}");
    let m = msg(QTensor::<u8>::quantize(&x, QParams::per_channel(vec![1.0; 4], vec![0; 4], 1).unwrap()));
    assert!(m.contains("4 scales") && m.contains("3 channels") && m.contains("[2, 3, 4]"), "{m}");
    let m = msg(QParams::per_channel(vec![1.0; 2], vec![0; 3], 0));
    assert!(m.contains("2 scales and 3 zero points"), "{m}");
    let m = msg(QParams::per_channel(vec![], vec![], 0));
    assert!(m.contains("0 scales"), "{m}");
}

#[test]
fn nan_names_its_index_and_shape() {
    let x = array![[0.0f32, 1.0], [f32::NAN, 2.0]];
    let err = QTensor::<u8>::quantize(&x, QParams::per_tensor(0.1, 0).unwrap()).unwrap_err();
    assert_eq!(err, QError::NanInput { op: "QTensor::quantize", index: 2, shape: vec![2, 2] });
    assert!(err.to_string().contains("flat index 2"), "{err}");
}

#[test]
fn ranges_must_be_valid_for_their_dtype() {
    let m = msg(QuantRange::custom(DType::U8, 0, 300));
    assert!(m.contains("[0, 300]") && m.contains("quint8") && m.contains("[0, 255]"), "{m}");
    let m = msg(QuantRange::custom(DType::I8, 1, 5));
    assert!(m.contains("include 0"), "{m}");
    let m = msg(QuantRange::custom(DType::I8, 0, 0));
    assert!(m.contains("strictly less"), "{m}");
    let m = msg(QTensor::<u8>::quantize_in_range(
        &array![1.0f32],
        QParams::per_tensor(1.0, 0).unwrap(),
        QuantRange::full(DType::I8),
    ));
    assert!(m.contains("range is for i8") && m.contains("values are u8"), "{m}");
}

#[test]
fn choose_qparams_rejects_what_cannot_be_calibrated() {
    let full = QuantRange::full(DType::U8);
    let m = msg(choose_qparams(f32::INFINITY, f32::NEG_INFINITY, DType::U8, QScheme::Affine, full, DEFAULT_EPS));
    assert!(m.contains("nothing was observed"), "{m}");
    let m = msg(choose_qparams(f32::NAN, 1.0, DType::U8, QScheme::Affine, full, DEFAULT_EPS));
    assert!(m.contains("NaN"), "{m}");
    let m = msg(choose_qparams(-1.0, f32::INFINITY, DType::U8, QScheme::Affine, full, DEFAULT_EPS));
    assert!(m.contains("infinite"), "{m}");
    let m = msg(choose_qparams(2.0, 1.0, DType::U8, QScheme::Affine, full, DEFAULT_EPS));
    assert!(m.contains("min > max"), "{m}");
    let m = msg(choose_qparams(-1.0, 1.0, DType::U8, QScheme::Symmetric, QuantRange::reduced(DType::U8), DEFAULT_EPS));
    assert!(m.contains("reduce_range") && m.contains("i8"), "{m}");
    let m = msg(choose_qparams(-1.0, 1.0, DType::I8, QScheme::Affine, full, DEFAULT_EPS));
    assert!(m.contains("built for u8"), "{m}");
    let m = msg(choose_qparams(0.0, 0.0, DType::U8, QScheme::Affine, full, 0.0));
    assert!(m.contains("scale 0e0"), "{m}");
}

#[test]
fn from_int_repr_checks_values_against_the_range() {
    let r = QuantRange::custom(DType::I8, -127, 127).unwrap();
    let m = msg(QTensor::<i8>::from_int_repr(array![0i8, -128], QParams::per_tensor(1.0, 0).unwrap(), r));
    assert!(m.contains("value -128 at flat index 1"), "{m}");
}

#[test]
fn slice_lengths_must_match() {
    let mut out = [0u8; 3];
    let m = msg(qtensor::kernels::quantize_slice(&[1.0, 2.0], &mut out, 1.0, 0, QuantRange::full(DType::U8)));
    assert!(m.contains("expected [2], got [3]"), "{m}");
}
