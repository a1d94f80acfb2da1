//! The model zoo runs end to end: float, fused, calibrated, int8, on a small input.

use ndarray::{ArrayD, IxDyn};
use qnn::{fuse, prepare, sqnr_db, zoo, Mode, Module, QConfigMapping};
use qobserve::QConfig;

fn input(seed: usize, shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |i| (((i[1] * 131 + i[2] * 31 + i[3] * 7 + seed) % 97) as f32 / 48.0) - 1.0)
}

/// The graph models (squeeze-and-excitation blocks) the same way, through `fuse_graph`;
/// every node runs in int8 or passes through. Measured: MobileNetV3-Large 38.9 dB,
/// EfficientNet-B0 38.9 dB; the bounds leave about 5 dB of margin.
fn check_graph(name: &str, mut model: qnn::Graph, min_sqnr: f64) {
    zoo::randomize(&mut model, 7);
    let x = input(0, &[1, 3, 64, 64]);
    let float = model.forward(&x).unwrap();
    assert_eq!(float.shape(), &[1, 10], "{name}");
    qnn::fuse_graph(&mut model).unwrap();
    assert!(sqnr_db(&float, &model.forward(&x).unwrap()) > 80.0, "{name}: fusion changed the function");
    let mut p = prepare(model, &QConfigMapping::new(QConfig::default())).unwrap();
    assert!(p.plan().iter().all(|e| !matches!(e.mode, Mode::Float(_))), "{name}: {:?}", p.plan());
    for s in 0..4 {
        p.calibrate(&input(s, &[2, 3, 64, 64])).unwrap();
    }
    let q = p.convert().unwrap();
    let sqnr = sqnr_db(&float, &q.forward(&x).unwrap());
    eprintln!("{name}: int8 vs f32 SQNR {sqnr:.1} dB");
    assert!(sqnr > min_sqnr, "{name}: SQNR {sqnr:.1} dB");
}

#[test]
fn mobilenet_v3_large_quantizes_end_to_end() {
    check_graph("mobilenet_v3_large", zoo::mobilenet_v3_large(10), 34.0);
}

#[test]
fn efficientnet_b0_quantizes_end_to_end() {
    check_graph("efficientnet_b0", zoo::efficientnet_b0(10), 34.0);
}

/// Measured: ResNet-18 32.2 dB, MobileNetV2 42.1 dB (PyTorch's x86 default on a random
/// ResNet-18 at 224x224: 32.1 dB); the bounds leave about 4 dB of margin.
fn check(name: &str, mut model: qnn::Sequential, min_sqnr: f64) {
    zoo::randomize(&mut model, 7);
    let x = input(0, &[1, 3, 64, 64]);
    let float = model.forward(&x).unwrap();
    assert_eq!(float.shape(), &[1, 10], "{name}");
    fuse(&mut model).unwrap();
    let fused_out = model.forward(&x).unwrap();
    assert!(sqnr_db(&float, &fused_out) > 80.0, "{name}: fusion changed the function");
    let mut p = prepare(model, &QConfigMapping::new(QConfig::default())).unwrap();
    assert!(p.plan().iter().all(|e| !matches!(e.mode, Mode::Float(_))), "{name}: {:?}", p.plan());
    for s in 0..4 {
        p.calibrate(&input(s, &[2, 3, 64, 64])).unwrap();
    }
    let q = p.convert().unwrap();
    let int8 = q.forward(&x).unwrap();
    let sqnr = sqnr_db(&float, &int8);
    eprintln!("{name}: int8 vs f32 SQNR {sqnr:.1} dB");
    assert!(sqnr > min_sqnr, "{name}: SQNR {sqnr:.1} dB");
}

#[test]
fn resnet18_quantizes_end_to_end() {
    check("resnet18", zoo::resnet18(10), 28.0);
}

#[test]
fn mobilenet_v2_quantizes_end_to_end() {
    check("mobilenet_v2", zoo::mobilenet_v2(10), 36.0);
}

/// The zoo's parameter names and shapes are torchvision's, so torchvision `state_dict`s load
/// (`qnn/data/torchvision_shapes.json`, written by `scripts/models/torchvision_shapes.py`).
#[test]
fn zoo_state_dicts_match_torchvision() {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("../data/torchvision_shapes.json")).expect("valid JSON");
    let models: [(&str, Box<dyn Module>); 5] = [
        ("resnet18", Box::new(zoo::resnet18(1000))),
        ("resnet50", Box::new(zoo::resnet50(1000))),
        ("mobilenet_v2", Box::new(zoo::mobilenet_v2(1000))),
        ("mobilenet_v3_large", Box::new(zoo::mobilenet_v3_large(1000))),
        ("efficientnet_b0", Box::new(zoo::efficientnet_b0(1000))),
    ];
    for (name, model) in models {
        let mut theirs: Vec<(String, Vec<usize>)> = json["models"][name]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e[2] == "float32")
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
                )
            })
            .collect();
        let mut ours = qnn::parameter_shapes(model.as_ref());
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "{name}");
    }
}
