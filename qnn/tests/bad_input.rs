//! Bad input through the high-level API: every case is an `Err` whose message names the
//! module, the shapes or values, and what to do; nothing panics.

use ndarray::{ArrayD, IxDyn};
use qnn::layers::{Conv2d, Linear, ReLU};
use qnn::{fuse, prepare, zoo, Module, QConfigMapping, QuantizedModel, Residual, Sequential};
use qobserve::{ObserverSpec, QConfig};

fn x(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|k: usize| ((k * 7) % 13) as f32 / 6.0 - 1.0).collect()).unwrap()
}

fn digits() -> Sequential {
    let mut m = zoo::digits();
    zoo::randomize(&mut m, 2);
    fuse(&mut m).unwrap();
    m
}

fn converted() -> QuantizedModel {
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x(&[4, 1, 8, 8])).unwrap();
    p.convert().unwrap()
}

fn contains_all(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "{p:?} missing from: {e}");
    }
}

#[test]
fn nan_and_infinity_in_calibration_data_name_the_tensor_and_the_count() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap();
        let mut data = x(&[2, 1, 8, 8]);
        data[[1, 0, 3, 4]] = bad;
        data[[0, 0, 0, 0]] = bad;
        let e = p.calibrate(&data).unwrap_err().to_string();
        contains_all(&e, &["[2, 1, 8, 8]", "2 non-finite", "NonFinite::Ignore"]);
    }
}

#[test]
fn no_calibration_at_all_is_an_error_at_convert() {
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate_batches(&[], 2).unwrap();
    let e = p.convert().unwrap_err().to_string();
    contains_all(&e, &["calibrat"]);
}

#[test]
fn nan_at_inference_names_the_input_and_the_index() {
    let q = converted();
    let mut input = x(&[1, 1, 8, 8]);
    input[[0, 0, 2, 5]] = f32::NAN;
    let e = q.forward(&input).unwrap_err().to_string();
    // Flat NCHW index of [0, 0, 2, 5] in a 1x1x8x8 input: 21.
    contains_all(&e, &["(model input)", "NaN", "index 21"]);
    // Infinities are not errors at inference: like PyTorch, they saturate.
    input[[0, 0, 2, 5]] = f32::INFINITY;
    assert!(q.forward(&input).is_ok());
}

#[test]
fn empty_batches_and_empty_images() {
    let q = converted();
    // A batch of zero images is a batch of zero answers.
    let out = q.forward(&x(&[0, 1, 8, 8])).unwrap();
    assert_eq!(out.shape(), &[0, 10]);
    // Zero-sized images cannot be convolved: the first convolution says so.
    let e = q.forward(&x(&[1, 1, 0, 0])).unwrap_err().to_string();
    contains_all(&e, &["conv1", "0"]);
    // Calibration on an empty batch is refused (it would teach the observers nothing).
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap();
    let e = p.calibrate(&x(&[0, 1, 8, 8])).unwrap_err().to_string();
    contains_all(&e, &["(model input)", "[0, 1, 8, 8]", "empty batch"]);
    let e = p.calibrate_batches(&[x(&[1, 1, 8, 8]), x(&[0, 1, 8, 8])], 2).unwrap_err().to_string();
    contains_all(&e, &["[0, 1, 8, 8]", "empty batch"]);
    // The float model itself takes an empty batch.
    assert_eq!(digits().forward(&x(&[0, 1, 8, 8])).unwrap().shape(), &[0, 10]);
}

#[test]
fn wrong_rank_and_wrong_features_name_the_module_and_shapes() {
    let q = converted();
    let e = q.forward(&x(&[64])).unwrap_err().to_string();
    contains_all(&e, &["conv1", "[64]", "4-D"]);
    let mut lin = Sequential::new().add("fc", Linear::new(8, 4)).add("relu", ReLU);
    zoo::randomize(&mut lin, 1);
    let mut p = prepare(lin, &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x(&[3, 8])).unwrap();
    let e = p.calibrate(&x(&[3, 5])).unwrap_err().to_string();
    contains_all(&e, &["fc", "[3, 5]", "8"]);
    let q = p.convert().unwrap();
    let e = q.forward(&x(&[3, 5])).unwrap_err().to_string();
    contains_all(&e, &["fc", "5", "8"]);
}

#[test]
fn a_per_channel_axis_the_weights_do_not_have_is_an_error_naming_the_layer() {
    let mut qc = QConfig::default();
    let ObserverSpec::PerChannelMinMax { spec, .. } = qc.weight.clone() else {
        panic!("the default weights are per-channel");
    };
    qc.weight = ObserverSpec::PerChannelMinMax { spec, axis: 5 };
    let e = prepare(digits(), &QConfigMapping::new(qc))
        .and_then(|mut p| {
            p.calibrate(&x(&[2, 1, 8, 8]))?;
            p.convert()
        })
        .unwrap_err()
        .to_string();
    contains_all(&e, &["conv1", "axis 5"]);
}

#[test]
fn a_residual_whose_branches_disagree_names_the_addition_and_both_shapes() {
    let body = Sequential::new().add("conv", Conv2d::new(2, 3, 3).padding(1));
    let mut m = Sequential::new().add("res", Residual { body, shortcut: None, add_name: "add".into(), relu: None });
    zoo::randomize(&mut m, 4);
    let e = m.forward(&x(&[1, 2, 4, 4])).unwrap_err().to_string();
    contains_all(&e, &["res", "[1, 3, 4, 4]", "[1, 2, 4, 4]"]);
    let mut p = prepare(m, &QConfigMapping::new(QConfig::default())).unwrap();
    let e = p.calibrate(&x(&[1, 2, 4, 4])).unwrap_err().to_string();
    contains_all(&e, &["res", "[1, 3, 4, 4]", "[1, 2, 4, 4]"]);
}

/// A NaN far into a long input that is not an image (quantized in slices on one thread):
/// the error still gives its flat index in the whole input.
#[test]
fn nan_far_into_a_long_token_input_names_its_index() {
    let build = || {
        let mut g = qnn::GraphBuilder::new();
        let t = g.input("tokens");
        let y = g.layer("fc", Linear::new(16, 4), t).unwrap();
        g.output(y);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 4);
        graph
    };
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x(&[2, 3, 16])).unwrap();
    let q = p.convert().unwrap();
    // 2 x 3000 x 16 = 96000 values, beyond qtensor's parallel threshold (65536).
    let mut input = x(&[2, 3000, 16]);
    input[[1, 2500, 7]] = f32::NAN;
    let e = q.forward(&input).unwrap_err().to_string();
    let index = (3000 + 2500) * 16 + 7;
    contains_all(&e, &["(model input)", "NaN", &format!("index {index}")]);
}
