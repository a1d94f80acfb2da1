//! Every SIMD path equals the scalar reference bit for bit.

use proptest::prelude::*;
use qtensor::isa::{Arch, Isa};
use qtensor::kernels::{dequantize_slice_with, quantize_slice_with, PARALLEL_MIN_LEN};
use qtensor::{DType, QElement, QParams, QTensor, QuantRange};

use crate::{isas_under_test, XorShift};

/// Finite values of every magnitude, plus the specials that stress the vector path.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -300.0f32..300.0,
        2 => proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
        1 => prop::sample::select(vec![f32::INFINITY, f32::NEG_INFINITY, 16_777_216.0, -16_777_217.0, 0.5, -0.5, 2.5, -1.5, -0.0]),
    ]
}

fn scale() -> impl Strategy<Value = f32> {
    prop_oneof![
        (-20.0f32..10.0).prop_map(|e| e.exp2()),
        prop::sample::select(vec![0.5f32, 0.1, 1.0 / 3.0, 0.002_148_548_6])
    ]
}

fn range(dtype: DType) -> impl Strategy<Value = QuantRange> {
    let (lo, hi) = (dtype.min_value(), dtype.max_value());
    prop_oneof![
        Just(QuantRange::full(dtype)),
        Just(QuantRange::reduced(dtype)),
        (lo..=0i64, 0i64..=hi).prop_filter_map("empty", move |(a, b)| QuantRange::custom(dtype, a, b).ok()),
    ]
}

fn check_quantize<T: QElement>(xs: &[f32], scale: f32, zp_frac: f64, range: QuantRange) -> Result<(), TestCaseError> {
    let span = (range.qmax() as i64 - range.qmin() as i64) as f64;
    let zp = (range.qmin() as f64 + (zp_frac * span).floor()) as i32;
    let mut reference = vec![T::default(); xs.len()];
    let ref_result = quantize_slice_with(Isa::Scalar, xs, &mut reference, scale, zp, range);
    for isa in isas_under_test() {
        let mut got = vec![T::default(); xs.len()];
        let result = quantize_slice_with(isa, xs, &mut got, scale, zp, range);
        prop_assert_eq!(&result, &ref_result, "{} result differs", isa);
        if ref_result.is_ok() {
            prop_assert_eq!(&got, &reference, "{} quantize differs from scalar", isa);
        }
        let mut back = vec![0.0f32; xs.len()];
        let mut back_ref = vec![0.0f32; xs.len()];
        dequantize_slice_with(isa, &reference, &mut back, scale, zp).unwrap();
        dequantize_slice_with(Isa::Scalar, &reference, &mut back_ref, scale, zp).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&back), bits(&back_ref), "{} dequantize differs from scalar", isa);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(192)))]

    #[test]
    fn u8_simd_equals_scalar(xs in prop::collection::vec(value(), 0..200), s in scale(), z in 0.0f64..1.0, r in range(DType::U8)) {
        check_quantize::<u8>(&xs, s, z, r)?;
    }

    #[test]
    fn i8_simd_equals_scalar(xs in prop::collection::vec(value(), 0..200), s in scale(), z in 0.0f64..1.0, r in range(DType::I8)) {
        check_quantize::<i8>(&xs, s, z, r)?;
    }

    #[test]
    fn i32_simd_equals_scalar(xs in prop::collection::vec(value(), 0..80), s in scale(), z in 0.0f64..1.0, r in range(DType::I32)) {
        check_quantize::<i32>(&xs, s, z, r)?;
    }

    #[test]
    fn nan_is_reported_by_every_isa(mut xs in prop::collection::vec(-10.0f32..10.0, 1..100), at in any::<prop::sample::Index>()) {
        let i = at.index(xs.len());
        xs[i] = f32::NAN;
        for isa in isas_under_test() {
            let mut q = vec![0u8; xs.len()];
            let err = quantize_slice_with(isa, &xs, &mut q, 0.1, 3, QuantRange::full(DType::U8)).unwrap_err();
            prop_assert_eq!(err, qtensor::QError::NanInput { op: "quantize_slice", index: i, shape: vec![xs.len()] });
        }
    }
}

/// Above the parallel threshold the result is the same as element-by-element scalar code,
/// whatever the chunking and the instruction set.
#[test]
fn parallel_quantize_equals_serial_scalar() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let n = PARALLEL_MIN_LEN * 3 + 17;
    let xs: Vec<f32> = (0..n).map(|_| rng.unit() * 40.0).collect();
    let (scale, zp) = (0.137f32, 77);
    let expected: Vec<u8> =
        xs.iter().map(|&x| qtensor::kernels::quantize_scalar(x, 1.0 / scale, zp, 0, 255) as u8).collect();
    for isa in isas_under_test() {
        let mut got = vec![0u8; n];
        quantize_slice_with(isa, &xs, &mut got, scale, zp, QuantRange::full(DType::U8)).unwrap();
        assert_eq!(got, expected, "{isa}");
        let t = QTensor::<u8>::quantize_with(
            isa,
            &ndarray::Array1::from(xs.clone()),
            QParams::per_tensor(scale, zp).unwrap(),
            QuantRange::full(DType::U8),
        )
        .unwrap();
        assert_eq!(t.as_slice(), &expected[..], "{isa} QTensor");
        let back = t.dequantize_with(isa);
        let expected_back: Vec<f32> = expected.iter().map(|&q| scale * (q as i32 - zp) as f32).collect();
        assert_eq!(back.as_slice().unwrap(), &expected_back[..], "{isa} dequantize");
    }
}

/// A large per-channel tensor (parallel blocks) equals the same tensor quantized with each
/// instruction set, and equals per-channel scalar math.
#[test]
fn parallel_per_channel_equals_scalar() {
    let mut rng = XorShift(42);
    let shape = [4usize, 64, 300];
    let n: usize = shape.iter().product();
    let xs = ndarray::Array::from_shape_fn(shape, |_| rng.unit() * 5.0);
    let scales: Vec<f32> = (0..64).map(|c| 0.01 + c as f32 * 0.003).collect();
    let zps: Vec<i32> = (0..64).map(|c| (c * 7 % 255) - 128).collect();
    let p = QParams::per_channel(scales.clone(), zps.clone(), 1).unwrap();
    assert!(n >= PARALLEL_MIN_LEN);
    let reference = QTensor::<i8>::quantize_with(Isa::Scalar, &xs, p.clone(), QuantRange::full(DType::I8)).unwrap();
    for ((idx, &x), &q) in xs.indexed_iter().zip(reference.as_slice()) {
        let c = idx.1;
        assert_eq!(q as i32, qtensor::kernels::quantize_scalar(x, 1.0 / scales[c], zps[c], -128, 127));
    }
    for isa in isas_under_test() {
        let t = QTensor::<i8>::quantize_with(isa, &xs, p.clone(), QuantRange::full(DType::I8)).unwrap();
        assert_eq!(t, reference, "{isa}");
        assert_eq!(t.dequantize_with(isa), reference.dequantize_with(Isa::Scalar), "{isa}");
    }
}

#[test]
fn isa_selection_from_environment_values() {
    use qtensor::isa::resolve;
    assert_eq!(resolve(None, false), Ok(Isa::best_supported()));
    assert_eq!(resolve(Some("auto"), true), Ok(Isa::best_supported()));
    assert_eq!(resolve(Some("scalar"), true), Ok(Isa::Scalar));
    let err = resolve(Some("sse9"), false).unwrap_err();
    assert!(err.contains("auto, scalar, avx2, avx512vnni, amx, neon, dotprod, i8mm"), "{err}");
    // Each architecture's own tiers cap to what the CPU has; the other's are refused.
    let (own, other) = match Isa::host_arch() {
        Arch::X86_64 => (vec![Isa::Avx2, Isa::Avx512Vnni, Isa::Amx], vec![Isa::Neon, Isa::I8mm]),
        Arch::Aarch64 => (vec![Isa::Dotprod, Isa::I8mm], vec![Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]),
        Arch::Any => return,
    };
    for isa in own {
        let upper = isa.name().to_uppercase();
        assert_eq!(resolve(Some(&upper), false), Ok(isa.capped_to_supported()));
        if !isa.is_supported() {
            let err = resolve(Some(isa.name()), true).unwrap_err();
            assert!(err.contains(&format!("lacks {isa}")), "{err}");
        }
    }
    for isa in other {
        assert!(!isa.is_supported());
        let err = resolve(Some(isa.name()), false).unwrap_err();
        assert!(err.contains("tier, but this binary runs on"), "{err}");
    }
    assert!(Isa::Avx512Vnni.includes(Isa::Avx2) && Isa::I8mm.includes(Isa::Dotprod));
    assert!(Isa::Amx.includes(Isa::Avx512Vnni) && !Isa::Avx512Vnni.includes(Isa::Amx) && !Isa::Amx.includes(Isa::I8mm));
    assert!(!Isa::I8mm.includes(Isa::Avx2) && !Isa::Avx2.includes(Isa::Neon) && Isa::Neon.includes(Isa::Scalar));
}

/// Zero points near i32's ends: `q - zp` leaves i32, and every tier must still give the
/// scalar path's values (which subtract in i64).
#[test]
fn dequantize_with_extreme_zero_points_equals_scalar() {
    let u: Vec<u8> = (0..=255).collect();
    let s: Vec<i8> = (-128..=127).collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for zp in [i32::MIN, i32::MIN + 1, i32::MIN + 255, i32::MAX - 127, i32::MAX, 1 << 30, -(1 << 30)] {
        let (mut want_u, mut want_s) = (vec![0f32; 256], vec![0f32; 256]);
        dequantize_slice_with(Isa::Scalar, &u, &mut want_u, 0.5, zp).unwrap();
        dequantize_slice_with(Isa::Scalar, &s, &mut want_s, 0.5, zp).unwrap();
        for isa in isas_under_test() {
            let (mut got_u, mut got_s) = (vec![0f32; 256], vec![0f32; 256]);
            dequantize_slice_with(isa, &u, &mut got_u, 0.5, zp).unwrap();
            dequantize_slice_with(isa, &s, &mut got_s, 0.5, zp).unwrap();
            assert_eq!(bits(&got_u), bits(&want_u), "{isa}, u8, zero point {zp}");
            assert_eq!(bits(&got_s), bits(&want_s), "{isa}, i8, zero point {zp}");
        }
    }
}
