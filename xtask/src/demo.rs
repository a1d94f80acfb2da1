//! `cargo xtask demo`: the main job on the bundled digits model and data (`qnn/data/`):
//! fuse, calibrate, convert, evaluate, report.

use std::path::Path;
use std::time::Instant;

use ndarray::{ArrayD, Axis, IxDyn};
use qnn::{fuse, load_safetensors, prepare, zoo, Mode, Module, QConfigMapping, Value};
use qobserve::QConfig;
use safetensors::SafeTensors;

fn read(root: &Path, name: &str) -> Result<Vec<u8>, String> {
    let p = root.join("qnn/data").join(name);
    std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
}

pub(crate) fn f32s(st: &SafeTensors<'_>, key: &str) -> Result<ArrayD<f32>, String> {
    let t = st.tensor(key).map_err(|e| format!("{key}: {e}"))?;
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).map_err(|e| e.to_string())
}

pub(crate) fn argmax_rows(x: &ArrayD<f32>) -> Vec<usize> {
    x.axis_iter(Axis(0)).map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)).collect()
}

fn median_us(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..201)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub(crate) fn float_model(root: &Path) -> Result<qnn::Sequential, String> {
    let mut m = zoo::digits();
    load_safetensors(&mut m, root.join("qnn/data/digits_model.safetensors")).map_err(|e| e.to_string())?;
    Ok(m)
}

/// The bundled digits data: held-out images, their labels, calibration images.
pub(crate) type DigitsData = (ArrayD<f32>, Vec<usize>, ArrayD<f32>);

/// Reads [`DigitsData`] from `qnn/data/`.
pub(crate) fn digits_data(root: &Path) -> Result<DigitsData, String> {
    let (test, calib) = (read(root, "digits_test.safetensors")?, read(root, "calib.safetensors")?);
    let (test, calib) = (
        SafeTensors::deserialize(&test).map_err(|e| e.to_string())?,
        SafeTensors::deserialize(&calib).map_err(|e| e.to_string())?,
    );
    let labels: Vec<usize> = test
        .tensor("labels")
        .map_err(|e| e.to_string())?
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunks")) as usize)
        .collect();
    Ok((f32s(&test, "images")?, labels, f32s(&calib, "images")?))
}

pub fn run(root: &Path, report_json: Option<&Path>, plots: Option<&Path>) -> Result<(), String> {
    let (images, labels, calib) = digits_data(root)?;

    println!("qrust demo: the bundled digits model (scikit-learn's 8x8 handwritten digits, trained in PyTorch)");
    println!("kernels: {} (set QUANT_FORCE_ISA=scalar or avx2 to compare)\n", qtensor::isa::selected());

    let mut model = float_model(root)?;
    let float_logits = model.forward(&images).map_err(|e| e.to_string())?;
    let fused = fuse(&mut model).map_err(|e| e.to_string())?;
    println!("fused: {}", fused.iter().map(|f| format!("[{}]", f.modules.join(" + "))).collect::<Vec<_>>().join(", "));
    let mut reference = float_model(root)?;
    fuse(&mut reference).map_err(|e| e.to_string())?;

    let mut prepared = prepare(model, &QConfigMapping::new(QConfig::default())).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let batches: Vec<ArrayD<f32>> = calib.axis_chunks_iter(Axis(0), 32).map(|b| b.to_owned()).collect();
    prepared.calibrate_batches(&batches, 2).map_err(|e| e.to_string())?;
    let cal_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut pictures: Vec<(String, String)> = Vec::new();
    if plots.is_some() {
        for (name, obs) in prepared.observers() {
            if let Some(svg) = qnn::plots::histogram_chart(&name, obs) {
                pictures.push((format!("hist-{}.svg", name.replace([' ', '/'], "_")), svg));
            }
        }
    }
    let q = prepared.convert().map_err(|e| e.to_string())?;
    println!(
        "calibrated on {} images, 2 threads (histogram observers, full u8 range) in {cal_ms:.1} ms\n",
        calib.shape()[0]
    );

    let int8_logits = q.forward(&images).map_err(|e| e.to_string())?;
    let acc =
        |pred: &[usize]| pred.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64 * 100.0;
    let (fp, ip) = (argmax_rows(&float_logits), argmax_rows(&int8_logits));
    let agree = fp.iter().zip(&ip).filter(|(a, b)| a == b).count();
    println!(
        "held-out accuracy ({} images): f32 {:.1}%, int8 {:.1}%; top-1 agreement {agree}/{}",
        labels.len(),
        acc(&fp),
        acc(&ip),
        labels.len()
    );
    println!("logits SQNR, int8 vs f32: {:.1} dB", qnn::sqnr_db(&float_logits, &int8_logits));

    let f32_bytes: usize = qnn::parameter_shapes(&reference).iter().map(|(_, s)| s.iter().product::<usize>() * 4).sum();
    let int8_bytes: usize = qnn::parameter_shapes(&reference)
        .iter()
        .map(|(n, s)| {
            if n.ends_with(".weight") && s.len() > 1 {
                s.iter().product::<usize>() + s[0] * 4
            } else {
                s.iter().product::<usize>() * 4
            }
        })
        .sum();
    println!(
        "parameters: f32 {f32_bytes} bytes, int8 {int8_bytes} bytes ({:.0}%)",
        100.0 * int8_bytes as f64 / f32_bytes as f64
    );

    let one = images.index_axis(Axis(0), 0).insert_axis(Axis(0)).to_owned();
    let f_us = median_us(|| {
        std::hint::black_box(reference.forward(&one).unwrap());
    });
    let q_us = median_us(|| {
        std::hint::black_box(q.forward(&one).unwrap());
    });
    println!("latency, one image, median of 201: f32 {f_us:.1} us, int8 {q_us:.1} us\n");

    println!("{:<10} {:<18} {:<12} {:>14} {:>16}", "module", "type", "runs as", "output SQNR dB", "weight SQNR dB");
    let report = q.report(&reference, &images).map_err(|e| e.to_string())?;
    if let Some(dir) = plots {
        let rows: Vec<_> = report.iter().map(|r| (r.name.clone(), r.sqnr_db, r.weight_sqnr_db)).collect();
        pictures.push(("sqnr.svg".into(), qnn::plots::sqnr_chart(&rows)));
        qnn::plots::write_files(dir, &pictures).map_err(|e| e.to_string())?;
        println!("wrote {} SVG pictures to {}\n", pictures.len(), dir.display());
    }
    if let Some(path) = report_json {
        std::fs::write(path, qnn::report_json(&report)).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    for r in &report {
        let mode = match &r.mode {
            Mode::Int8 => "int8".to_string(),
            Mode::Int8SameParams => "int8 (same q)".to_string(),
            Mode::Passthrough => "fused away".to_string(),
            Mode::Float(why) => format!("float: {why}"),
            Mode::Dynamic => "dynamic".to_string(),
        };
        let db = |v: Option<f64>| v.map_or("-".into(), |s| format!("{s:.1}"));
        println!("{:<10} {:<18} {:<12} {:>14} {:>16}", r.name, r.kind, mode, db(r.sqnr_db), db(r.weight_sqnr_db));
    }
    if let Ok(Value::U8 { q: out_q, .. }) = q.forward_value(&one) {
        println!("\nlogits are int8 with scale {:.6}, zero point {}", out_q.scale, out_q.zero_point);
    }
    Ok(())
}
