//! `cargo xtask accuracy`: the bundled digits model under every qconfig preset and every
//! activation observer, and with its linear layers dynamically quantized; then the bundled
//! digits ViT (`qnn/data/digits_vit/`, `scripts/models/digits_vit.py`) imported from ONNX, in
//! static int8 (plain, with the residual stream in float, and after SmoothQuant) and dynamic
//! (per tensor and per token): held-out
//! accuracy, SQNR of the int8 logits against the float ones, top-1 agreement with the float
//! model. Exits non-zero when a result falls below the thresholds committed in
//! `xtask/accuracy-thresholds.json` (CI's accuracy regression gate), when the ViT's float
//! import strays from ONNX Runtime's logits, or when its int8 accuracy falls more than 0.3
//! points below its f32 accuracy.

use std::path::Path;

use ndarray::{ArrayD, Axis};
use qnn::{fuse, prepare, Module, QConfigMapping};
use qobserve::{ObserverSpec, QConfig, QuantSpec};

use crate::demo::{argmax_rows, digits_data, float_model};

/// The configurations measured, by name: each preset on the whole model, and the default
/// with the linear layers dynamically quantized.
fn configs() -> Vec<(&'static str, QConfigMapping)> {
    let mut all: Vec<(&'static str, QConfigMapping)> =
        presets().into_iter().map(|(name, q)| (name, QConfigMapping::new(q))).collect();
    let dynamic = |q: QConfig| QConfigMapping::new(QConfig::default()).set_kind("Linear", q);
    all.push(("dynamic_linear", dynamic(QConfig::pytorch_dynamic_per_channel())));
    all.push(("dynamic_linear_per_token", dynamic(QConfig::dynamic_per_token())));
    all
}

/// The presets and observers, by name.
fn presets() -> Vec<(&'static str, QConfig)> {
    let act = |activation: ObserverSpec| QConfig { activation, ..QConfig::default() };
    let u8 = QuantSpec::u8_affine();
    vec![
        ("default", QConfig::default()),
        ("pytorch_x86", QConfig::pytorch_x86()),
        ("qnnpack", QConfig::qnnpack()),
        ("pytorch_minmax", QConfig::pytorch_minmax()),
        ("pytorch_per_channel_minmax", QConfig::pytorch_per_channel_minmax()),
        ("minmax", act(ObserverSpec::MinMax(u8))),
        ("moving_average", act(ObserverSpec::MovingAverageMinMax { spec: u8, averaging: 0.01 })),
        ("percentile_99.99", QConfig::percentile(99.99)),
        ("entropy", act(ObserverSpec::Entropy(u8))),
        ("mse", QConfig::mse()),
        (
            "per_tensor_weights",
            QConfig { weight: ObserverSpec::MinMax(QuantSpec::i8_symmetric()), ..QConfig::default() },
        ),
    ]
}

struct Row {
    accuracy: f64,
    sqnr_db: f64,
    agreement: f64,
}

impl Row {
    /// int8 `logits` scored against the labels and against the float model's logits and top
    /// classes.
    fn of(logits: &ArrayD<f32>, labels: &[usize], (float, float_top): (&ArrayD<f32>, &[usize])) -> Row {
        let top = argmax_rows(logits);
        let n = labels.len() as f64;
        Row {
            accuracy: top.iter().zip(labels).filter(|(a, b)| a == b).count() as f64 / n,
            sqnr_db: qnn::sqnr_db(float, logits),
            agreement: top.iter().zip(float_top).filter(|(a, b)| a == b).count() as f64 / n,
        }
    }
}

/// The SQNR every preset must reach on the digits model, whatever was measured.
const MIN_SQNR_DB: f64 = 33.0;

/// The accuracy the digits ViT may lose in int8, whatever was measured: 0.3 points.
const VIT_MAX_ACCURACY_LOSS: f64 = 0.003;

/// Prints `row` beside its committed thresholds (the SQNR one never below `floor`) and
/// records a failure below them; with `written`, records thresholds from it instead.
fn judge(
    name: &str,
    row: &Row,
    floor: f64,
    thresholds: &serde_json::Value,
    written: Option<&mut serde_json::Map<String, serde_json::Value>>,
    failures: &mut Vec<String>,
    path: &Path,
) {
    let t = &thresholds[name];
    let limits =
        (t["min_accuracy"].as_f64(), t["min_sqnr_db"].as_f64().map(|s| s.max(floor)), t["min_agreement"].as_f64());
    let shown = match limits {
        (Some(a), Some(s), Some(g)) => format!(">= {:.1}%, {s:.1}, {:.1}%", a * 100.0, g * 100.0),
        _ => "-".into(),
    };
    println!(
        "{:<30} {:>8.1}% {:>9.1} {:>9.1}%   {shown}",
        name,
        row.accuracy * 100.0,
        row.sqnr_db,
        row.agreement * 100.0
    );
    if let Some(written) = written {
        // Half a point of accuracy and agreement, 1.5 dB of SQNR below what was measured;
        // SQNR never below the floor.
        written.insert(
            name.to_string(),
            serde_json::json!({
                "min_accuracy": ((row.accuracy - 0.005) * 1000.0).floor() / 1000.0,
                "min_sqnr_db": (((row.sqnr_db - 1.5) * 10.0).floor() / 10.0).max(floor),
                "min_agreement": ((row.agreement - 0.005) * 1000.0).floor() / 1000.0,
            }),
        );
        return;
    }
    match limits {
        (Some(a), Some(s), Some(g)) => {
            if row.accuracy < a || row.sqnr_db < s || row.agreement < g {
                failures.push(format!("{name}: below its thresholds"));
            }
        }
        _ => failures.push(format!("{name}: no thresholds in {} (run with --write-thresholds)", path.display())),
    }
}

pub fn run(root: &Path, write_thresholds: bool) -> Result<(), String> {
    let (images, labels, calib) = digits_data(root)?;
    // Calibration in batches of 16, so moving-average observers average over something.
    let batches: Vec<ArrayD<f32>> = calib.axis_chunks_iter(Axis(0), 16).map(|b| b.to_owned()).collect();
    let float_logits = float_model(root)?.forward(&images).map_err(|e| e.to_string())?;
    let fp = argmax_rows(&float_logits);
    let f_acc = fp.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64;
    println!("digits, {} held-out images; f32 accuracy {:.1}%\n", labels.len(), f_acc * 100.0);

    let path = root.join("xtask/accuracy-thresholds.json");
    let thresholds: serde_json::Value = if write_thresholds {
        serde_json::Value::Null
    } else {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    println!(
        "{:<30} {:>9} {:>9} {:>10}   {:<}",
        "qconfig", "accuracy", "SQNR dB", "agreement", "thresholds (accuracy, SQNR, agreement)"
    );
    let (mut failures, mut written) = (Vec::new(), serde_json::Map::new());
    for (name, mapping) in configs() {
        let mut model = float_model(root)?;
        fuse(&mut model).map_err(|e| e.to_string())?;
        let mut prepared = prepare(model, &mapping).map_err(|e| e.to_string())?;
        for b in &batches {
            prepared.calibrate(b).map_err(|e| format!("{name}: {e}"))?;
        }
        let q = prepared.convert().map_err(|e| format!("{name}: {e}"))?;
        let logits = q.forward(&images).map_err(|e| format!("{name}: {e}"))?;
        let row = Row::of(&logits, &labels, (&float_logits, &fp));
        judge(name, &row, MIN_SQNR_DB, &thresholds, write_thresholds.then_some(&mut written), &mut failures, &path);
    }

    // The digits ViT, imported from its ONNX export, static and dynamic.
    let dir = root.join("qnn/data/digits_vit");
    let load_vit = || {
        qonnx::load(dir.join("model.onnx"), &qonnx::ImportOptions::default())
            .map_err(|e| format!("the digits ViT ({}): {e}", dir.display()))
    };
    let vit_float = load_vit()?.graph.run(std::slice::from_ref(&images)).map_err(|e| e.to_string())?.remove(0);
    let ort = dir.join("output_0.pb");
    let err = crate::bench_models::rel_err_to_pb(&ort, &vit_float).unwrap_or(f64::INFINITY);
    if err > 1e-4 {
        failures.push(format!(
            "digits ViT: our float logits {:?} differ from ONNX Runtime's in {} by {err:e} (relative; infinite: a \
             missing file or another shape)",
            vit_float.shape(),
            ort.display()
        ));
    }
    let vp = argmax_rows(&vit_float);
    let v_acc = vp.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64;
    println!(
        "\ndigits ViT (torchvision's VisionTransformer: 2 layers, 4 heads, width 64; imported from ONNX): f32 accuracy \
         {:.1}%, float logits {err:.1e} from ONNX Runtime's; int8 accuracy must stay within {} points of f32",
        v_acc * 100.0,
        VIT_MAX_ACCURACY_LOSS * 100.0
    );
    // SmoothQuant: static int8 after moving activation outliers into the weights, measured
    // on the calibration batches.
    let smooth_batches: Vec<Vec<ndarray::ArrayD<f32>>> = batches.iter().map(|b| vec![b.clone()]).collect();
    let float_residual = |q: QConfig| QConfigMapping::new(q).residual(qnn::ResidualStream::Float);
    for (name, mapping, smooth) in [
        ("vit_default", QConfigMapping::new(QConfig::default()), None),
        ("vit_float_residual", float_residual(QConfig::default()), None),
        ("vit_smoothquant", QConfigMapping::new(QConfig::default()), Some(0.5)),
        ("vit_dynamic", QConfigMapping::new(QConfig::pytorch_dynamic_per_channel()), None),
        ("vit_dynamic_per_token", QConfigMapping::new(QConfig::dynamic_per_token()), None),
        ("vit_dynamic_per_token_reduced", QConfigMapping::new(QConfig::dynamic_per_token_reduced()), None),
    ] {
        let mut graph = load_vit()?.graph;
        if let Some(alpha) = smooth {
            let report = qnn::smooth_quant(&mut graph, &smooth_batches, alpha).map_err(|e| format!("{name}: {e}"))?;
            if report.smoothed.is_empty() {
                failures.push(format!("{name}: no LayerNorm smoothed ({:?})", report.skipped));
            }
            let ratios: Vec<String> = report
                .smoothed
                .iter()
                .map(|s| format!("{:.1} -> {:.1}", s.outlier_ratio.0, s.outlier_ratio.1))
                .collect();
            println!(
                "{name}: alpha {alpha}, {} of {} LayerNorms smoothed (largest / median channel range: {})",
                report.smoothed.len(),
                report.smoothed.len() + report.skipped.len(),
                ratios.join(", ")
            );
        }
        let mut prepared = prepare(graph, &mapping).map_err(|e| e.to_string())?;
        for b in &batches {
            prepared.calibrate(b).map_err(|e| format!("{name}: {e}"))?;
        }
        let q = prepared.convert().map_err(|e| format!("{name}: {e}"))?;
        let logits = q.forward(&images).map_err(|e| format!("{name}: {e}"))?;
        let row = Row::of(&logits, &labels, (&vit_float, &vp));
        if row.accuracy < v_acc - VIT_MAX_ACCURACY_LOSS - 1e-9 {
            failures.push(format!(
                "{name}: int8 accuracy {:.1}% is more than {} points below f32's {:.1}%",
                row.accuracy * 100.0,
                VIT_MAX_ACCURACY_LOSS * 100.0,
                v_acc * 100.0
            ));
        }
        judge(name, &row, 0.0, &thresholds, write_thresholds.then_some(&mut written), &mut failures, &path);
    }
    if write_thresholds {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(written)).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("\nwrote {}", path.display());
        return Ok(());
    }
    if failures.is_empty() {
        println!("\nevery configuration meets its thresholds");
        Ok(())
    } else {
        Err(format!("accuracy regression:\n  {}", failures.join("\n  ")))
    }
}
