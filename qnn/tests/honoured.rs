//! Settings are honoured exactly or refused with an error that says what to do: never
//! silently approximated.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use qnn::{fuse, load_safetensors, prepare, sqnr_db, zoo, Module, NnError, QConfigMapping, Sequential};
use qobserve::{Observer, ObserverFactory, ObserverSpec, PerChannelMinMaxObserver, QConfig, QuantSpec};
use qtensor::{DType, QScheme, QuantRange, DEFAULT_EPS};

fn digits() -> Sequential {
    let mut m = zoo::digits();
    load_safetensors(&mut m, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    fuse(&mut m).unwrap();
    m
}

fn images(n: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[n, 1, 8, 8]), |i| ((i[0] * 5 + i[2] * 3 + i[3] * 7) % 17) as f32 / 16.0)
}

fn with_activations(spec: QuantSpec) -> QConfig {
    QConfig { activation: ObserverSpec::MinMax(spec), ..QConfig::default() }
}

/// Signed symmetric activations run as `u8` with zero point 128 and the same scale: the same
/// grid, so the model equals one calibrated with `u8` symmetric observers bit for bit, and
/// keeps the float model's accuracy.
#[test]
fn i8_symmetric_activations_run_as_u8_with_zero_point_128() {
    let i8_sym = QuantSpec {
        dtype: DType::I8,
        scheme: QScheme::Symmetric,
        range: QuantRange::full(DType::I8),
        eps: DEFAULT_EPS,
    };
    let u8_sym = QuantSpec {
        dtype: DType::U8,
        scheme: QScheme::Symmetric,
        range: QuantRange::full(DType::U8),
        eps: DEFAULT_EPS,
    };
    let x = images(32);
    let float = digits().forward(&x).unwrap();
    let convert = |spec| {
        let mut p = prepare(digits(), &QConfigMapping::new(with_activations(spec))).unwrap();
        p.calibrate(&x).unwrap();
        p.convert().unwrap()
    };
    let (signed, unsigned) = (convert(i8_sym), convert(u8_sym));
    assert_eq!(signed.input_quant().zero_point, 128);
    assert!(signed.output_quants().iter().all(|(_, q)| q.zero_point == 128), "{:?}", signed.output_quants());
    assert_eq!(signed.output_quants(), unsigned.output_quants());
    let out = signed.forward(&x).unwrap();
    assert_eq!(out, unsigned.forward(&x).unwrap());
    let sqnr = sqnr_db(&float, &out);
    assert!(sqnr > 25.0, "int8 with signed activations: {sqnr:.1} dB");
}

/// A per-channel observer on activations is refused when preparing, naming the module.
#[test]
fn a_per_channel_activation_observer_is_refused() {
    let per_channel = QConfig {
        activation: ObserverSpec::PerChannelMinMax { spec: QuantSpec::u8_affine(), axis: 1 },
        ..QConfig::default()
    };
    let err = prepare(digits(), &QConfigMapping::new(QConfig::default()).set_name("conv2", per_channel)).unwrap_err();
    let NnError::Config { module, reason } = &err else { panic!("{err}") };
    assert_eq!(module, "conv2");
    assert!(reason.contains("per channel") && reason.contains("QConfig::weight"), "{err}");
}

/// A custom observer that returns per-channel parameters for an activation is refused at
/// conversion (its kind is named), not reduced to its first channel.
#[test]
fn per_channel_parameters_from_a_custom_activation_observer_are_refused() {
    #[derive(Debug)]
    struct PerChannelFactory;
    impl ObserverFactory for PerChannelFactory {
        fn create(&self) -> Box<dyn Observer> {
            Box::new(PerChannelMinMaxObserver::new(QuantSpec::u8_affine(), 1))
        }
    }
    let cfg = QConfig { activation: ObserverSpec::Custom(Arc::new(PerChannelFactory)), ..QConfig::default() };
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default()).set_name("conv1", cfg)).unwrap();
    p.calibrate(&images(4)).unwrap();
    let err = p.convert().unwrap_err();
    let NnError::Config { module, reason } = &err else { panic!("{err}") };
    assert_eq!(module, "conv1 output");
    assert!(reason.contains("PerChannelMinMax") && reason.contains("per tensor"), "{err}");
}

/// A kind that no module has (PyTorch's class names are case-sensitive) is an error listing
/// the kinds the model has.
#[test]
fn an_unknown_kind_in_the_configuration_is_an_error() {
    let err = prepare(digits(), &QConfigMapping::new(QConfig::default()).skip_kind("conv2d")).unwrap_err();
    let NnError::Config { reason, .. } = &err else { panic!("{err}") };
    assert!(reason.contains("'conv2d'") && reason.contains("did you mean 'Conv2d'"), "{err}");
    assert!(reason.contains("Linear") && reason.contains("AdaptiveAvgPool2d"), "{err}");
    // The right spelling is accepted.
    prepare(digits(), &QConfigMapping::new(QConfig::default()).skip_kind("Conv2d")).unwrap();
}

/// NaN in calibration data: refused by default, skipped when the configuration says so.
#[test]
fn non_finite_calibration_values_are_skipped_when_configured() {
    use qobserve::ObserverSpec;
    let mut x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 1, 8, 8]), |i| (i[2] * 8 + i[3]) as f32 / 64.0);
    x[[0, 0, 0, 0]] = f32::NAN;
    let model = || {
        let mut m = qnn::zoo::digits();
        qnn::zoo::randomize(&mut m, 3);
        m
    };
    let e = qnn::prepare(model(), &qnn::QConfigMapping::new(qobserve::QConfig::default()))
        .unwrap()
        .calibrate(&x)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ObserverSpec::IgnoreNonFinite"), "{e}");
    let ignore = qobserve::QConfig::new(
        ObserverSpec::IgnoreNonFinite(Box::new(qobserve::QConfig::default().activation)),
        qobserve::QConfig::default().weight,
    );
    let mut p = qnn::prepare(model(), &qnn::QConfigMapping::new(ignore)).unwrap();
    p.calibrate(&x).unwrap();
    x[[0, 0, 0, 0]] = 0.0;
    assert_eq!(p.convert().unwrap().forward(&x).unwrap().shape(), &[4, 10]);
    // Observers that cannot skip say so.
    let spec = ObserverSpec::IgnoreNonFinite(Box::new(ObserverSpec::Mse(qobserve::QuantSpec::u8_affine())));
    let e = spec.create().unwrap_err().to_string();
    assert!(e.contains("IgnoreNonFinite") && e.contains("Mse"), "{e}");
}

/// A 4-bit activation range (`0..=15`) is honoured in int8 execution: every code of every
/// int8 value stays inside it, also for inputs wider than the calibration data, also after
/// saving and loading.
#[test]
fn a_custom_activation_range_bounds_every_code() {
    let four_bit = QuantSpec {
        dtype: DType::U8,
        scheme: QScheme::Affine,
        range: QuantRange::custom(DType::U8, 0, 15).unwrap(),
        eps: DEFAULT_EPS,
    };
    let mut p = prepare(digits(), &QConfigMapping::new(with_activations(four_bit))).unwrap();
    p.calibrate(&images(8)).unwrap();
    let q = p.convert().unwrap();
    // Twice the calibration range: outputs past it would need codes above 15.
    let x = images(8).mapv(|v| v * 2.0 - 0.5);
    let mut g = qnn::zoo::digits();
    load_safetensors(&mut g, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    let mut graph: qnn::Graph = g.into();
    qnn::fuse_graph(&mut graph).unwrap();
    let names: Vec<String> = graph.node_names().iter().map(|s| s.to_string()).collect();
    for n in &names {
        graph.add_output(n).unwrap();
    }
    let mut p = prepare(graph, &QConfigMapping::new(with_activations(four_bit))).unwrap();
    p.calibrate(&images(8)).unwrap();
    let all = p.convert().unwrap();
    let mut seen = 0;
    for v in all.forward_values(std::slice::from_ref(&x)).unwrap().iter().skip(1) {
        if let qnn::Value::U8 { data, .. } = v {
            assert!(data.iter().all(|&b| b <= 15), "a code above 15: {:?}", data.iter().max());
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} int8 values checked");
    let back = qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), q.forward(&x).unwrap());
    let qnn::Value::U8 { data, .. } = q.forward_value(&x).unwrap() else { panic!("int8 logits") };
    assert!(data.iter().all(|&b| b <= 15));
}

/// Sigmoid-like tables: PyTorch's fixed output grid when the outputs fill enough of it, the
/// observed range when they stay in a corner of it (`TableOutputs::Auto`, the default), or
/// as configured.
#[test]
fn table_outputs_follow_the_mapping() {
    use qnn::layers::{Linear, Sigmoid, Tanh};
    use qnn::TableOutputs;
    let build = || {
        let mut g = qnn::GraphBuilder::new();
        let x = g.input("x");
        let mut small = Linear::new(4, 4);
        small.weight =
            ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 4]), |i| if i[0] == i[1] { 0.1 } else { 0.0 });
        let a = g.layer("small", small, x).unwrap();
        let t = g.layer("tanh", Tanh, a).unwrap();
        let mut wide = Linear::new(4, 4);
        wide.weight = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 4]), |i| if i[0] == i[1] { 8.0 } else { 0.0 });
        let b = g.layer("wide", wide, t).unwrap();
        let s = g.layer("sigmoid", Sigmoid, b).unwrap();
        g.output(s);
        g.build().unwrap()
    };
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[64, 4]), |i| ((i[0] * 4 + i[1]) % 17) as f32 / 4.0 - 2.0);
    let quants = |t: TableOutputs| {
        let mut p = qnn::prepare(build(), &QConfigMapping::new(QConfig::default()).table_outputs(t)).unwrap();
        p.calibrate(&x).unwrap();
        let q = p.convert().unwrap();
        let get = |n: &str| q.output_quants().into_iter().find(|(name, _)| *name == n).unwrap().1;
        (get("tanh"), get("sigmoid"))
    };
    use qnn::qkernels::QuantU8;
    let (tanh_fixed, sigmoid_fixed) =
        (QuantU8 { scale: 1.0 / 128.0, zero_point: 128 }, QuantU8 { scale: 1.0 / 256.0, zero_point: 0 });
    // tanh(0.1 x) for x in [-2, 2] stays within +-0.2: the observed range; the sigmoid of
    // +-8 x spans nearly all of [0, 1]: the fixed grid.
    let (t, s) = quants(TableOutputs::Auto);
    assert!(t.scale < tanh_fixed.scale / 4.0, "{t:?}");
    assert_eq!(s, sigmoid_fixed);
    assert_eq!(quants(TableOutputs::Fixed), (tanh_fixed, sigmoid_fixed));
    let (t, s) = quants(TableOutputs::Observed);
    assert!(t.scale < tanh_fixed.scale / 4.0 && s != sigmoid_fixed, "{t:?} {s:?}");
}
