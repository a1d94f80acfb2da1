//! Properties that hold for every input: round-trip error, monotonicity, per-channel
//! consistency, requantize, and the coverage of chosen parameters.

use ndarray::{ArrayD, Axis, IxDyn};
use proptest::prelude::*;
use qtensor::{
    choose_qparams, choose_qparams_per_channel, fake_quantize, DType, QElement, QParams, QScheme, QTensor, QuantRange,
    DEFAULT_EPS,
};

/// Slack on the `scale / 2` round-trip bound: `x * (1/scale)` and `scale * (q - zp)` are each
/// rounded once in f32, so the bound holds up to a few ulps of `x` and of `scale`.
fn roundtrip_slack(x: f32, scale: f32) -> f32 {
    4.0 * f32::EPSILON * (x.abs() + scale)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::U8, DType::I8, DType::I32])
}

fn params_for(dtype: DType) -> impl Strategy<Value = (f32, i32)> {
    let (lo, hi) = (dtype.min_value().max(-100_000), dtype.max_value().min(100_000));
    ((-12.0f32..6.0).prop_map(f32::exp2), lo..=hi).prop_map(|(s, z)| (s, z as i32))
}

fn roundtrip<T: QElement>(scale: f32, zp: i32, fracs: &[f64]) -> Result<(), TestCaseError> {
    let (lo, hi) = (T::MIN as f64, T::MAX as f64);
    // Values inside the representable interval [scale*(qmin-zp), scale*(qmax-zp)].
    let xs: Vec<f32> = fracs.iter().map(|f| (scale as f64 * ((lo - zp as f64) + f * (hi - lo))) as f32).collect();
    let x = ndarray::Array1::from(xs);
    let q = QTensor::<T>::quantize(&x, QParams::per_tensor(scale, zp).unwrap()).unwrap();
    for (a, b) in q.dequantize().iter().zip(x.iter()) {
        prop_assert!((a - b).abs() <= scale / 2.0 + roundtrip_slack(*b, scale), "x {b} -> {a}, scale {scale} zp {zp}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(160)))]

    #[test]
    fn roundtrip_error_is_at_most_half_a_step(
        p in params_for(DType::U8), p8 in params_for(DType::I8), p32 in params_for(DType::I32),
        fracs in prop::collection::vec(0.0f64..=1.0, 1..64),
    ) {
        roundtrip::<u8>(p.0, p.1, &fracs)?;
        roundtrip::<i8>(p8.0, p8.1, &fracs)?;
        // i32: keep the values where f32 still resolves single steps (|q - zp| < 2^22).
        let narrow: Vec<f64> = fracs.iter().map(|f| 0.5 + (f - 0.5) * 1e-3).collect();
        roundtrip::<i32>(p32.0, 0, &narrow)?;
    }

    #[test]
    fn quantize_is_monotone(mut xs in prop::collection::vec(-1e4f32..1e4, 2..100), p in params_for(DType::I8)) {
        xs.sort_by(f32::total_cmp);
        let q = QTensor::<i8>::quantize(&ndarray::Array1::from(xs), QParams::per_tensor(p.0, p.1).unwrap()).unwrap();
        prop_assert!(q.as_slice().windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn per_channel_equals_per_tensor_channel_by_channel(
        dims in prop::collection::vec(1usize..6, 1..5),
        axis_pick in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let axis = axis_pick.index(dims.len());
        let mut rng = crate::XorShift(seed | 1);
        let x = ArrayD::from_shape_fn(IxDyn(&dims), |_| rng.unit() * 3.0);
        let c = dims[axis];
        let scales: Vec<f32> = (0..c).map(|_| 0.001 + rng.unit().abs() * 0.05).collect();
        let zps: Vec<i32> = (0..c).map(|_| (rng.next_u64() % 256) as i32).collect();
        let q = QTensor::<u8>::quantize(&x, QParams::per_channel(scales.clone(), zps.clone(), axis).unwrap()).unwrap();
        let deq = q.dequantize();
        let ints = q.int_repr();
        for ch in 0..c {
            let slice = x.index_axis(Axis(axis), ch);
            let per_tensor = QTensor::<u8>::quantize(&slice, QParams::per_tensor(scales[ch], zps[ch]).unwrap()).unwrap();
            prop_assert_eq!(ints.index_axis(Axis(axis), ch), per_tensor.int_repr());
            prop_assert_eq!(deq.index_axis(Axis(axis), ch), per_tensor.dequantize());
        }
    }

    #[test]
    fn requantize_equals_quantize_of_dequantize(
        data in prop::collection::vec(any::<u8>(), 1..200),
        src in params_for(DType::U8), dst8 in params_for(DType::I8), dst32 in params_for(DType::I32),
    ) {
        let q = QTensor::<u8>::from_int_repr(ndarray::Array1::from(data), QParams::per_tensor(src.0, src.1).unwrap(), QuantRange::full(DType::U8)).unwrap();
        let p8 = QParams::per_tensor(dst8.0, dst8.1).unwrap();
        prop_assert_eq!(q.requantize::<i8>(p8.clone()).unwrap(), QTensor::<i8>::quantize(&q.dequantize(), p8).unwrap());
        let p32 = QParams::per_tensor(dst32.0, dst32.1).unwrap();
        prop_assert_eq!(q.requantize::<i32>(p32.clone()).unwrap(), QTensor::<i32>::quantize(&q.dequantize(), p32).unwrap());
        let pu = QParams::per_tensor(src.0 * 2.0, 0).unwrap();
        let r = QuantRange::reduced(DType::U8);
        prop_assert_eq!(q.requantize_in_range::<u8>(pu.clone(), r).unwrap(), QTensor::<u8>::quantize_in_range(&q.dequantize(), pu, r).unwrap());
    }

    #[test]
    fn fake_quantize_equals_quantize_then_dequantize(xs in prop::collection::vec(-50.0f32..50.0, 1..100), p in params_for(DType::I8)) {
        let x = ndarray::Array1::from(xs);
        let params = QParams::per_tensor(p.0, p.1).unwrap();
        let range = QuantRange::custom(DType::I8, -127, 127).unwrap();
        let zp_ok = range.contains(p.1 as i64);
        let fq = fake_quantize::<i8, _, _>(&x, &params, range);
        prop_assert_eq!(fq.is_ok(), zp_ok);
        if let Ok(fq) = fq {
            let two_step = QTensor::<i8>::quantize_in_range(&x, params, range).unwrap().dequantize();
            prop_assert_eq!(fq.into_dyn(), two_step);
        }
    }

    /// The chosen parameters represent the whole observed range (up to half a step at each
    /// end), zero exactly, and keep the zero point inside the range.
    #[test]
    fn chosen_qparams_cover_the_range(
        a in -1e3f32..1e3, b in -1e3f32..1e3, dtype in dtype(), symmetric in any::<bool>(), reduce in any::<bool>(),
    ) {
        let (min, max) = if a <= b { (a, b) } else { (b, a) };
        let scheme = if symmetric { QScheme::Symmetric } else { QScheme::Affine };
        let range = QuantRange::for_observer(dtype, None, reduce).unwrap();
        let p = match choose_qparams(min, max, dtype, scheme, range, DEFAULT_EPS) {
            Ok(p) => p,
            Err(e) => {
                // The one combination PyTorch rejects too.
                prop_assert!(symmetric && reduce && dtype == DType::U8, "{e}");
                return Ok(());
            }
        };
        let (s, z) = (p.scale(0) as f64, p.zero_point(0) as f64);
        prop_assert!(range.contains(z as i64));
        let lo = s * (range.qmin() as f64 - z);
        let hi = s * (range.qmax() as f64 - z);
        let tol = s * 0.5 + 1e-6 * (min.abs().max(max.abs()) as f64);
        prop_assert!(lo <= (min.min(0.0) as f64) + tol, "min {min} not covered: [{lo}, {hi}]");
        prop_assert!(hi >= (max.max(0.0) as f64) - tol, "max {max} not covered: [{lo}, {hi}]");
    }

    #[test]
    fn per_channel_qparams_equal_per_tensor_qparams(
        bounds in prop::collection::vec((-50.0f32..50.0, -50.0f32..50.0), 1..8), symmetric in any::<bool>(),
    ) {
        let mins: Vec<f32> = bounds.iter().map(|(a, b)| a.min(*b)).collect();
        let maxs: Vec<f32> = bounds.iter().map(|(a, b)| a.max(*b)).collect();
        let scheme = if symmetric { QScheme::Symmetric } else { QScheme::Affine };
        let range = QuantRange::full(DType::I8);
        let pc = choose_qparams_per_channel(&mins, &maxs, 0, DType::I8, scheme, range, DEFAULT_EPS).unwrap();
        for c in 0..mins.len() {
            let pt = choose_qparams(mins[c], maxs[c], DType::I8, scheme, range, DEFAULT_EPS).unwrap();
            prop_assert_eq!(pc.scale(c).to_bits(), pt.scale(0).to_bits());
            prop_assert_eq!(pc.zero_point(c), pt.zero_point(0));
        }
    }
}

#[test]
fn infinities_saturate_and_zero_is_exact() {
    let x = ndarray::array![f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MAX, f32::MIN];
    let q = QTensor::<u8>::quantize(&x, QParams::per_tensor(0.1, 7).unwrap()).unwrap();
    assert_eq!(q.as_slice(), &[255, 0, 7, 7, 255, 0]);
    let q = QTensor::<i32>::quantize(&x, QParams::per_tensor(0.1, -3).unwrap()).unwrap();
    assert_eq!(q.as_slice(), &[i32::MAX, i32::MIN, -3, -3, i32::MAX, i32::MIN]);
}

#[test]
fn non_contiguous_views_quantize_like_their_copies() {
    let x = ndarray::Array2::from_shape_fn((5, 7), |(i, j)| i as f32 * 0.3 - j as f32 * 0.11);
    let t = x.t();
    let p = QParams::per_channel(vec![0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07], vec![0, 1, 2, 3, 4, 5, 6], 0).unwrap();
    let a = QTensor::<u8>::quantize(&t, p.clone()).unwrap();
    let b = QTensor::<u8>::quantize(&t.to_owned(), p).unwrap();
    assert_eq!(a, b);
}

#[test]
fn empty_tensors_are_fine() {
    let x = ndarray::Array2::<f32>::zeros((0, 3));
    let q = QTensor::<i8>::quantize(&x, QParams::per_channel(vec![1.0; 3], vec![0; 3], 1).unwrap()).unwrap();
    assert!(q.is_empty());
    assert_eq!(q.shape(), &[0, 3]);
    assert_eq!(q.dequantize().shape(), &[0, 3]);
}
