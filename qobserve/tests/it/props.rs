//! Properties: chosen ranges cover the data, merging equals observing both, percentile 100
//! equals min-max, SIMD scans equal scalar ones, and errors say what went wrong.

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use qobserve::{
    EntropyObserver, HistogramObserver, MinMaxObserver, MseObserver, NonFinite, ObserveError, Observer, ObserverSpec,
    PerChannelMinMaxObserver, PercentileObserver, QConfig, QuantSpec,
};

fn batch() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(prop_oneof![-100.0f32..100.0, -1.0f32..1.0, Just(0.0)], 1..300)
}

fn arr(v: &[f32]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn minmax_merge_equals_observing_both(a in batch(), b in batch()) {
        let spec = QuantSpec::u8_affine();
        let mut both = MinMaxObserver::new(spec);
        both.observe(arr(&a).view()).unwrap();
        both.observe(arr(&b).view()).unwrap();
        let mut left = MinMaxObserver::new(spec);
        left.observe(arr(&a).view()).unwrap();
        let mut right = MinMaxObserver::new(spec);
        right.observe(arr(&b).view()).unwrap();
        left.merge(&right).unwrap();
        prop_assert_eq!(left.qparams().unwrap(), both.qparams().unwrap());
    }

    #[test]
    fn histogram_merge_of_equal_ranges_adds_counts(a in batch()) {
        let spec = QuantSpec::u8_affine();
        let mut twice = HistogramObserver::new(spec).unwrap();
        twice.observe(arr(&a).view()).unwrap();
        twice.observe(arr(&a).view()).unwrap();
        let mut one = HistogramObserver::new(spec).unwrap();
        one.observe(arr(&a).view()).unwrap();
        let copy = one.clone();
        one.merge(&copy).unwrap();
        prop_assert_eq!(one.collector(), twice.collector());
        prop_assert_eq!(one.qparams().unwrap(), twice.qparams().unwrap());
    }

    #[test]
    fn percentile_100_equals_minmax(a in batch(), b in batch()) {
        for spec in [QuantSpec::u8_affine(), QuantSpec::i8_symmetric()] {
            let mut p = PercentileObserver::new(spec, 100.0).unwrap();
            let mut m = MinMaxObserver::new(spec);
            for x in [&a, &b] {
                p.observe(arr(x).view()).unwrap();
                m.observe(arr(x).view()).unwrap();
            }
            prop_assert_eq!(p.qparams().unwrap(), m.qparams().unwrap());
        }
    }

    /// Every observer's range covers what it clips to, and min-max-like observers cover the
    /// whole observed range, to half a step.
    #[test]
    fn qparams_cover_the_observed_range(a in batch()) {
        let spec = QuantSpec::u8_affine();
        let lo = a.iter().copied().fold(f32::INFINITY, f32::min).min(0.0) as f64;
        let hi = a.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.0) as f64;
        let mut observers: Vec<Box<dyn Observer>> = vec![
            Box::new(MinMaxObserver::new(spec)),
            Box::new(PercentileObserver::new(spec, 100.0).unwrap()),
        ];
        for o in &mut observers {
            o.observe(arr(&a).view()).unwrap();
            let p = o.qparams().unwrap();
            let (s, z) = (p.scale(0) as f64, p.zero_point(0) as f64);
            let tol = s * 0.51 + 1e-6 * hi.abs().max(lo.abs());
            prop_assert!(s * (0.0 - z) <= lo + tol && s * (255.0 - z) >= hi - tol, "{}: [{lo}, {hi}] vs scale {s} zp {z}", o.kind());
        }
        // The clipping observers stay inside the observed range.
        let mut clipping: Vec<Box<dyn Observer>> = vec![
            Box::new(HistogramObserver::new(spec).unwrap()),
            Box::new(PercentileObserver::new(spec, 99.0).unwrap()),
            Box::new(EntropyObserver::new(spec).unwrap()),
            Box::new(MseObserver::new(spec).unwrap()),
        ];
        for o in &mut clipping {
            o.observe(arr(&a).view()).unwrap();
            let p = o.qparams().unwrap();
            // Entropy calibration is symmetric around 0 for signed data, like TensorRT's.
            let span = if o.kind() == "Entropy" && lo < 0.0 { 2.0 * lo.abs().max(hi) } else { hi - lo };
            prop_assert!(p.scale(0) as f64 <= span / 255.0 * 1.01 + 1e-6, "{}: scale {} for range [{lo}, {hi}]", o.kind(), p.scale(0));
        }
    }

    #[test]
    fn per_channel_equals_per_tensor_on_each_channel(rows in 1usize..6, cols in 1usize..40, seed in any::<u32>()) {
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.3).collect();
        let x = ArrayD::from_shape_vec(IxDyn(&[rows, cols]), v).unwrap();
        let spec = QuantSpec::i8_symmetric();
        let mut pc = PerChannelMinMaxObserver::new(spec, 0);
        pc.observe(x.view()).unwrap();
        let p = pc.qparams().unwrap();
        for r in 0..rows {
            let mut t = MinMaxObserver::new(spec);
            t.observe(x.index_axis(ndarray::Axis(0), r)).unwrap();
            let q = t.qparams().unwrap();
            prop_assert_eq!((p.scale(r), p.zero_point(r)), (q.scale(0), q.zero_point(0)));
        }
    }
}

#[test]
fn errors_say_what_to_do() {
    let spec = QuantSpec::u8_affine();
    let e = MinMaxObserver::new(spec).qparams().unwrap_err().for_tensor("layer1.0.conv2 output").to_string();
    assert!(e.contains("observer for layer1.0.conv2 output saw no data: did calibration run"), "{e}");
    let e = HistogramObserver::new(spec)
        .unwrap()
        .observe(arr(&[1.0, f32::NAN, f32::INFINITY]).view())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 non-finite") && e.contains("flat index 1") && e.contains("NonFinite::Ignore"), "{e}");
    let mut ok = MinMaxObserver::new(spec).with_non_finite(NonFinite::Ignore);
    ok.observe(arr(&[1.0, f32::NAN, -2.0]).view()).unwrap();
    assert_eq!(ok.observed_range(), Some((vec![-2.0], vec![1.0])));
    let e = PerChannelMinMaxObserver::new(spec, 2).observe(arr(&[1.0]).view()).unwrap_err().to_string();
    assert!(e.contains("channel axis 2") && e.contains("[1]"), "{e}");
    let e = MinMaxObserver::moving_average(spec, 1.5).unwrap_err().to_string();
    assert!(e.contains("(0, 1]"), "{e}");
    let e = QuantSpec::u8_affine();
    let sym_u8 = QuantSpec { scheme: qtensor::QScheme::Symmetric, ..e };
    assert!(matches!(sym_u8.reduce_range(), Err(ObserveError::QParams(_))));
    let mut m = MinMaxObserver::moving_average(spec, 0.5).unwrap();
    let other = m.clone();
    assert!(m.merge(&other).unwrap_err().to_string().contains("order of batches"));
}

#[test]
fn presets_create_their_observers() {
    for cfg in [QConfig::default(), QConfig::pytorch_x86(), QConfig::qnnpack(), QConfig::pytorch_minmax()] {
        let a = cfg.activation.create().unwrap();
        let w = cfg.weight.create().unwrap();
        assert!(!a.kind().is_empty() && !w.kind().is_empty());
    }
    assert_eq!(QConfig::pytorch_x86().activation.create().unwrap().spec().range.qmax(), 127);
    assert_eq!(QConfig::default().activation.create().unwrap().spec().range.qmax(), 255);
    assert!(QConfig::default().weight.is_per_channel());
    assert!(ObserverSpec::MovingAverageMinMax { spec: QuantSpec::u8_affine(), averaging: 0.0 }.create().is_err());
}

/// A ReLU output of normal data: half exact zeros, half a half-normal up to about 4. Zero is
/// represented exactly at any threshold, so the entropy search must not clip to keep the
/// zeros' spike in a narrow first group (binned with the rest, it picked 1.5 here).
#[test]
fn entropy_calibration_is_not_pulled_down_by_exact_zeros() {
    let n = 20_000;
    let mut v = vec![0.0f32; n];
    v.extend((0..n).map(|i| {
        // Box-Muller on a deterministic low-discrepancy pair.
        let (u1, u2) = ((i as f64 + 0.5) / n as f64, (i as f64 * 0.618_033_988_75).fract());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()).abs() as f32
    }));
    let amax = v.iter().copied().fold(0.0f32, f32::max);
    let mut o = EntropyObserver::new(QuantSpec::u8_affine()).unwrap();
    o.observe(arr(&v).view()).unwrap();
    let t = o.threshold().unwrap();
    assert!(t > 0.8 * amax, "threshold {t} of a range up to {amax}");
    // Signed data keeps its symmetric range; only zeros are left out.
    let signed: Vec<f32> = v.iter().enumerate().map(|(i, &x)| if i % 2 == 0 { x } else { -x }).collect();
    let mut s = EntropyObserver::new(QuantSpec::u8_affine()).unwrap();
    s.observe(arr(&signed).view()).unwrap();
    // [-t, t] in u8: the zero point is 255 / 2, rounded.
    assert!((127..=128).contains(&s.qparams().unwrap().zero_point(0)));
    // All zeros: a threshold of 0, not "no data".
    let mut z = EntropyObserver::new(QuantSpec::u8_affine()).unwrap();
    z.observe(arr(&[0.0; 8]).view()).unwrap();
    assert_eq!(z.threshold().unwrap(), 0.0);
    z.qparams().unwrap();
    assert!(EntropyObserver::new(QuantSpec::u8_affine()).unwrap().threshold().is_err());
}

/// Observers calibrated apart and merged know what either saw: a negative value seen by one
/// makes the merged entropy range symmetric.
#[test]
fn merged_entropy_observers_keep_the_sign() {
    let spec = QuantSpec::u8_affine();
    let (mut a, mut b) = (EntropyObserver::new(spec).unwrap(), EntropyObserver::new(spec).unwrap());
    a.observe(arr(&[0.5, 1.0, 2.0]).view()).unwrap();
    b.observe(arr(&[-1.0, 0.25]).view()).unwrap();
    a.merge(&b).unwrap();
    assert!((127..=128).contains(&a.qparams().unwrap().zero_point(0)));
}
