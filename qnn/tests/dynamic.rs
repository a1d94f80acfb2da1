//! Dynamic quantization end to end against PyTorch: a perceptron on 3-D input (tokens of
//! features) converted with `QConfig::pytorch_dynamic()` and its per-channel twin, no
//! calibration, gives `quantize_dynamic`'s outputs bit for bit; per token it is more
//! accurate; saved and loaded it is the same; mixed with static int8 layers it works.

use ndarray::{ArrayD, IxDyn};
use qnn::layers::{Conv2d, Flatten, Linear, ReLU};
use qnn::{
    load_safetensors, prepare, sqnr_db, zoo, GraphBuilder, Mode, Module, QConfigMapping, QuantizedModel, Sequential,
};
use qobserve::QConfig;
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors<'_>, key: &str) -> ArrayD<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn mlp() -> Sequential {
    let mut m = Sequential::new().add("fc1", Linear::new(16, 32)).add("relu", ReLU).add("fc2", Linear::new(32, 10));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dynamic_mlp_model.safetensors");
    load_safetensors(&mut m, path).unwrap();
    m
}

fn convert(cfg: QConfig) -> QuantizedModel {
    // No calibration: dynamic layers choose their input's parameters on each call.
    prepare(mlp(), &QConfigMapping::new(cfg)).unwrap().convert().unwrap()
}

#[test]
fn a_dynamic_perceptron_is_pytorchs_bit_for_bit() {
    let bytes = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dynamic_mlp_io.safetensors"))
        .unwrap();
    let io = SafeTensors::deserialize(&bytes).unwrap();
    let x = f32s(&io, "input");
    assert_eq!(x.shape(), &[2, 5, 16]);
    let float = mlp().forward(&x).unwrap();
    let want = f32s(&io, "output_f32");
    let worst = float.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "float differs from PyTorch by {worst}");
    for (cfg, key) in [
        (QConfig::pytorch_dynamic(), "output_dynamic"),
        (QConfig::pytorch_dynamic_per_channel(), "output_dynamic_per_channel"),
    ] {
        let mut q = convert(cfg);
        let modes: Vec<(&str, Mode)> = q.plan().iter().map(|e| (e.name.as_str(), e.mode.clone())).collect();
        assert_eq!(modes, [("fc1", Mode::Dynamic), ("relu", Mode::Passthrough), ("fc2", Mode::Dynamic)]);
        let want = f32s(&io, key);
        for threads in [1, 2] {
            q.set_threads(threads);
            let y = q.forward(&x).unwrap();
            assert_eq!(y.shape(), &[2, 5, 10]);
            let same = y.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            assert_eq!(same, y.len(), "{key} at {threads} threads: {same} of {} identical to PyTorch", y.len());
        }
        // Saved and loaded: the same bits.
        let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
        assert_eq!(back.forward(&x).unwrap(), q.forward(&x).unwrap());
        assert_eq!(back.plan()[0].mode, Mode::Dynamic);
        let ops: Vec<&str> = q.profile(std::slice::from_ref(&x), 1).unwrap().iter().map(|n| n.op).collect();
        assert_eq!(ops, ["LinearDynamic", "Identity", "LinearDynamic"]);
    }
    // Simulation models the per-call input quantization: it tracks the int8 model (which
    // accumulates exactly where it rounds in f32), not the float one.
    for cfg in [QConfig::pytorch_dynamic(), QConfig::dynamic_per_token(), QConfig::dynamic_per_token_reduced()] {
        let mut p = prepare(mlp(), &QConfigMapping::new(cfg)).unwrap();
        let simulated = p.simulate(&x).unwrap();
        let int8 = p.convert().unwrap().forward(&x).unwrap();
        let (to_int8, to_float) = (sqnr_db(&int8, &simulated), sqnr_db(&float, &simulated));
        assert!(to_int8 > 80.0 && (to_float - sqnr_db(&float, &int8)).abs() < 0.1, "{to_int8} {to_float}");
    }
    // Per token: each row keeps all 256 codes for its own range.
    let pt = sqnr_db(&float, &convert(QConfig::pytorch_dynamic_per_channel()).forward(&x).unwrap());
    let tok = sqnr_db(&float, &convert(QConfig::dynamic_per_token()).forward(&x).unwrap());
    // Over codes 0..=127 (PyTorch's range on x86): between the two, and saved as such.
    let reduced = convert(QConfig::dynamic_per_token_reduced());
    let red = sqnr_db(&float, &reduced.forward(&x).unwrap());
    eprintln!("dynamic perceptron SQNR: per tensor (PyTorch) {pt:.2} dB, per token {tok:.2} dB, 7-bit {red:.2} dB");
    assert!(tok > pt + 3.0, "per token {tok:.2} dB against per tensor {pt:.2} dB");
    assert!(
        pt + 1.0 < red && red + 1.0 < tok,
        "per token over 7 bits {red:.2} dB, per tensor {pt:.2}, per token {tok:.2}"
    );
    let back = QuantizedModel::from_bytes(&reduced.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), reduced.forward(&x).unwrap());
}

/// Static int8 convolutions and a dynamic classifier in one model: the classifier reads the
/// int8 flatten's output (dequantized), and the plan says how each layer runs. A layer
/// without a dynamic form under a dynamic configuration runs in float, with the reason.
#[test]
fn dynamic_layers_mix_with_static_int8_ones() {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv", Conv2d::new(3, 4, 3).padding(1), x).unwrap();
    let y = g.layer("relu", ReLU, y).unwrap();
    let y = g.layer("flatten", Flatten, y).unwrap();
    let y = g.layer("fc", Linear::new(4 * 6 * 6, 5), y).unwrap();
    g.output(y);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 4);
    let input = ArrayD::from_shape_fn(IxDyn(&[2, 3, 6, 6]), |i| ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 / 5.0 - 1.0);
    let float = graph.run(std::slice::from_ref(&input)).unwrap().remove(0);
    let mapping = QConfigMapping::new(QConfig::default()).set_kind("Linear", QConfig::pytorch_dynamic_per_channel());
    let mut p = prepare(graph, &mapping).unwrap();
    p.calibrate(&input).unwrap();
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert_eq!((mode("conv"), mode("fc")), (Mode::Int8, Mode::Dynamic));
    let sqnr = sqnr_db(&float, &q.forward(&input).unwrap());
    assert!(sqnr > 25.0, "{sqnr:.1} dB");

    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv", Conv2d::new(3, 4, 3), x).unwrap();
    g.output(y);
    let q = prepare(g.build().unwrap(), &QConfigMapping::new(QConfig::pytorch_dynamic())).unwrap().convert().unwrap();
    let Mode::Float(why) = q.plan()[0].mode.clone() else { panic!("{:?}", q.plan()[0].mode) };
    assert!(why.to_string().contains("dynamic quantization covers") && why.to_string().contains("Conv2d"), "{why}");
    assert_eq!(q.forward(&input).unwrap().shape(), &[2, 4, 4, 4]);
}
