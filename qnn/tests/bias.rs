//! Bias correction (`QConfigMapping::bias_correction`, on by default): each static int8
//! convolution and linear layer gets the mean its rounded weights add taken off its bias.

use ndarray::{ArrayD, Axis, IxDyn};
use qnn::layers::{AdaptiveAvgPool2d, Conv2d, Flatten, Linear, ReLU};
use qnn::{prepare, sqnr_db, zoo, Graph, GraphBuilder, QConfigMapping, QuantizedModel};
use qobserve::QConfig;

/// Images of values in [-0.2, 0.8]: a non-zero mean, as normalized images and every ReLU's
/// output have.
fn images(seed: usize, shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v = (0..n).map(|k| ((k * 7919 + seed * 104_729) % 41) as f32 / 40.0 - 0.2).collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// A stem, a depthwise convolution, a pointwise one without a bias (its correction gives it
/// one), an average pool and a classifier.
fn model() -> Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("stem", Conv2d::new(3, 16, 3).padding(1), x).unwrap();
    let y = g.layer("stem_relu", ReLU, y).unwrap();
    let y = g.layer("dw", Conv2d::new(16, 16, 3).stride(2).padding(1).groups(16), y).unwrap();
    let y = g.layer("dw_relu", ReLU, y).unwrap();
    let y = g.layer("pw", Conv2d::new(16, 32, 1).no_bias(), y).unwrap();
    let y = g.layer("pw_relu", ReLU, y).unwrap();
    let y = g.layer("pool", AdaptiveAvgPool2d(1, 1), y).unwrap();
    let y = g.layer("flatten", Flatten, y).unwrap();
    let y = g.layer("fc", Linear::new(32, 10), y).unwrap();
    g.output(y);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 21);
    graph
}

/// The model converted with bias correction on or off, after the same calibration.
fn convert(correct: bool, calib: &[ArrayD<f32>]) -> (QuantizedModel, ArrayD<f32>) {
    let mut p = prepare(model(), &QConfigMapping::new(QConfig::default()).bias_correction(correct)).unwrap();
    for x in calib {
        p.calibrate(x).unwrap();
    }
    let simulated = p.simulate(&calib[0]).unwrap();
    (p.convert().unwrap(), simulated)
}

#[test]
fn corrected_biases_take_the_rounded_weights_mean_off() {
    let calib: Vec<ArrayD<f32>> = (0..4).map(|s| images(s, &[8, 3, 12, 12])).collect();
    let all = ndarray::concatenate(Axis(0), &calib.iter().map(ArrayD::view).collect::<Vec<_>>()).unwrap();
    let float = model().run(std::slice::from_ref(&all)).unwrap().remove(0);
    let (on, simulated) = convert(true, &calib);
    let (off, _) = convert(false, &calib);
    let corrected: Vec<&str> = on.plan().iter().filter(|e| e.bias_corrected).map(|e| e.name.as_str()).collect();
    assert_eq!(corrected, ["stem", "dw", "pw", "fc"]);
    assert!(off.plan().iter().all(|e| !e.bias_corrected));
    // Per logit, the mean error over the calibration data: the offset the correction removes.
    let mean_error = |q: &QuantizedModel| {
        let d = &q.forward(&all).unwrap() - &float;
        d.mean_axis(Axis(0)).unwrap().iter().fold(0f32, |m, v| m.max(v.abs()))
    };
    let (e_on, e_off) = (mean_error(&on), mean_error(&off));
    let (s_on, s_off) = (sqnr_db(&float, &on.forward(&all).unwrap()), sqnr_db(&float, &off.forward(&all).unwrap()));
    println!("largest mean error per logit: {e_off:.4} -> {e_on:.4}; SQNR {s_off:.2} -> {s_on:.2} dB");
    assert!(e_on < e_off / 2.0, "mean error {e_off} -> {e_on}");
    assert!(s_on > s_off + 1.0, "SQNR {s_off:.2} -> {s_on:.2} dB");
    // On data it was not calibrated on, too.
    let x = images(99, &[16, 3, 12, 12]);
    let f = model().run(std::slice::from_ref(&x)).unwrap().remove(0);
    let (t_on, t_off) = (sqnr_db(&f, &on.forward(&x).unwrap()), sqnr_db(&f, &off.forward(&x).unwrap()));
    println!("held-out SQNR {t_off:.2} -> {t_on:.2} dB");
    assert!(t_on > t_off + 1.0, "held-out SQNR {t_off:.2} -> {t_on:.2} dB");
    // Simulation corrects as conversion does.
    let int8 = on.forward(&calib[0]).unwrap();
    assert!(sqnr_db(&int8, &simulated) > 35.0, "simulation against int8: {:.1} dB", sqnr_db(&int8, &simulated));
    // Saved and loaded: the same outputs, the plan still says which layers were corrected.
    let back = QuantizedModel::from_bytes(&on.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), on.forward(&x).unwrap());
    assert_eq!(back.plan(), on.plan());
}

#[test]
fn dynamic_and_float_layers_are_not_corrected() {
    let mapping =
        QConfigMapping::new(QConfig::default()).skip_name("stem").set_kind("Linear", QConfig::dynamic_per_token());
    let mut p = prepare(model(), &mapping).unwrap();
    p.calibrate(&images(1, &[4, 3, 12, 12])).unwrap();
    let q = p.convert().unwrap();
    let corrected: Vec<&str> = q.plan().iter().filter(|e| e.bias_corrected).map(|e| e.name.as_str()).collect();
    assert_eq!(corrected, ["dw", "pw"]);
}

#[test]
fn bias_correction_is_chosen_per_module() {
    let corrected = |mapping: QConfigMapping| {
        let mut p = prepare(model(), &mapping).unwrap();
        p.calibrate(&images(2, &[4, 3, 12, 12])).unwrap();
        let q = p.convert().unwrap();
        q.plan().iter().filter(|e| e.bias_corrected).map(|e| e.name.clone()).collect::<Vec<_>>()
    };
    let base = || QConfigMapping::new(QConfig::default());
    // The classifier sees 4 rows here, fewer than the 32 a mean needs: never corrected.
    assert_eq!(corrected(base()), ["stem", "dw", "pw"]);
    assert_eq!(corrected(base().bias_correction_name("dw", false)), ["stem", "pw"]);
    assert_eq!(corrected(base().bias_correction(false).bias_correction_kind("Conv2d", true)), ["stem", "dw", "pw"]);
    let names_beat_kinds = base().bias_correction_kind("Conv2d", false).bias_correction_name("stem", true);
    assert_eq!(corrected(names_beat_kinds), ["stem"]);
    // A name no module has is an error, as for every name override.
    let e = prepare(model(), &base().bias_correction_name("stme", false)).unwrap_err().to_string();
    assert!(e.contains("stme") && e.contains("stem"), "{e}");
    let e = prepare(model(), &base().bias_correction_kind("conv2d", false)).unwrap_err().to_string();
    assert!(e.contains("bias_correction_kind") && e.contains("'Conv2d'"), "{e}");
}
