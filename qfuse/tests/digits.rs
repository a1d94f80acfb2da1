//! Batch-norm folding against PyTorch: the digits model (`qnn/data/`, trained and quantized by
//! `scripts/models/digits.py`). PyTorch's eager `fuse_modules` folded bn1 into conv1 and bn2
//! into conv2, then quantized the folded weights per channel (symmetric `i8`); our folding,
//! quantized the same way, must give the same int8 weights, the same scales and the same
//! folded biases, bit for bit.

use qfuse::{fuse_conv_bn, BatchNorm};
use qtensor::{choose_qparams_per_channel, DType, QScheme, QTensor, QuantRange, DEFAULT_EPS};
use safetensors::SafeTensors;

fn data(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../qnn/data").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(st: &SafeTensors<'_>, key: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    (t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), t.shape().to_vec())
}

fn i8s(st: &SafeTensors<'_>, key: &str) -> Vec<i8> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::I8, "{key}");
    t.data().iter().map(|&b| b as i8).collect()
}

fn bn(st: &SafeTensors<'_>, name: &str) -> BatchNorm {
    BatchNorm {
        weight: Some(f32s(st, &format!("{name}.weight")).0),
        bias: Some(f32s(st, &format!("{name}.bias")).0),
        running_mean: f32s(st, &format!("{name}.running_mean")).0,
        running_var: f32s(st, &format!("{name}.running_var")).0,
        eps: 1e-5,
    }
}

/// PyTorch's default per-channel weight observer: symmetric `i8` over each channel's min/max.
fn quantize_per_channel(w: &ndarray::ArrayD<f32>) -> QTensor<i8> {
    let oc = w.shape()[0];
    let (mut mins, mut maxs) = (vec![f32::INFINITY; oc], vec![f32::NEG_INFINITY; oc]);
    for (o, row) in w.axis_iter(ndarray::Axis(0)).enumerate() {
        for &v in row {
            mins[o] = mins[o].min(v);
            maxs[o] = maxs[o].max(v);
        }
    }
    let range = QuantRange::full(DType::I8);
    let p = choose_qparams_per_channel(&mins, &maxs, 0, DType::I8, QScheme::Symmetric, range, DEFAULT_EPS).unwrap();
    QTensor::quantize(w, p).unwrap()
}

#[test]
fn folded_and_quantized_weights_match_pytorch() {
    let (model, golden) = (data("digits_model.safetensors"), data("digits_golden.safetensors"));
    let (model, golden) = (SafeTensors::deserialize(&model).unwrap(), SafeTensors::deserialize(&golden).unwrap());
    for (layer, norm) in [("conv1", Some("bn1")), ("conv2", Some("bn2")), ("fc1", None), ("fc2", None)] {
        let (w, shape) = f32s(&model, &format!("{layer}.weight"));
        let (b, _) = f32s(&model, &format!("{layer}.bias"));
        let w = ndarray::ArrayD::from_shape_vec(shape, w).unwrap();
        let (fw, fb) = match norm {
            Some(n) => fuse_conv_bn(w.view(), Some(&b), &bn(&model, n)).unwrap(),
            None => (w, b),
        };
        let q = quantize_per_channel(&fw);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(q.as_slice(), &i8s(&golden, &format!("{layer}.weight_int8"))[..], "{layer}: int8 weights");
        let scales: Vec<f32> = (0..fw.shape()[0]).map(|c| q.params().scale(c)).collect();
        assert_eq!(bits(&scales), bits(&f32s(&golden, &format!("{layer}.weight_scales")).0), "{layer}: scales");
        assert_eq!(bits(&fb), bits(&f32s(&golden, &format!("{layer}.bias")).0), "{layer}: folded bias");
    }
}

#[test]
fn bad_batch_norms_are_errors() {
    let w = ndarray::Array2::<f32>::ones((3, 4)).into_dyn();
    let bn = BatchNorm { weight: None, bias: None, running_mean: vec![0.0; 2], running_var: vec![1.0; 2], eps: 1e-5 };
    let e = fuse_conv_bn(w.view(), None, &bn).unwrap_err().to_string();
    assert!(e.contains("expected [3], got [2]") && e.contains("batch-norm"), "{e}");
    let bn = BatchNorm { running_mean: vec![0.0; 3], running_var: vec![1.0, -1.0, 1.0], ..bn };
    let e = fuse_conv_bn(w.view(), None, &bn).unwrap_err().to_string();
    assert!(e.contains("channel 1") && e.contains("running_var -1"), "{e}");
    let e = qfuse::fuse_linear_bn(
        ndarray::Array3::<f32>::ones((3, 1, 1)).into_dyn().view(),
        None,
        &BatchNorm { running_var: vec![1.0; 3], ..bn },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("2-D"), "{e}");
}
