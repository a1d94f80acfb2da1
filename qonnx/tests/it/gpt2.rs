//! Hugging Face's GPT-2 as PyTorch's dynamo exporter writes it (`scripts/onnx/qonnx_gpt2_fixture.py`):
//! the tanh form of GELU, a constant causal mask over the scores and `Where(IsNaN(p), 0, p)`
//! after each softmax import as one op each; float against ONNX Runtime's fp32, int8, and the
//! QDQ export.

use ndarray::{ArrayD, Axis};
use qnn::{prepare, QConfigMapping};
use qobserve::QConfig;
use qonnx::tensor::read_pb;
use qonnx::ImportOptions;

use crate::{data, rel_err, sqnr_db};

fn read(file: &str) -> ArrayD<f32> {
    read_pb(data().join("gpt2").join(file)).unwrap_or_else(|e| panic!("gpt2/{file}: {e}"))
}

#[test]
fn gpt2_imports_and_quantizes() {
    let m = qonnx::load(data().join("gpt2/model.onnx"), &ImportOptions::default()).unwrap();
    let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
    let count = |k: &str| kinds.iter().filter(|&&x| x == k).count();
    assert_eq!((count("GELU"), count("NanToZero"), count("Softmax")), (2, 2, 2), "{kinds:?}");
    let x = read("input_ids.pb");
    let want = read("last_hidden_state.pb");
    let float = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    let err = rel_err(&float, &want);
    assert!(err <= 1e-5, "float output {err:e} from ONNX Runtime's (relative)");

    // Static int8 calibrated one item at a time (the export fixes the batch at 1), and
    // dynamic per token.
    let calib = read("calib_input_ids.pb");
    let mut p = prepare(m.graph, &QConfigMapping::new(QConfig::default())).unwrap();
    for item in calib.axis_chunks_iter(Axis(0), 1) {
        p.calibrate(&item.to_owned()).unwrap();
    }
    let q = p.convert().unwrap();
    let kinds: Vec<(String, String)> = q.plan().iter().map(|e| (e.kind.to_string(), format!("{:?}", e.mode))).collect();
    assert!(kinds.iter().any(|(k, mode)| k == "GELU" && mode == "Int8"), "{kinds:?}");
    let y = q.forward(&x).unwrap();
    let s = sqnr_db(&y, &want);
    // Attention runs head by head: the causal mask's `BatchConst` (which reads the scores for
    // their batch size) and the `NanToZero` after the softmax run in the first product; the
    // bytes are those of the same graph with the probabilities also an output (not fused).
    let prof = q.profile(std::slice::from_ref(&x), 1).unwrap();
    let runs_in = |n: &str| prof.iter().find(|t| t.name == n).unwrap().runs_in.clone();
    for (first, inner) in [("node_MatMul_155", "node_Add_156:const"), ("node_MatMul_249", "node_IsNaN_252")] {
        assert_eq!(runs_in(inner).as_deref(), Some(first), "{inner}");
    }
    let mut apart = qonnx::load(data().join("gpt2/model.onnx"), &ImportOptions::default()).unwrap().graph;
    for n in ["node_IsNaN_158", "node_IsNaN_252"] {
        apart.add_output(n).unwrap();
    }
    let mut p = prepare(apart, &QConfigMapping::new(QConfig::default())).unwrap();
    for item in calib.axis_chunks_iter(Axis(0), 1) {
        p.calibrate(&item.to_owned()).unwrap();
    }
    let apart = p.convert().unwrap();
    assert!(apart.profile(std::slice::from_ref(&x), 1).unwrap().iter().all(|t| t.runs_in.is_none()));
    let bytes = |q: &qnn::QuantizedModel| match q.forward_values(std::slice::from_ref(&x)).unwrap().remove(0) {
        qnn::Value::U8 { data, .. } => data,
        qnn::Value::F32(f) => f.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    assert_eq!(bytes(&q), bytes(&apart), "fused attention against its ops one by one");
    // Saved and loaded: the same bits.
    assert_eq!(qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap().forward(&x).unwrap(), y);
    // The QDQ export: token ids are INT64, as the exported model took them, up to the
    // embedding (a `Cast` and a `Gather`) and never quantized; the batch stays fixed at 1;
    // the `NanToZero` steps vanish (codes pass through them).
    let onnx = qonnx::export_qdq(&q, &[vec![1, 12]]).unwrap();
    let g = onnx.graph.unwrap();
    let input = g.input[0].name.clone().unwrap();
    let t = g.input[0].r#type.as_ref().unwrap().tensor_type.as_ref().unwrap();
    assert_eq!(t.elem_type, Some(qonnx::proto::data_type::INT64));
    let dims: Vec<Option<i64>> = t.shape.as_ref().unwrap().dim.iter().map(|d| d.dim_value).collect();
    assert_eq!(dims, [Some(1), Some(12)]);
    assert!(
        g.node.iter().all(|n| n.op_type.as_deref() != Some("QuantizeLinear") || !n.input.contains(&input)),
        "the token ids are quantized"
    );
    let ops: Vec<&str> = g.node.iter().filter_map(|n| n.op_type.as_deref()).collect();
    let at = ops.iter().position(|&o| o == "Gather").expect("a Gather");
    assert_eq!(ops[at - 1], "Cast");
    assert!(!ops.contains(&"IsNaN") && !ops.contains(&"Where"), "{ops:?}");
    let m = qonnx::load(data().join("gpt2/model.onnx"), &ImportOptions::default()).unwrap();
    let d = prepare(m.graph, &QConfigMapping::new(QConfig::dynamic_per_token())).unwrap().convert().unwrap();
    let sd = sqnr_db(&d.forward(&x).unwrap(), &want);
    eprintln!("GPT-2 (2 layers): static int8 {s:.2} dB, dynamic per token {sd:.2} dB");
    assert!(s > 25.0 && sd > 35.0, "static {s:.2} dB, dynamic per token {sd:.2} dB");
}
