//! Models PyTorch exported (`scripts/onnx/qonnx_fixtures.py`): our float outputs against ONNX
//! Runtime's fp32, and our int8 (qrust's default configuration, the same calibration inputs)
//! against ONNX Runtime's `quantize_static`.

use qnn::{prepare, QConfigMapping};
use qobserve::QConfig;
use qonnx::tensor::read_pb;
use qonnx::ImportOptions;

use crate::{data, rel_err, sqnr_db};

fn cases() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> =
        std::fs::read_dir(data().join("models")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    v.sort();
    v
}

#[test]
fn float_outputs_equal_onnx_runtime() {
    let cases = cases();
    assert!(cases.len() >= 8, "the fixtures are missing: run scripts/onnx/qonnx_fixtures.py");
    for d in cases {
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        let m = qonnx::load(d.join("model.onnx"), &ImportOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = read_pb(d.join("input_0.pb")).unwrap();
        let want = read_pb(d.join("output_0.pb")).unwrap();
        // Imported at batch 1 (the batch is symbolic), run at batch 16.
        assert_eq!(m.inputs[0].shape[0], 1);
        let got = m.graph.run(std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("{name}: {e}")).remove(0);
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{name}: float output differs from ONNX Runtime's by {err:e} (relative)");
    }
}

/// Our int8 SQNR against ONNX Runtime's fp32 output, beside ONNX Runtime's own int8 SQNR on
/// the same calibration data, with the same nodes in float. Ours is at least theirs minus
/// 1 dB on every model (tiny random models evaluated on 16 inputs, where histogram and
/// min-max observers trade tenths of a dB either way; the bench measures the real models).
#[test]
fn int8_accuracy_against_onnx_runtime() {
    for d in cases() {
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("info.json")).unwrap()).unwrap();
        let m = qonnx::load(d.join("model.onnx"), &ImportOptions::default()).unwrap();
        let x = read_pb(d.join("input_0.pb")).unwrap();
        let fp32 = read_pb(d.join("output_0.pb")).unwrap();
        let calib = read_pb(d.join("calib.pb")).unwrap();
        // Like with like: what ONNX Runtime computes on quantized values but leaves in float
        // (a final Tanh, say) runs in float here too.
        let mut mapping = QConfigMapping::new(QConfig::default());
        for onnx_node in info["ort_float_nodes"].as_array().into_iter().flatten() {
            for (_, _, ours) in m.nodes.iter().filter(|(n, _, _)| Some(n.as_str()) == onnx_node.as_str()) {
                for n in ours {
                    mapping = mapping.skip_name(n);
                }
            }
        }
        let mut p = prepare(m.graph, &mapping).unwrap();
        for img in calib.outer_iter() {
            p.calibrate(&img.insert_axis(ndarray::Axis(0)).to_owned()).unwrap();
        }
        let q = p.convert().unwrap();
        let ours = sqnr_db(&q.forward(&x).unwrap(), &fp32);
        let plan: Vec<String> = q
            .plan()
            .iter()
            .filter(|e| matches!(e.mode, qnn::Mode::Float(_)))
            .map(|e| format!("{} ({})", e.name, e.kind))
            .collect();
        match info["ort_int8_sqnr_db"].as_f64() {
            Some(theirs) => {
                eprintln!("{name}: int8 SQNR ours {ours:.2} dB, ONNX Runtime {theirs:.2} dB; in float: {plan:?}");
                assert!(ours >= theirs - 1.0, "{name}: int8 SQNR {ours:.2} dB, ONNX Runtime's {theirs:.2}");
            }
            None => {
                eprintln!("{name}: int8 SQNR ours {ours:.2} dB; in float: {plan:?}");
                assert!(ours >= 25.0, "{name}: int8 SQNR {ours:.2} dB");
            }
        }
    }
}
