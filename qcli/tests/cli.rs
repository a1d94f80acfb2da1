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
    // The rule kept the classifier in float, and the plan says so.
    assert!(text(&o).contains("float: /fc/Gemm (Linear): kept in float by the configuration"), "{}", text(&o));

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
    let cfg = dir.join("dynamic.toml");
    std::fs::write(&cfg, "preset = \"dynamic-per-token\"\n").unwrap();
    let dynamic = dir.join("convnet.dynamic.safetensors");
    let o = qrust(&["quantize", &model, "--config", cfg.to_str().unwrap(), "-o", dynamic.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 layers in int8, 1 dynamic"), "{}", text(&o));
    assert!(text(&o).contains("dynamic quantization covers"), "{}", text(&o));
    let o = qrust(&["run", dynamic.to_str().unwrap(), "--input", &input, "--profile"]);
    assert!(o.status.success() && text(&o).contains("LinearDynamic"), "{}", text(&o));
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
