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
    let msg = fuse_modules(&mut model, &[&["bn1", "relu1"]]).unwrap_err().to_string();
    assert!(msg.contains("BatchNorm2d+ReLU is not a fusable pattern"), "{msg}");
}
