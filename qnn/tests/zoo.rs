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

fn tensor(file: &str, name: &str) -> ArrayD<f32> {
    let bytes = std::fs::read(format!("{}/data/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn hits(logits: &ArrayD<f32>) -> usize {
    let bytes = std::fs::read(format!("{}/data/digits_test.safetensors", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels = st.tensor("labels").unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()));
    logits
        .outer_iter()
        .zip(labels)
        .filter(|(row, l)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as i64 == *l)
        .count()
}

/// The digits ViT written with the graph API (`zoo::vit`), with the weights PyTorch trained
/// (`scripts/models/digits_vit.py`): its float logits are PyTorch's on the 500 held-out
/// images, and in int8 (static, the default configuration) and dynamic per token it keeps
/// PyTorch's f32 accuracy within 0.3 points (measured: 488 of 500 right in f32 and both).
#[test]
fn vit_from_the_graph_api_matches_pytorch_and_quantizes() {
    let mut model = zoo::vit(&zoo::VitConfig::digits()).unwrap();
    qnn::load_safetensors(&mut model, format!("{}/data/digits_vit/model.safetensors", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let images = tensor("digits_test.safetensors", "images");
    let want = tensor("digits_vit/logits.safetensors", "logits_f32");
    let float = model.forward(&images).unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = float.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err < 1e-5, "float logits {err:e} (relative) from PyTorch's");
    let f32_hits = hits(&float);
    let calib = tensor("calib.safetensors", "images");
    for (what, qconfig) in [("static", QConfig::default()), ("dynamic per token", QConfig::dynamic_per_token())] {
        let mut model = zoo::vit(&zoo::VitConfig::digits()).unwrap();
        qnn::load_safetensors(&mut model, format!("{}/data/digits_vit/model.safetensors", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        let mut p = prepare(model, &QConfigMapping::new(qconfig)).unwrap();
        for b in calib.axis_chunks_iter(ndarray::Axis(0), 16) {
            p.calibrate(&b.to_owned()).unwrap();
        }
        let q = p.convert().unwrap();
        let int8 = q.forward(&images).unwrap();
        let (h, sqnr) = (hits(&int8), sqnr_db(&float, &int8));
        eprintln!("digits ViT {what}: {h} of 500 right (f32 {f32_hits}), SQNR {sqnr:.1} dB");
        // 0.3 points of 500 images: at most one image fewer.
        assert!(h + 1 >= f32_hits, "{what}: {h} of 500 right, f32 {f32_hits}");
    }
}

/// `randomize_with`: normal weights have variance 1 / fan-in and a bell's tails (excess
/// kurtosis near 0, where uniform weights have -1.2), uniform ones stay within
/// +-sqrt(3 / fan-in); both are reproducible from the seed, and `randomize` is the uniform one.
#[test]
fn randomized_weights_follow_their_law() {
    let stats = |init: zoo::WeightInit, seed: u64| {
        let mut m = zoo::resnet18(10);
        zoo::randomize_with(&mut m, seed, init);
        let mut w: Vec<f32> = Vec::new();
        qnn::walk(&m, "", &mut |_, module| {
            if module.kind() == "Conv2d" {
                for (name, t) in module.tensors() {
                    if name == "weight" && t.shape() == [128, 128, 3, 3] {
                        w.extend(t.iter().copied());
                    }
                }
            }
        });
        let fan_in = 128.0 * 9.0;
        let n = w.len() as f64;
        let var = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
        let kurt = w.iter().map(|&v| (v as f64).powi(4)).sum::<f64>() / n / (var * var) - 3.0;
        let max = w.iter().fold(0f32, |m, &v| m.max(v.abs())) as f64;
        (var * fan_in, kurt, max * f64::sqrt(fan_in), w)
    };
    let (var, kurt, max, a) = stats(zoo::WeightInit::Normal, 3);
    assert!((0.95..1.05).contains(&var) && kurt.abs() < 0.2 && max > 3.5, "normal: {var} {kurt} {max}");
    assert_eq!(a, stats(zoo::WeightInit::Normal, 3).3, "the seed decides");
    let (var, kurt, max, _) = stats(zoo::WeightInit::Uniform, 3);
    assert!(
        (0.95..1.05).contains(&var) && (kurt + 1.2).abs() < 0.1 && max <= 3f64.sqrt(),
        "uniform: {var} {kurt} {max}"
    );
    let mut m = zoo::resnet18(10);
    zoo::randomize(&mut m, 3);
    let mut u = zoo::resnet18(10);
    zoo::randomize_with(&mut u, 3, zoo::WeightInit::Uniform);
    assert_eq!(qnn::state_dict_bytes(&m).unwrap(), qnn::state_dict_bytes(&u).unwrap());
}
