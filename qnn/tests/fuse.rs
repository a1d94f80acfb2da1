//! Fusion finds the patterns itself, keeps the function, and explains bad requests.

use ndarray::{ArrayD, IxDyn};
use qnn::{fuse, fuse_modules, load_safetensors, zoo, Module, NnError};

fn digits() -> qnn::Sequential {
    let mut m = zoo::digits();
    load_safetensors(&mut m, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    m
}

#[test]
fn automatic_fusion_finds_every_pattern_and_keeps_the_function() {
    let mut model = digits();
    let x = ArrayD::from_shape_fn(IxDyn(&[4, 1, 8, 8]), |i| ((i[2] * 8 + i[3] + i[0]) % 17) as f32 / 16.0);
    let before = model.forward(&x).unwrap();
    let fused = fuse(&mut model).unwrap();
    let groups: Vec<Vec<String>> = fused.iter().map(|f| f.modules.clone()).collect();
    assert_eq!(groups, vec![vec!["conv1", "bn1", "relu1"], vec!["conv2", "bn2", "relu2"], vec!["fc1", "relu3"]]);
    assert_eq!(fused[0].pattern, "Conv2d+BatchNorm2d+ReLU");
    let after = model.forward(&x).unwrap();
    let worst = before.iter().zip(after.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "fusion changed the function by {worst}");
    assert_eq!(model.layers()[1].1.kind(), "Identity");
    assert!(fuse(&mut model).unwrap().is_empty(), "fusing twice finds nothing more");
}

#[test]
fn explicit_fusion_and_its_errors() {
    let mut model = digits();
    let done = fuse_modules(&mut model, &[&["conv1", "bn1", "relu1"], &["fc1", "relu3"]]).unwrap();
    assert_eq!(done.len(), 2);
    let mut model = digits();
    let err = fuse_modules(&mut model, &[&["conv_1", "bn1"]]).unwrap_err();
    assert!(matches!(err, NnError::UnknownModule { .. }));
    let msg = err.to_string();
    assert!(msg.contains("no module 'conv_1'") && msg.contains("did you mean conv1"), "{msg}");
    let msg = fuse_modules(&mut model, &[&["conv1", "relu1"]]).unwrap_err().to_string();
    assert!(msg.contains("adjacent"), "{msg}");
    let msg = fuse_modules(&mut model, &[&["relu1", "conv2"]]).unwrap_err().to_string();
    assert!(msg.contains("ReLU+Conv2d is not a fusable pattern"), "{msg}");
    // PyTorch's "object has no attribute conv2d": a kind written as a name suggests the
    // modules of that kind, each once.
    let NnError::UnknownModule { suggestions, .. } = fuse_modules(&mut model, &[&["conv2d", "bn1"]]).unwrap_err()
    else {
        panic!()
    };
    assert_eq!(suggestions[..2], ["conv2", "conv1"]);
    // A path whose last part exists elsewhere suggests that module first.
    let NnError::UnknownModule { suggestions, .. } = fuse_modules(&mut model, &[&["block.relu2", "x"]]).unwrap_err()
    else {
        panic!()
    };
    assert_eq!(suggestions[0], "relu2");
    // Fusing a group twice says so.
    fuse_modules(&mut model, &[&["conv2", "bn2", "relu2"]]).unwrap();
    let msg = fuse_modules(&mut model, &[&["conv2", "bn2", "relu2"]]).unwrap_err().to_string();
    assert!(msg.contains("already fused") && msg.contains("bn2, relu2"), "{msg}");
}

#[test]
fn linear_batch_norm_relu_fuse_and_avg_pool_runs_in_int8() {
    use qnn::layers::{AvgPool2d, BatchNorm1d, Conv2d, Flatten, Linear, ReLU};
    let mut model = qnn::Sequential::new()
        .add("conv", Conv2d::new(1, 8, 3).padding(1))
        .add("relu0", ReLU)
        .add("pool", AvgPool2d::new(2, 2, 0))
        .add("flatten", Flatten)
        .add("fc1", Linear::new(8 * 4 * 4, 16))
        .add("bn", BatchNorm1d::new(16))
        .add("relu", ReLU)
        .add("fc2", Linear::new(16, 5));
    zoo::randomize(&mut model, 9);
    let x = ArrayD::from_shape_fn(IxDyn(&[6, 1, 8, 8]), |i| ((i[0] * 3 + i[2] * 8 + i[3]) % 13) as f32 / 6.0 - 1.0);
    let want = model.forward(&x).unwrap();
    let fused = fuse(&mut model).unwrap();
    assert_eq!(fused[1].pattern, "Linear+BatchNorm1d+ReLU");
    let after = model.forward(&x).unwrap();
    assert!(qnn::sqnr_db(&want, &after) > 80.0);
    // The average pool requantizes to its own observed parameters (the default
    // PoolOutputs::Observed), and is saved and loaded as such.
    let mut p = qnn::prepare(model, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    assert_eq!(p.plan()[2].mode, qnn::Mode::Int8, "{:?}", p.plan()[2]);
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let got = q.forward(&x).unwrap();
    assert!(qnn::sqnr_db(&want, &got) > 25.0, "{}", qnn::sqnr_db(&want, &got));
    let back = qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), got);
}

/// A batch-norm with no layer before it to fold into (here after a pooling layer) fuses with
/// its ReLU into one module, which runs in float between automatic boundaries, is reported,
/// and survives saving.
#[test]
fn batch_norm_relu_fuses_into_one_float_module() {
    use qnn::layers::{BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU};
    let mut model = qnn::Sequential::new()
        .add("conv", Conv2d::new(1, 8, 3).padding(1))
        .add("pool", MaxPool2d::new(2, 2, 0))
        .add("bn", BatchNorm2d::new(8))
        .add("relu", ReLU)
        .add("flatten", Flatten)
        .add("drop", Dropout(0.5))
        .add("fc", Linear::new(8 * 4 * 4, 5));
    zoo::randomize(&mut model, 3);
    let x = ArrayD::from_shape_fn(IxDyn(&[4, 1, 8, 8]), |i| ((i[0] * 5 + i[2] * 8 + i[3]) % 11) as f32 / 5.0 - 1.0);
    let want = model.forward(&x).unwrap();
    let fused = fuse(&mut model).unwrap();
    assert_eq!(fused.len(), 1, "{fused:?}");
    assert_eq!(fused[0].pattern, "BatchNorm2d+ReLU");
    assert_eq!(fused[0].modules, vec!["bn", "relu"]);
    let after = model.forward(&x).unwrap();
    assert_eq!(after, want, "folding the ReLU into the batch-norm is exact");
    assert!(after.iter().any(|v| *v != 0.0));

    let mut p = qnn::prepare(model, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let modes: Vec<(&str, &qnn::Mode)> = q.plan().iter().map(|e| (e.name.as_str(), &e.mode)).collect();
    assert!(matches!(modes[2], ("bn", qnn::Mode::Float(_))), "{modes:?}");
    assert!(matches!(modes[3], ("relu", qnn::Mode::Passthrough)), "{modes:?}");
    assert!(matches!(modes[5], ("drop", qnn::Mode::Passthrough)), "{modes:?}");
    let got = q.forward(&x).unwrap();
    assert!(qnn::sqnr_db(&want, &got) > 25.0, "{}", qnn::sqnr_db(&want, &got));
    let back = qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), got);
}

/// Explicit names reach into residual blocks (body and shortcut) and concat branches, as
/// automatic fusion does; fusing a batch-norm with its ReLU first and its conv later keeps
/// the ReLU.
#[test]
fn explicit_fusion_inside_blocks_and_in_two_steps() {
    use qnn::layers::{BatchNorm2d, Conv2d, ReLU};
    use qnn::{Concat, Sequential};
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 3, 32, 32]), |i| ((i[1] * 5 + i[2] * 3 + i[3]) % 13) as f32 / 6.0 - 1.0);
    let mut r18 = zoo::resnet18(10);
    zoo::randomize(&mut r18, 8);
    let want = r18.forward(&x).unwrap();
    let done = fuse_modules(
        &mut r18,
        &[&["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"], &["layer2.0.downsample.0", "layer2.0.downsample.1"]],
    )
    .unwrap();
    assert_eq!(done[1].pattern, "Conv2d+BatchNorm2d");
    let got = r18.forward(&x).unwrap();
    assert!(qnn::sqnr_db(&want, &got) > 80.0);

    let mut cat = Sequential::new().add(
        "block",
        Concat::new("cat")
            .branch(
                "b1",
                Sequential::new()
                    .add("conv", Conv2d::new(3, 4, 3).padding(1))
                    .add("bn", BatchNorm2d::new(4))
                    .add("relu", ReLU),
            )
            .branch("b2", Sequential::new().add("conv", Conv2d::new(3, 2, 1))),
    );
    zoo::randomize(&mut cat, 9);
    let want = cat.forward(&x).unwrap();
    assert!(want.iter().any(|v| *v < 0.0), "branch b2 has negative outputs");
    // Batch-norm + ReLU first, then the conv: the ReLU must survive the second fusion.
    fuse_modules(&mut cat, &[&["block.b1.bn", "block.b1.relu"]]).unwrap();
    let again = fuse_modules(&mut cat, &[&["block.b1.conv", "block.b1.bn"]]).unwrap();
    assert_eq!(again[0].pattern, "Conv2d+BatchNorm2d");
    let got = cat.forward(&x).unwrap();
    assert!(qnn::sqnr_db(&want, &got) > 80.0, "{}", qnn::sqnr_db(&want, &got));
    let b1 = got.slice(ndarray::s![.., 0..4, .., ..]);
    assert!(b1.iter().all(|v| *v >= 0.0), "the ReLU was lost");
    let msg = fuse_modules(&mut cat, &[&["block.b3.conv"]]).unwrap_err().to_string();
    assert!(msg.contains("block.b3.conv") && msg.contains("did you mean"), "{msg}");
}

/// A per-channel affine map as ONNX's `x * k + b` with constants per channel imports: a
/// depthwise 1x1 convolution.
fn affine(c: usize) -> qnn::layers::Conv2d {
    qnn::layers::Conv2d::new(c, c, 1).groups(c)
}

/// PP-LCNet's pattern (a learnable scale and shift after each convolution and activation),
/// and the cases that must not fold: a map before a padded convolution, a value also taken as
/// an output, a transposed convolution's map with a ReLU.
fn affine_model() -> qnn::Graph {
    use qnn::layers::{Conv2d, ConvTranspose2d, FusedAct, Hardswish, MulScalar};
    let mut g = qnn::GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv_a", Conv2d::new(3, 8, 3).padding(1), x).unwrap();
    let y = g.layer("scale_a", MulScalar { factor: 0.9 }, y).unwrap();
    let y = g.layer("shift_a", affine(8), y).unwrap();
    let y = g.layer("act", Hardswish, y).unwrap();
    let y = g.layer("scale_b", MulScalar { factor: -0.47 }, y).unwrap();
    let y = g.layer("shift_b", affine(8), y).unwrap();
    let y = g.layer("conv_b", Conv2d::new(8, 8, 1).groups(2), y).unwrap();
    let y = g.layer("act_b", Hardswish, y).unwrap();
    let y = g.layer("scale_c", MulScalar { factor: 1.5 }, y).unwrap();
    let y = g.layer("conv_c", Conv2d::new(8, 8, 3).padding(1), y).unwrap();
    let y = g.layer("map_d", Conv2d { activation: FusedAct::Relu, ..affine(8) }, y).unwrap();
    let e = g.layer("conv_e", Conv2d::new(8, 8, 1), y).unwrap();
    let f = g.layer("scale_e", MulScalar { factor: 2.0 }, e).unwrap();
    let t = g.layer("up", ConvTranspose2d { stride: [2, 2], ..ConvTranspose2d::new(8, 4, 2) }, f).unwrap();
    let t = g.layer("map_up", Conv2d { activation: FusedAct::Relu, ..affine(4) }, t).unwrap();
    g.output(e);
    g.output(t);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 17);
    graph
}

#[test]
fn affine_maps_fold_into_the_convolutions_beside_them() {
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 6, 6]), |i| {
        ((i[1] * 7 + i[2] * 5 + i[3] * 3 + i[0]) % 13) as f32 / 6.0 - 1.0
    });
    let want = affine_model().run(std::slice::from_ref(&x)).unwrap();
    let mut g = affine_model();
    let fused = qnn::fuse_graph(&mut g).unwrap();
    let done: Vec<(String, &str)> = fused.iter().map(|f| (f.modules.join("+"), f.pattern.as_str())).collect();
    // After each convolution first, then before the unpadded ones; not before `conv_c`
    // (padded), not after `conv_e` (also an output), not before the transposed convolution.
    let want_folds = [
        ("conv_a+scale_a", "Conv2d+MulScalar"),
        ("conv_a+shift_a", "Conv2d+Conv2d"),
        ("conv_c+map_d", "Conv2d+Conv2d"),
        ("up+map_up", "ConvTranspose2d+Conv2d"),
        ("scale_b+shift_b", "MulScalar+Conv2d"),
        ("shift_b+conv_b", "Conv2d+Conv2d"),
    ];
    assert_eq!(done, want_folds.map(|(m, p)| (m.to_string(), p)));
    let got = g.run(std::slice::from_ref(&x)).unwrap();
    for (w, o) in want.iter().zip(&got) {
        let db = qnn::sqnr_db(w, o);
        assert!(db > 90.0, "folding changed the function: {db:.1} dB");
    }
    // Quantized: the folded maps pass through, the one before the padded convolution and the
    // one before the transposed convolution run.
    let mut p = qnn::prepare(g, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    for name in ["scale_a", "shift_a", "scale_b", "shift_b", "map_d", "map_up"] {
        assert_eq!(mode(name), qnn::Mode::Passthrough, "{name}");
    }
    // (A product by a scalar keeps the codes: only the scale changes.)
    assert_eq!(mode("scale_c"), qnn::Mode::Int8SameParams);
    assert_eq!(mode("scale_e"), qnn::Mode::Int8SameParams);
    let int8 = q.forward_values(std::slice::from_ref(&x)).unwrap();
    for (w, o) in want.iter().zip(&int8) {
        let db = qnn::sqnr_db(w, &o.to_f32());
        assert!(db > 20.0, "int8 SQNR {db:.1} dB");
    }
}

#[test]
fn a_transposed_convolution_takes_its_batch_norm_and_relu() {
    use qnn::layers::{BatchNorm2d, ConvTranspose2d, ReLU};
    let model = || {
        let mut g = qnn::GraphBuilder::new();
        let x = g.input("x");
        // Two groups: output channels 0-2 from inputs 0-3, 3-5 from inputs 4-7.
        let up = ConvTranspose2d {
            weight: ArrayD::zeros(IxDyn(&[8, 3, 2, 2])),
            bias: Some(ArrayD::zeros(IxDyn(&[6]))),
            stride: [2, 2],
            groups: 2,
            ..ConvTranspose2d::new(8, 3, 2)
        };
        let y = g.layer("up", up, x).unwrap();
        let y = g.layer("bn", BatchNorm2d::new(6), y).unwrap();
        let y = g.layer("relu", ReLU, y).unwrap();
        g.output(y);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 23);
        graph
    };
    let x =
        ArrayD::from_shape_fn(IxDyn(&[2, 8, 5, 4]), |i| ((i[1] * 5 + i[2] * 3 + i[3] + i[0]) % 11) as f32 / 5.0 - 1.0);
    let want = model().run(std::slice::from_ref(&x)).unwrap().remove(0);
    let mut g = model();
    let fused = qnn::fuse_graph(&mut g).unwrap();
    assert_eq!(fused.len(), 1);
    assert_eq!(
        (fused[0].modules.join("+"), fused[0].pattern.as_str()),
        ("up+bn+relu".into(), "ConvTranspose2d+BatchNorm2d+ReLU")
    );
    let got = g.run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert!(got.iter().all(|&v| v >= 0.0) && got.iter().any(|&v| v > 0.0));
    let db = qnn::sqnr_db(&want, &got);
    assert!(db > 90.0, "folding changed the function: {db:.1} dB");
}
