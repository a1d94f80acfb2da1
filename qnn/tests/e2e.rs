//! End to end against PyTorch: the digits model fused, calibrated (min-max activations,
//! per-channel symmetric weights, the same 128 calibration images in one batch) and converted
//! here gives PyTorch eager mode's int8 logits.

use ndarray::{ArrayD, Axis, IxDyn};
use qnn::{fuse, load_safetensors, prepare, zoo, Mode, QConfigMapping, Value};
use qobserve::{ObserverSpec, QConfig, QuantSpec};
use safetensors::SafeTensors;

fn data(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)).unwrap()
}

fn f32s(st: &SafeTensors<'_>, key: &str) -> ArrayD<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn pytorch_minmax_qconfig() -> QConfig {
    QConfig {
        activation: ObserverSpec::MinMax(QuantSpec::u8_affine()),
        weight: ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 },
    }
}

#[test]
fn digits_int8_logits_match_pytorch() {
    let mut model = zoo::digits();
    load_safetensors(
        &mut model,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits_model.safetensors"),
    )
    .unwrap();
    fuse(&mut model).unwrap();
    let mut prepared = prepare(model, &QConfigMapping::new(pytorch_minmax_qconfig())).unwrap();
    let modes: Vec<(String, Mode)> = prepared.plan().iter().map(|e| (e.name.clone(), e.mode.clone())).collect();
    assert!(modes.iter().all(|(_, m)| !matches!(m, Mode::Float(_))), "{modes:?}");
    let (calib, test, golden) =
        (data("calib.safetensors"), data("digits_test.safetensors"), data("digits_golden.safetensors"));
    let (calib, test, golden) = (
        SafeTensors::deserialize(&calib).unwrap(),
        SafeTensors::deserialize(&test).unwrap(),
        SafeTensors::deserialize(&golden).unwrap(),
    );
    prepared.calibrate(&f32s(&calib, "images")).unwrap();
    let q = prepared.convert().unwrap();
    assert_eq!(q.input_quant().scale.to_bits(), f32s(&golden, "quant.scale")[0].to_bits(), "input scale");
    // Every layer's observed output parameters are PyTorch's, bit for bit.
    for (name, oq) in q.output_quants() {
        let zp = i64::from_le_bytes(golden.tensor(&format!("{name}.zero_point")).unwrap().data().try_into().unwrap());
        assert_eq!(
            (oq.scale.to_bits(), oq.zero_point as i64),
            (f32s(&golden, &format!("{name}.scale"))[0].to_bits(), zp),
            "{name}"
        );
    }

    let images = f32s(&test, "images");
    let Value::U8 { data, shape, q: out_q } = q.forward_value(&images).unwrap() else { panic!("int8 logits expected") };
    assert_eq!(shape, vec![500, 10]);
    let want: Vec<u8> = golden.tensor("logits_int8").unwrap().data().to_vec();
    let torch_scale = f32s(&golden, "logits_scale")[0];
    let identical = data.iter().zip(&want).filter(|(a, b)| a == b).count();
    let worst = data.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
    eprintln!(
        "digits int8 logits: {identical}/{} identical to PyTorch, max {worst} LSB; scale ours {} PyTorch {torch_scale}",
        want.len(),
        out_q.scale
    );
    // The parameters are PyTorch's (checked above). PyTorch's x86 engine runs these
    // convolutions on oneDNN, whose requantization rounds a few values differently from
    // FBGEMM's formula, which our kernels follow exactly; `scripts/models/digits.py` found the
    // same: PyTorch's own fbgemm engine differs from its x86 engine on 2 of these 5000 logits,
    // by one step. So: at least 99% identical, never more than one step apart.
    assert!(identical * 100 >= want.len() * 99, "{identical} of {}", want.len());
    assert!(worst <= 1, "worst difference {worst} LSB");

    // Accuracy: PyTorch's int8 model gets 495 / 500, as the float one does.
    let labels: Vec<i64> = test
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = ArrayD::from_shape_vec(IxDyn(&[500, 10]), data).unwrap();
    let correct = logits
        .axis_iter(Axis(0))
        .zip(&labels)
        .filter(|(row, &l)| row.iter().enumerate().max_by_key(|(i, v)| (**v, usize::MAX - i)).unwrap().0 as i64 == l)
        .count();
    assert!(correct >= 493, "int8 accuracy {correct}/500");
}
