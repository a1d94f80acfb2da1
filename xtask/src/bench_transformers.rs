//! Transformers in `cargo xtask bench` (`--filter transformers`, with `--peers`): ViT-B/16
//! imported from ONNX and quantized two ways, static int8 (our default configuration) and
//! dynamic per token, against PyTorch's `quantize_dynamic` and ONNX Runtime's
//! `quantize_dynamic` and `quantize_static` of the same model, timed alternately over rounds
//! as the CNNs are.
//!
//! The model exists only as the file the peer script exports
//! (`scripts/peers/transformer_models.py`: torchvision's architecture with random weights of a
//! trained model's kind), so without a Python that has the peers' packages these rows are
//! skipped. BERT-base is not benchmarked: qonnx does not import it yet.

use std::path::Path;

use ndarray::{ArrayD, Axis};

use crate::bench::{find_python_with, median_ms, randn, PeerRecord, Record};
use crate::bench_models::{median, write_tensors, Options, PeerServer};

/// Models: name, GMAC per image (torchvision's figure).
const MODELS: [(&str, f64); 1] = [("vit_b_16", 17.564)];

/// The peers' quantizations, as the peer script names them.
const FLAVOURS: [&str; 3] = ["pytorch_dynamic", "onnxruntime_dynamic", "onnxruntime_static"];

/// Our quantizations: the record's suffix, what the table calls it, the configuration.
fn configs() -> [(&'static str, &'static str, qobserve::QConfig); 2] {
    [
        ("", "static int8 (default)", qobserve::QConfig::default()),
        ("_dynamic", "dynamic per token", qobserve::QConfig::dynamic_per_token()),
    ]
}

/// Calibration images (for our static configuration and ONNX Runtime's alike).
const CALIBRATION_IMAGES: u64 = 16;
/// Images the SQNR is measured over.
const SQNR_IMAGES: usize = 4;

/// Whether `filter` selects the transformer rows.
pub fn selected(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| "transformers".contains(f) || MODELS.iter().any(|(n, _)| n.contains(f)))
}

/// Runs the transformer bench; appends records.
pub fn run(root: &Path, o: &Options<'_>, records: &mut Vec<Record>) -> Result<(), String> {
    if !selected(o.filter) {
        return Ok(());
    }
    let modules = "torch, torchvision, onnx, onnxruntime, safetensors";
    let py = match (o.peers && o.onnxruntime).then(|| find_python_with(modules)).flatten() {
        Some(py) => py,
        None => {
            println!(
                "\ntransformer rows skipped: ViT-B/16 is the ONNX file the peer script exports; run with --peers \
                 (without --isa below this CPU's best tier) and a Python with {modules}"
            );
            return Ok(());
        }
    };
    let dir = root.join("target/bench-transformers");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let calib: Vec<ArrayD<f32>> = (0..CALIBRATION_IMAGES).map(|i| randn(500 + i, &[1, 3, 224, 224])).collect();
    let calib_all = ndarray::concatenate(Axis(0), &calib.iter().map(ArrayD::view).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;
    let x1 = randn(8, &[1, 3, 224, 224]);
    let xq = randn(600, &[SQNR_IMAGES, 3, 224, 224]);
    write_tensors(&dir.join("inputs.safetensors"), &[("calib", &calib_all), ("x1", &x1), ("xq", &xq)])?;
    for (m, _) in MODELS {
        for suffix in [".onnx", ".ort_f32.pb"] {
            let _ = std::fs::remove_file(dir.join(format!("{m}{suffix}")));
        }
    }
    let served: Vec<String> =
        MODELS.iter().flat_map(|(m, _)| FLAVOURS.iter().map(move |f| format!("{m}/{f}"))).collect();
    let served_refs: Vec<&str> = served.iter().map(String::as_str).collect();
    eprintln!("transformers: the peers are exporting and quantizing (log in {})", dir.display());
    let mut peer =
        PeerServer::start(&py, &root.join("scripts/peers/transformer_models.py"), "transformers", &dir, &served_refs)?;
    peer.wait_ready()?;

    // Ours: each model imported from the peer's export, in each configuration.
    struct Ours {
        model: usize,
        suffix: &'static str,
        what: &'static str,
        q: qnn::QuantizedModel,
        sqnr: f64,
        float_rel_err: Option<f64>,
    }
    let mut ours = Vec::new();
    for (m, (name, _)) in MODELS.iter().enumerate() {
        let path = dir.join(format!("{name}.onnx"));
        let imported = qonnx::load(&path, &qonnx::ImportOptions::default()).map_err(|e| e.to_string())?;
        let reference = imported.graph.run(std::slice::from_ref(&xq)).map_err(|e| e.to_string())?.remove(0);
        let float_rel_err = match qonnx::tensor::read_pb(dir.join(format!("{name}.ort_f32.pb"))) {
            Ok(ort) if ort.shape() == reference.shape() => {
                let scale = ort.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
                let diff = ort.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                Some(f64::from(diff / scale))
            }
            _ => None,
        };
        for (suffix, what, qconfig) in configs() {
            // A fresh import per configuration (a graph is consumed by preparing it).
            let graph = qonnx::load(&path, &qonnx::ImportOptions::default()).map_err(|e| e.to_string())?.graph;
            let mut p =
                qnn::prepare(graph, &qnn::QConfigMapping::new(qconfig)).map_err(|e| format!("{name}{suffix}: {e}"))?;
            for img in &calib {
                p.calibrate(img).map_err(|e| format!("{name}{suffix}: {e}"))?;
            }
            let q = p.convert().map_err(|e| format!("{name}{suffix}: {e}"))?;
            let sqnr = qnn::sqnr_db(&reference, &q.forward(&xq).map_err(|e| e.to_string())?);
            ours.push(Ours { model: m, suffix, what, q, sqnr, float_rel_err });
        }
    }

    // Rounds: at each thread count, ours in every configuration, then each peer flavour.
    let rounds = o.rounds.max(1);
    // [ours config][threads] -> times; [model][flavour][threads] -> times.
    let mut our_times = vec![vec![Vec::new(); o.threads.len()]; ours.len()];
    let mut peer_times = vec![vec![vec![Vec::new(); o.threads.len()]; FLAVOURS.len()]; MODELS.len()];
    for round in 0..rounds {
        eprintln!("transformers: round {} of {rounds}", round + 1);
        for (ti, &t) in o.threads.iter().enumerate() {
            for (c, om) in ours.iter_mut().enumerate() {
                om.q.set_threads(t);
                let q = &om.q;
                our_times[c][ti].push(median_ms(5, || {
                    std::hint::black_box(q.forward(&x1).expect("int8 forward"));
                }));
            }
            for (m, (name, _)) in MODELS.iter().enumerate() {
                for (f, flavour) in FLAVOURS.iter().enumerate() {
                    peer_times[m][f][ti].push(peer.time(&format!("{name}/{flavour}"), t, 1)?);
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
            }
        }
    }

    println!(
        "\ntransformers, 3x224x224, batch 1, same ONNX file and inputs for every side; medians of {rounds} round(s), \
         ratios ours/peer as the median [range] of the rounds' ratios; SQNR of each side's int8 against its own float \
         over {SQNR_IMAGES} images"
    );
    let cols: String = FLAVOURS.iter().map(|f| format!(" {:>34}", format!("{f} ms / SQNR / ours/it"))).collect();
    println!("{:<18} {:<22} {:>7} {:>9} {:>8}{cols}", "model", "ours", "threads", "ours ms", "SQNR dB");
    for (c, om) in ours.iter().enumerate() {
        let (name, gmac) = MODELS[om.model];
        for (ti, &t) in o.threads.iter().enumerate() {
            let mine = &our_times[c][ti];
            let ms = median(mine);
            let mut peer_records = Vec::new();
            let mut cols = String::new();
            for (f, flavour) in FLAVOURS.iter().enumerate() {
                let theirs = &peer_times[om.model][f][ti];
                let ratios: Vec<f64> = mine.iter().zip(theirs).map(|(a, b)| a / b).collect();
                let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
                let (pm, ratio) = (median(theirs), median(&ratios));
                let sqnr = peer.ready_of(&format!("{name}/{flavour}"), "sqnr_db");
                cols += &format!(
                    " {:>34}",
                    format!(
                        "{pm:.1} / {} / {ratio:.2} [{lo:.2}-{hi:.2}]",
                        sqnr.map_or("-".into(), |s| format!("{s:.2}"))
                    )
                );
                peer_records.push(PeerRecord {
                    peer: flavour,
                    peer_median_ms: pm,
                    ratio_vs_peer: ratio,
                    ratio_spread: Some([lo, hi]),
                    images_per_s: Some(1e3 / pm),
                    sqnr_db: sqnr,
                });
            }
            println!(
                "{:<18} {:<22} {:>7} {:>9.2} {:>8.2}{cols}",
                format!("{name}{}", om.suffix),
                om.what,
                t,
                ms,
                om.sqnr
            );
            let one_thread = o.threads.iter().position(|&t1| t1 == 1).filter(|_| t > 1);
            let faster = peer_records.iter().min_by(|a, b| a.peer_median_ms.total_cmp(&b.peer_median_ms));
            let gmacs = gmac * 1e3 / ms;
            records.push(Record {
                name: format!("{name}{}", om.suffix),
                kind: "transformer",
                dtype: "int8",
                threads: t,
                batch: Some(1),
                median_ms: ms,
                gmacs_per_s: gmacs,
                pct_of_peak: o.peak_int8_gmacs.map(|p| 100.0 * gmacs / (p * t as f64)),
                images_per_s: Some(1e3 / ms),
                speedup_vs_1_thread: one_thread.map(|i| median(&our_times[c][i]) / ms),
                sqnr_db: Some(om.sqnr),
                peer: faster.map(|p| p.peer),
                peer_median_ms: faster.map(|p| p.peer_median_ms),
                ratio_vs_peer: faster.map(|p| p.ratio_vs_peer),
                ratio_spread: faster.and_then(|p| p.ratio_spread),
                peer_sqnr_db: faster.and_then(|p| p.sqnr_db),
                float_rel_err: om.float_rel_err,
                peers: peer_records,
                ..Record::default()
            });
        }
    }
    println!("bert_base_seq128: not benchmarked (qonnx does not import BERT yet)");
    Ok(())
}
