//! The float model against PyTorch: the bundled digits classifier, its weights loaded from the
//! safetensors `state_dict` PyTorch saved, gives PyTorch's logits on the held-out split.

use ndarray::{ArrayD, Axis, IxDyn};
use qnn::{load_safetensors, load_safetensors_bytes, zoo, Module, NnError};
use safetensors::SafeTensors;

fn data(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)).unwrap()
}

fn tensor_f32(st: &SafeTensors<'_>, key: &str) -> ArrayD<f32> {
    let t = st.tensor(key).unwrap();
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

/// f32 sums in another order than PyTorch's: a few ulps of the largest logit.
const LOGIT_TOLERANCE: f32 = 1e-4;

#[test]
fn digits_float_logits_match_pytorch() {
    let mut model = zoo::digits();
    load_safetensors(
        &mut model,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits_model.safetensors"),
    )
    .unwrap();
    let (test, golden) = (data("digits_test.safetensors"), data("digits_golden.safetensors"));
    let (test, golden) = (SafeTensors::deserialize(&test).unwrap(), SafeTensors::deserialize(&golden).unwrap());
    let images = tensor_f32(&test, "images");
    let labels: Vec<i64> = test
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let want = tensor_f32(&golden, "logits_f32");
    let logits = model.forward(&images).unwrap();
    assert_eq!(logits.shape(), want.shape());
    let worst = logits.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst <= LOGIT_TOLERANCE, "max |ours - PyTorch| = {worst}");
    let correct = logits
        .axis_iter(Axis(0))
        .zip(&labels)
        .filter(|(row, &l)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as i64 == l)
        .count();
    assert_eq!(correct, 495, "PyTorch's float model gets 495 of 500");
}

#[test]
fn a_mismatched_weights_file_lists_every_problem() {
    // Keep conv1 and fc2 but drop everything else, rename one tensor and change a shape.
    let bytes = data("digits_model.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut keep: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        if name.starts_with("conv1.") || name.starts_with("fc2.") {
            keep.push((name, t.shape().to_vec(), t.data().to_vec()));
        }
    }
    keep.push(("model.fc1.weight".into(), vec![64, 128], vec![0u8; 64 * 128 * 4]));
    let fc2 = keep.iter_mut().find(|(n, ..)| n == "fc2.bias").unwrap();
    fc2.1 = vec![5];
    fc2.2.truncate(20);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = keep
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    let file = safetensors::serialize(views, None).unwrap();
    let mut model = zoo::digits();
    let before = qnn::parameter_shapes(&model);
    let err = load_safetensors_bytes(&mut model, &file, "broken.safetensors").unwrap_err();
    let NnError::Load { missing, unexpected, mismatched, .. } = &err else { panic!("{err}") };
    assert!(missing.iter().any(|(n, s)| n == "fc1.weight" && s == &vec![64, 128]), "{err}");
    assert!(missing.iter().any(|(n, _)| n == "bn2.running_var"), "{err}");
    assert_eq!(unexpected, &vec![("model.fc1.weight".to_string(), vec![64, 128])]);
    assert_eq!(mismatched, &vec![("fc2.bias".to_string(), vec![10], vec![5])]);
    let msg = err.to_string();
    assert!(
        msg.contains("missing from the file")
            && msg.contains("model.fc1.weight [64, 128]")
            && msg.contains("fc2.bias: model [10], file [5]")
            && msg.contains("prefix"),
        "{msg}"
    );
    assert_eq!(qnn::parameter_shapes(&model), before, "nothing loaded");
}

#[test]
fn shape_errors_name_the_module() {
    let model = zoo::digits();
    let err = model.forward(&ArrayD::zeros(IxDyn(&[1, 3, 8, 8]))).unwrap_err().to_string();
    assert!(
        err.starts_with("conv1 (Conv2d)") && err.contains("[1, 3, 8, 8]") && err.contains("1 input channels"),
        "{err}"
    );
    let err = model.forward(&ArrayD::zeros(IxDyn(&[8, 8]))).unwrap_err().to_string();
    assert!(err.contains("4-D NCHW"), "{err}");
}

#[test]
fn a_saved_state_dict_loads_back_unchanged() {
    let mut model = zoo::resnet18(10);
    zoo::randomize(&mut model, 3);
    let bytes = qnn::state_dict_bytes(&model).unwrap();
    // PyTorch's names, and every parameter and batch-norm statistic.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let mut want: Vec<String> = qnn::parameter_shapes(&model).into_iter().map(|(n, _)| n).collect();
    want.sort();
    assert_eq!(names.iter().map(|s| s.to_string()).collect::<Vec<_>>(), want);
    assert!(names.contains(&"layer1.0.bn1.running_var"));
    assert_eq!(st.tensor("layer2.0.downsample.0.weight").unwrap().shape(), &[128, 64, 1, 1]);
    let mut other = zoo::resnet18(10);
    load_safetensors_bytes(&mut other, &bytes, "saved").unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 3, 32, 32]), |i| ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 / 5.0 - 1.0);
    assert_eq!(model.forward(&x).unwrap(), other.forward(&x).unwrap());
}

/// A graph prepares its float kernels (packed weights) on its first run and drops them when
/// a layer may change: new weights after a run give the new weights' outputs, exactly those
/// of a graph that never ran, and the same as running each layer's own `forward`.
#[test]
fn graph_float_kernels_follow_weight_changes() {
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 1, 8, 8]), |i| ((i[0] * 3 + i[2] * 8 + i[3]) % 7) as f32 / 7.0 - 0.3);
    let mut g: qnn::Graph = zoo::digits().into();
    zoo::randomize(&mut g, 1);
    let before = g.forward(&x).unwrap();
    zoo::randomize(&mut g, 2);
    let after = g.forward(&x).unwrap();
    let mut fresh: qnn::Graph = zoo::digits().into();
    zoo::randomize(&mut fresh, 2);
    assert_eq!(after, fresh.forward(&x).unwrap());
    assert_ne!(before, after);
    // Layer by layer through `Module::forward` (the container form), bit for bit.
    let mut seq = zoo::digits();
    zoo::randomize(&mut seq, 2);
    assert_eq!(seq.forward(&x).unwrap(), after);
    assert!(after.is_standard_layout(), "graph outputs come in PyTorch's memory order");
}
