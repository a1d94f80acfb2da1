//! The `qrust` command line end to end on a model PyTorch exported (qonnx's `convnet`
//! fixture): inspect, quantize with rules, run, report, export to QDQ, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qrust(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qrust")).args(args).output().expect("the qrust binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn fixture(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qonnx/tests/data/models/convnet").join(file);
    p.to_str().unwrap().to_string()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qrust-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn quantize_run_report_and_export() {
    let dir = scratch("flow");
    let model = fixture("model.onnx");
    let o = qrust(&["inspect", &model]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("/stem/stem.0/Conv") && text(&o).contains("(any batch size)"), "{}", text(&o));

    let cfg = dir.join("rules.toml");
    std::fs::write(&cfg, "preset = \"default\"\n[[rule]]\nop = \"Gemm\"\nskip = true\n").unwrap();
    let int8 = dir.join("convnet.int8.safetensors");
    let (calib, input) = (fixture("calib.pb"), fixture("input_0.pb"));
    let o = qrust(&[
        "quantize",
        &model,
        "--calib",
        &calib,
        "--batch-size",
        "2",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        int8.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The rule kept the classifier in float, and the plan says so; the convolutions' biases
    // were corrected.
    assert!(text(&o).contains("float: /fc/Gemm (Linear): kept in float by the configuration"), "{}", text(&o));
    assert!(text(&o).contains("bias corrected: "), "{}", text(&o));
    let plain = dir.join("rules_plain.toml");
    std::fs::write(&plain, "bias_correction = false\n").unwrap();
    let out = dir.join("plain.safetensors");
    let o = qrust(&[
        "quantize",
        &model,
        "--calib",
        &calib,
        "--config",
        plain.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success() && !text(&o).contains("bias corrected"), "{}", text(&o));

    let out = dir.join("y.npy");
    let o = qrust(&["run", int8.to_str().unwrap(), "--input", &input, "-o", out.to_str().unwrap(), "--top", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("output [16, 10]") && text(&o).contains("item 15:"), "{}", text(&o));
    assert!(out.exists());

    // Per-node times: every int8 node by name, the convolutions with their GMAC/s and kernel.
    let o = qrust(&["run", int8.to_str().unwrap(), "--input", &input, "--repeat", "3", "--profile"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("per node, median of 3 run(s)") && t.contains("per op (sum of node medians"), "{t}");
    let conv = t.lines().find(|l| l.starts_with("/stem/stem.0/Conv")).unwrap_or_else(|| panic!("{t}"));
    // ... then the kernel that runs it on this machine.
    let (times, kernel) = conv.rsplit_once("  ").unwrap_or_else(|| panic!("{conv}"));
    assert!(conv.contains("Conv2d") && times.split_whitespace().last().unwrap().parse::<f64>().is_ok(), "{conv}");
    assert!(kernel.contains("GEMM") && kernel.contains(qnn::qtensor::isa::selected().name()), "{conv}");
    let o = qrust(&["run", &model, "--input", &input, "--profile"]);
    assert!(!o.status.success() && text(&o).contains("run `qrust quantize` on it first"), "{}", text(&o));

    // Dynamic quantization, no calibration data: the classifier dynamic, the rest in float.
    for preset in ["dynamic-per-token", "dynamic-per-token-reduced"] {
        let cfg = dir.join("dynamic.toml");
        std::fs::write(&cfg, format!("preset = \"{preset}\"\n")).unwrap();
        let dynamic = dir.join("convnet.dynamic.safetensors");
        let o = qrust(&["quantize", &model, "--config", cfg.to_str().unwrap(), "-o", dynamic.to_str().unwrap()]);
        assert!(o.status.success(), "{preset}: {}", text(&o));
        assert!(text(&o).contains("0 layers in int8, 1 dynamic"), "{preset}: {}", text(&o));
        assert!(text(&o).contains("dynamic quantization covers"), "{preset}: {}", text(&o));
        let o = qrust(&["run", dynamic.to_str().unwrap(), "--input", &input, "--profile"]);
        assert!(o.status.success() && text(&o).contains("LinearDynamic"), "{preset}: {}", text(&o));
    }
    // Static layers without calibration data: the error says what is missing.
    let o = qrust(&["quantize", &model, "-o", dir.join("x.safetensors").to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("no --calib given"), "{}", text(&o));

    let json = dir.join("report.json");
    let o = qrust(&["report", &model, int8.to_str().unwrap(), "--input", &input, "--json", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let fc = rows.as_array().unwrap().iter().find(|r| r["name"] == "/fc/Gemm").unwrap();
    assert_eq!(fc["mode"], "float");

    let qdq = dir.join("convnet.qdq.onnx");
    let o = qrust(&["export-qdq", int8.to_str().unwrap(), "-o", qdq.to_str().unwrap(), "--input-shape", "1,3,16,16"]);
    assert!(o.status.success(), "{}", text(&o));
    // The export is an ONNX model qonnx reads back (ops on quantize / dequantize pairs).
    let bytes = std::fs::read(&qdq).unwrap();
    let m = qonnx::decode_model(&bytes, "qdq").unwrap();
    let ops: Vec<&str> = m.graph.as_ref().unwrap().node.iter().filter_map(|n| n.op_type.as_deref()).collect();
    assert!(ops.contains(&"QuantizeLinear") && ops.contains(&"DequantizeLinear") && ops.contains(&"Conv"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mistakes_are_errors_that_say_what_to_do() {
    let dir = scratch("errors");
    let model = fixture("model.onnx");
    let o = qrust(&["quantize", &model, "--calib", "/no/such/folder"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("/no/such/folder: no such file or folder"), "{}", text(&o));

    // Calibration data of the wrong shape names both shapes.
    let o = qrust(&["quantize", &model, "--calib", &fixture("output_0.pb"), "-o", dir.join("m").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("[10]") && text(&o).contains("[3, 16, 16]"), "{}", text(&o));

    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[rule]]\nop = \"LRN\"\nskip = true\n").unwrap();
    let o = qrust(&["quantize", &model, "--calib", &fixture("calib.pb"), "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("the model has no LRN node") && text(&o).contains("Conv"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model of two inputs, token ids (INT64) looked up in a table and an additive mask: an .npz
/// of one array per input, named as the inputs (the ids as int64), calibrates, runs the int8
/// model and the float one; a lone .npy or a missing array is an error that says what to give.
#[test]
fn models_of_several_inputs_take_an_npz_by_input_name() {
    use ndarray::{ArrayD, IxDyn};
    use prost::Message;
    use qonnx::proto::{
        data_type, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
        TypeProto, TypeTensor, ValueInfoProto,
    };
    let dir = scratch("inputs");
    let value = |name: &str, elem: i32, dims: &[Option<i64>]| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeTensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => Dimension { dim_value: Some(*v), ..Default::default() },
                            None => Dimension { dim_param: Some("batch".into()), ..Default::default() },
                        })
                        .collect(),
                }),
            }),
            denotation: None,
        }),
        doc_string: None,
    };
    let node = |op: &str, name: &str, inputs: &[&str], out: &str| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        name: Some(name.into()),
        op_type: Some(op.into()),
        ..Default::default()
    };
    let table = TensorProto {
        dims: vec![6, 4],
        data_type: Some(data_type::FLOAT),
        float_data: (0..24).map(|k| k as f32 * 0.25 - 3.0).collect(),
        name: Some("table".into()),
        ..Default::default()
    };
    let w = TensorProto {
        dims: vec![4, 3],
        data_type: Some(data_type::FLOAT),
        float_data: (0..12).map(|k| (k % 5) as f32 * 0.3 - 0.6).collect(),
        name: Some("w".into()),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(GraphProto {
            node: vec![
                node("Gather", "embed", &["table", "ids"], "e"),
                node("Add", "masked", &["e", "mask"], "m"),
                node("MatMul", "proj", &["m", "w"], "y"),
            ],
            name: Some("g".into()),
            initializer: vec![table, w],
            input: vec![
                value("ids", data_type::INT64, &[None, Some(5)]),
                value("mask", data_type::FLOAT, &[None, Some(1), Some(4)]),
            ],
            output: vec![value("y", data_type::FLOAT, &[])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let onnx = dir.join("tokens.onnx");
    std::fs::write(&onnx, model.encode_to_vec()).unwrap();
    let npz = |path: &std::path::Path, n: usize, with_mask: bool| {
        let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
        let ids = ArrayD::from_shape_fn(IxDyn(&[n, 5]), |i| ((i[0] * 5 + i[1] * 2) % 6) as i64);
        z.add_array("ids", &ids).unwrap();
        if with_mask {
            let mask = ArrayD::from_shape_fn(IxDyn(&[n, 1, 4]), |i| if (i[0] + i[2]) % 3 == 0 { -1.0f32 } else { 0.0 });
            z.add_array("mask", &mask).unwrap();
        }
        z.finish().unwrap();
    };
    let (calib, input, partial) = (dir.join("calib.npz"), dir.join("x.npz"), dir.join("partial.npz"));
    npz(&calib, 8, true);
    npz(&input, 2, true);
    npz(&partial, 2, false);
    let int8 = dir.join("tokens.int8.safetensors");
    let (onnx, int8s) = (onnx.to_str().unwrap(), int8.to_str().unwrap());
    let o = qrust(&["quantize", onnx, "--calib", calib.to_str().unwrap(), "-o", int8s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("calibrated on 8 items of 2 inputs"), "{}", text(&o));
    let (yq, yf) = (dir.join("yq.npy"), dir.join("yf.npy"));
    let o = qrust(&["run", int8s, "--input", input.to_str().unwrap(), "-o", yq.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("output [2, 5, 3]"), "{}", text(&o));
    let o = qrust(&["run", onnx, "--input", input.to_str().unwrap(), "-o", yf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let read = |p: &std::path::Path| -> ArrayD<f32> {
        ndarray_npy::ReadNpyExt::read_npy(std::fs::File::open(p).unwrap()).unwrap()
    };
    let (q, f) = (read(&yq), read(&yf));
    let noise: f32 = q.iter().zip(&f).map(|(a, b)| (a - b) * (a - b)).sum();
    let db = 10.0 * (f.iter().map(|a| a * a).sum::<f32>() / noise).log10();
    assert!(db > 30.0, "int8 against float: {db:.1} dB");
    // The per-layer report reads the same .npz: every node, with the layers' SQNR.
    let o = qrust(&["report", onnx, int8s, "--input", input.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    for layer in ["embed", "masked", "proj"] {
        assert!(text(&o).lines().any(|l| l.starts_with(layer)), "{layer} missing from the report:\n{}", text(&o));
    }
    let proj = text(&o).lines().find(|l| l.starts_with("proj ")).map(str::to_string).unwrap_or_default();
    let sqnr: f64 = proj.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    assert!(sqnr > 30.0, "proj's SQNR in the report: {proj}");
    let o = qrust(&["report", onnx, int8s, "--input", partial.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("no array 'mask'"), "{}", text(&o));
    let o = qrust(&["run", int8s, "--input", partial.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("no array 'mask'") && text(&o).contains("mask=..."),
        "{}",
        text(&o)
    );
    let o = qrust(&["run", int8s, "--input", yq.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("the model has 2 inputs (ids, mask)"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A BERT whose sequence length is symbolic (qonnx's `sequence/bert` fixture): without
/// `--input-shape` the sizes come from the `.npz`; calibrated at 12 tokens, the int8 model
/// runs at 7 (ONNX Runtime's fp32 output at 7 tokens as the reference).
#[test]
fn a_symbolic_sequence_length_takes_its_size_from_the_data_and_runs_at_others() {
    use ndarray::ArrayD;
    let dir = scratch("sequence");
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qonnx/tests/data/sequence/bert");
    let model = case.join("model.onnx");
    let model = model.to_str().unwrap();
    let npz = |path: &Path, prefix: &str| {
        let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
        for name in ["input_ids", "token_type_ids", "attention_mask"] {
            let a = qonnx::tensor::read_pb(case.join(format!("{prefix}_{name}.pb"))).unwrap();
            z.add_array(name, &a).unwrap();
        }
        z.finish().unwrap();
    };
    let (calib, x7) = (dir.join("calib.npz"), dir.join("x7.npz"));
    npz(&calib, "calib");
    npz(&x7, "T7");
    let o = qrust(&["inspect", model]);
    assert!(!o.status.success() && text(&o).contains("symbolic ('seq')"), "{}", text(&o));
    let shapes = ["--input-shape", "input_ids=1,12", "--input-shape", "token_type_ids=1,12", "--input-shape"];
    let o = qrust(&[&["inspect", model][..], &shapes, &["attention_mask=1,1,1,12"]].concat());
    assert!(o.status.success() && text(&o).contains("any seq (axis 3)"), "{}", text(&o));
    assert!(text(&o).contains("'seq' imported at 12"), "{}", text(&o));
    let int8 = dir.join("bert.int8.safetensors");
    let o = qrust(&["quantize", model, "--calib", calib.to_str().unwrap(), "-o", int8.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("calibrated on 8 items of 3 inputs"), "{}", text(&o));
    let y = dir.join("y7.npy");
    let o = qrust(&["run", int8.to_str().unwrap(), "--input", x7.to_str().unwrap(), "-o", y.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("output [2, 7, 32]"), "{}", text(&o));
    let got: ArrayD<f32> = ndarray_npy::ReadNpyExt::read_npy(std::fs::File::open(&y).unwrap()).unwrap();
    let want = qonnx::tensor::read_pb(case.join("T7_last_hidden_state.pb")).unwrap();
    let noise: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
    let db = 10.0 * (want.iter().map(|a| a * a).sum::<f32>() / noise).log10();
    assert!(db > 28.0, "int8 at 7 tokens against ONNX Runtime's fp32: {db:.1} dB");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--smooth-quant` on the digits ViT: the LayerNorms that only linear layers read are
/// smoothed before calibration, the others listed with the reason; `report` smooths the
/// float model the same way to compare; a bad alpha, or no calibration data to measure on,
/// is an error that says so.
/// A scratch folder named `name`, the bundled digits ViT's path, and 16 images for it written
/// there as `calib.npy`.
fn digits_vit(name: &str) -> (PathBuf, String, PathBuf) {
    let dir = scratch(name);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qnn/data/digits_vit/model.onnx");
    let calib = dir.join("calib.npy");
    let x = ndarray::Array4::from_shape_fn((16, 1, 8, 8), |(n, _, h, w)| ((n * 64 + h * 8 + w) % 17) as f32 / 4.0);
    ndarray_npy::write_npy(&calib, &x).unwrap();
    (dir, model.to_str().unwrap().to_string(), calib)
}

#[test]
fn smooth_quant_on_a_vision_transformer() {
    let (dir, model, calib) = digits_vit("smooth");
    let model = model.as_str();
    let out = dir.join("vit.int8.safetensors");
    let args = ["quantize", model, "--calib", calib.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let o = qrust(&[&args[..], &["--smooth-quant", "0.5"]].concat());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("SmoothQuant (alpha 0.5): 4 LayerNorms smoothed, 1 left alone"), "{t}");
    assert!(t.contains("/encoder/ln/LayerNormalization: left alone"), "{t}");
    assert!(out.exists());
    // The report compares against the float model smoothed the same way; without the
    // smoothing, the LayerNorms differ from the int8 model's, and the error says what to give.
    let (calib, int8) = (calib.to_str().unwrap(), out.to_str().unwrap());
    let o = qrust(&["report", model, int8, "--input", calib]);
    assert!(!o.status.success() && text(&o).contains("--smooth-quant and --calib"), "{}", text(&o));
    let o = qrust(&["report", model, int8, "--input", calib, "--smooth-quant", "0.5", "--calib", calib]);
    assert!(o.status.success() && text(&o).contains("/encoder/ln/LayerNormalization"), "{}", text(&o));
    // A model quantized without it reports as before.
    let plain = dir.join("plain.int8.safetensors");
    let o = qrust(&["quantize", model, "--calib", calib, "-o", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = qrust(&["report", model, plain.to_str().unwrap(), "--input", calib]);
    assert!(o.status.success(), "{}", text(&o));
    let o = qrust(&[&args[..], &["--smooth-quant", "1.5"]].concat());
    assert!(!o.status.success() && text(&o).contains("alpha 1.5 is outside 0..=1"), "{}", text(&o));
    let o = qrust(&["quantize", model, "--smooth-quant", "0.5", "-o", out.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("give --calib"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `residual = "float"` in the configuration: the digits ViT's residual additions and the
/// LayerNorms reading them stay float, the plan says why, and the int8 model runs.
#[test]
fn a_float_residual_stream_on_a_vision_transformer() {
    let (dir, model, calib) = digits_vit("residual");
    let model = model.as_str();
    let config = dir.join("residual.toml");
    std::fs::write(&config, "residual = \"float\"\n").unwrap();
    let out = dir.join("vit.int8.safetensors");
    let (calib, out) = (calib.to_str().unwrap(), out.to_str().unwrap());
    let o = qrust(&["quantize", model, "--calib", calib, "--config", config.to_str().unwrap(), "-o", out]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for node in ["/encoder/layers/encoder_layer_1/Add_1 (add)", "/encoder/ln/LayerNormalization (LayerNorm)"] {
        assert!(t.contains(&format!("float: {node}: the residual stream stays float")), "{node}: {t}");
    }
    // Two blocks: the position embedding's addition and four residual ones, and the norms
    // reading them.
    assert_eq!(t.matches("the residual stream stays float").count(), 10, "{t}");
    let o = qrust(&["run", out, "--input", calib]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(&config, "residual = \"half\"\n").unwrap();
    let o = qrust(&["quantize", model, "--calib", calib, "--config", config.to_str().unwrap(), "-o", out]);
    assert!(!o.status.success() && text(&o).contains("residual 'half'"), "{}", text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model of one input of token ids (qonnx's GPT-2 fixture, `[1, 12]` INT64): an int64
/// `.npy` or `.npz` runs it (the image options are not consulted for a rank-2 input), and
/// calibration one item at a time quantizes it, whether asked for or not (its batch is fixed).
#[test]
fn token_ids_in_npy_and_npz_run_a_single_input_model() {
    let dir = scratch("gpt2");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qonnx/tests/data/gpt2/model.onnx");
    let model = model.to_str().unwrap();
    let ids = ndarray::Array2::<i64>::from_shape_fn((1, 12), |(_, j)| (j as i64 * 7) % 100);
    let npy = dir.join("ids.npy");
    ndarray_npy::write_npy(&npy, &ids).unwrap();
    let npz = dir.join("ids.npz");
    let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
    z.add_array("input_ids", &ids).unwrap();
    z.finish().unwrap();
    let (a, b) = (dir.join("a.npy"), dir.join("b.npy"));
    for (input, out) in [(&npy, &a), (&npz, &b)] {
        let o = qrust(&["run", model, "--input", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let calib = dir.join("calib.npz");
    let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(&calib).unwrap());
    z.add_array(
        "input_ids",
        &ndarray::Array2::<i64>::from_shape_fn((4, 12), |(i, j)| (i as i64 * 31 + j as i64 * 3) % 100),
    )
    .unwrap();
    z.finish().unwrap();
    let int8 = dir.join("gpt2.int8.safetensors");
    let o = qrust(&[
        "quantize",
        model,
        "--calib",
        calib.to_str().unwrap(),
        "--batch-size",
        "1",
        "-o",
        int8.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = qrust(&["run", int8.to_str().unwrap(), "--input", npy.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("[1, 12, 32]"), "{}", text(&o));
    // The export fixes the batch at 1 in its reshapes: the default batch size calibrates
    // one item at a time, says so, and gives the same model.
    let default = dir.join("gpt2.default.int8.safetensors");
    let o = qrust(&["quantize", model, "--calib", calib.to_str().unwrap(), "-o", default.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("fixes the batch at 1"), "{}", text(&o));
    assert_eq!(std::fs::read(&default).unwrap(), std::fs::read(&int8).unwrap());
    // Four items run one at a time, in float and in int8: each item's output is that of the
    // item run alone.
    let third = dir.join("third.npy");
    ndarray_npy::write_npy(&third, &ndarray::Array2::<i64>::from_shape_fn((1, 12), |(_, j)| (62 + j as i64 * 3) % 100))
        .unwrap();
    for m in [model, int8.to_str().unwrap()] {
        let (four, one) = (dir.join("four.npy"), dir.join("one.npy"));
        let o = qrust(&["run", m, "--input", calib.to_str().unwrap(), "-o", four.to_str().unwrap()]);
        assert!(o.status.success() && text(&o).contains("[4, 12, 32]"), "{m}: {}", text(&o));
        let o = qrust(&["run", m, "--input", third.to_str().unwrap(), "-o", one.to_str().unwrap()]);
        assert!(o.status.success(), "{m}: {}", text(&o));
        let four: ndarray::ArrayD<f32> = ndarray_npy::read_npy(&four).unwrap();
        let one: ndarray::ArrayD<f32> = ndarray_npy::read_npy(&one).unwrap();
        assert_eq!(four.index_axis(ndarray::Axis(0), 2), one.index_axis(ndarray::Axis(0), 0), "{m}");
    }
    let o = qrust(&["report", model, int8.to_str().unwrap(), "--input", calib.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("node_layer_norm_4"), "{}", text(&o));
}
