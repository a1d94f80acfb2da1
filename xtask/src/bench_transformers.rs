//! Transformers in `cargo xtask bench` (`--filter transformers`, with `--peers`): ViT-B/16 and
//! BERT-base (sequences of 128 tokens) imported from ONNX and quantized four ways, static int8
//! (our default configuration), static int8 with the residual stream in float
//! ([`qnn::ResidualStream::Float`]), and dynamic per token over 8-bit and 7-bit codes,
//! against PyTorch's `quantize_dynamic`
//! and ONNX Runtime's `quantize_dynamic` and `quantize_static` of the same model, timed
//! alternately over rounds as the CNNs are.
//!
//! The models exist only as the files the peer script exports
//! (`scripts/peers/transformer_models.py`: torchvision's ViT-B/16 and Hugging Face's
//! `BertModel` built from its default configuration, with random weights of a trained model's
//! kind), so without a Python that has the peers' packages these rows are skipped.

use std::path::Path;

use ndarray::{ArrayD, Axis};

use crate::bench::{find_python_with, median_ms, randn, PeerRecord, Record};
use crate::bench_models::{median, rel_err_to_pb, write_tensors, Options, PeerServer};

/// A model of the transformer bench: its name, its multiply-accumulates per item, and its
/// inputs (ONNX name, shape of one item, batch first).
struct Spec {
    name: &'static str,
    gmac: f64,
    inputs: &'static [(&'static str, &'static [usize])],
}

/// BERT-base's sequence length.
const SEQ: usize = 128;

const MODELS: [Spec; 2] = [
    // torchvision's figure.
    Spec { name: "vit_b_16", gmac: 17.564, inputs: &[("x", &[1, 3, 224, 224])] },
    // 12 layers of 4 x 768^2 + 2 x 768 x 3072 per token, and the attention's 2 x 128 x 768 per
    // token; the pooler's 768^2.
    Spec {
        name: "bert_base_seq128",
        gmac: 11.17,
        inputs: &[("input_ids", &[1, SEQ]), ("token_type_ids", &[1, SEQ]), ("attention_mask", &[1, 1, 1, SEQ])],
    },
];

/// `n` items of `model`'s inputs, from `seed`: images from a normal distribution; token ids
/// spread over BERT's vocabulary (whole numbers, as f32), the second half of each sequence of
/// token type 1, and an additive attention mask of zeros (every token attended).
fn items(model: &Spec, n: usize, seed: u64) -> Vec<ArrayD<f32>> {
    model
        .inputs
        .iter()
        .enumerate()
        .map(|(k, (input, shape))| {
            let mut shape = shape.to_vec();
            shape[0] = n;
            let r = || randn(seed + 1000 * k as u64, &shape);
            match *input {
                "input_ids" => r().mapv(|v| (1000.0 + (v.abs() * 7919.0) % 29000.0).floor()),
                "token_type_ids" => ArrayD::from_shape_fn(shape.as_slice(), |i| f32::from(u8::from(i[1] >= SEQ / 2))),
                "attention_mask" => ArrayD::zeros(shape.as_slice()),
                _ => r(),
            }
        })
        .collect()
}

/// The peers' quantizations, as the peer script names them.
const FLAVOURS: [&str; 3] = ["pytorch_dynamic", "onnxruntime_dynamic", "onnxruntime_static"];

/// Our quantizations: the record's suffix, what the table calls it, the configuration.
fn configs() -> [(&'static str, &'static str, qnn::QConfigMapping); 5] {
    use qnn::QConfigMapping as M;
    use qobserve::QConfig;
    [
        ("", "static int8 (default)", M::new(QConfig::default())),
        (
            "_float_residual",
            "static int8, float residual",
            M::new(QConfig::default()).residual(qnn::ResidualStream::Float),
        ),
        // PyTorch's x86 preset: 7-bit activations, whose products sum in 16-bit pairs on
        // CPUs with AVX2 and no VNNI.
        ("_x86", "static int8, x86 preset (7-bit)", M::new(QConfig::pytorch_x86())),
        ("_dynamic", "dynamic per token", M::new(QConfig::dynamic_per_token())),
        ("_dynamic_reduced", "dynamic per token, 7-bit", M::new(QConfig::dynamic_per_token_reduced())),
    ]
}

/// Calibration items (for our static configuration and ONNX Runtime's alike), one at a time.
const CALIBRATION_ITEMS: usize = 16;
/// Items the SQNR is measured over.
const SQNR_ITEMS: usize = 4;

/// Whether `filter` selects the transformer rows.
pub fn selected(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| "transformers".contains(f) || MODELS.iter().any(|m| m.name.contains(f)))
}

/// Runs the transformer bench; appends records.
pub fn run(root: &Path, o: &Options<'_>, records: &mut Vec<Record>) -> Result<(), String> {
    if !selected(o.filter) {
        return Ok(());
    }
    let modules = "torch, torchvision, transformers, onnx, onnxruntime, safetensors";
    let py = match (o.peers && o.onnxruntime).then(|| find_python_with(modules)).flatten() {
        Some(py) => py,
        None => {
            println!(
                "\ntransformer rows skipped: the models are the ONNX files the peer script exports; run with --peers \
                 (without --isa below this CPU's best tier) and a Python with {modules}"
            );
            return Ok(());
        }
    };
    let dir = root.join("target/bench-transformers");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Per model: the calibration items, one timed item, the SQNR items.
    let data: Vec<[Vec<ArrayD<f32>>; 3]> = MODELS
        .iter()
        .enumerate()
        .map(|(m, spec)| {
            let s = 500 * (m as u64 + 1);
            [items(spec, CALIBRATION_ITEMS, s), items(spec, 1, s + 8), items(spec, SQNR_ITEMS, s + 9)]
        })
        .collect();
    let mut files: Vec<(String, &ArrayD<f32>)> = Vec::new();
    for (spec, sets) in MODELS.iter().zip(&data) {
        for (set, xs) in ["calib", "x1", "xq"].iter().zip(sets) {
            for ((input, _), x) in spec.inputs.iter().zip(xs) {
                files.push((format!("{}.{input}.{set}", spec.name), x));
            }
        }
    }
    write_tensors(&dir.join("inputs.safetensors"), &files.iter().map(|(n, t)| (n.as_str(), *t)).collect::<Vec<_>>())?;
    for spec in &MODELS {
        for suffix in [".onnx", ".ort_f32.pb"] {
            let _ = std::fs::remove_file(dir.join(format!("{}{suffix}", spec.name)));
        }
    }
    let served: Vec<String> =
        MODELS.iter().flat_map(|m| FLAVOURS.iter().map(move |f| format!("{}/{f}", m.name))).collect();
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
    for (m, spec) in MODELS.iter().enumerate() {
        let name = spec.name;
        let path = dir.join(format!("{name}.onnx"));
        let opts = qonnx::ImportOptions {
            input_shapes: spec.inputs.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect(),
        };
        let [calib, _, xq] = &data[m];
        let imported = qonnx::load(&path, &opts).map_err(|e| format!("{name}: {e}"))?;
        let reference = imported.graph.run(xq).map_err(|e| format!("{name}: {e}"))?.remove(0);
        let float_rel_err = rel_err_to_pb(&dir.join(format!("{name}.ort_f32.pb")), &reference);
        for (suffix, what, mapping) in configs() {
            // A fresh import per configuration (a graph is consumed by preparing it).
            let graph = qonnx::load(&path, &opts).map_err(|e| e.to_string())?.graph;
            let mut p = qnn::prepare(graph, &mapping).map_err(|e| format!("{name}{suffix}: {e}"))?;
            for i in 0..CALIBRATION_ITEMS {
                let item: Vec<ArrayD<f32>> =
                    calib.iter().map(|x| x.slice_axis(Axis(0), ndarray::Slice::from(i..i + 1)).to_owned()).collect();
                p.calibrate_inputs(&item).map_err(|e| format!("{name}{suffix}: {e}"))?;
            }
            let q = p.convert().map_err(|e| format!("{name}{suffix}: {e}"))?;
            let got = q.forward_inputs(xq).map_err(|e| format!("{name}{suffix}: {e}"))?.remove(0);
            let sqnr = qnn::sqnr_db(&reference, &got);
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
                let (q, x1) = (&om.q, &data[om.model][1]);
                our_times[c][ti].push(median_ms(5, || {
                    std::hint::black_box(q.forward_inputs(x1).expect("int8 forward"));
                }));
            }
            for (m, spec) in MODELS.iter().enumerate() {
                for (f, flavour) in FLAVOURS.iter().enumerate() {
                    peer_times[m][f][ti].push(peer.time(&format!("{}/{flavour}", spec.name), t, 1)?);
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
            }
        }
    }

    println!(
        "\ntransformers (ViT-B/16 at 3x224x224, BERT-base at 128 tokens), batch 1, same ONNX file and inputs for every \
         side; medians of {rounds} round(s), ratios ours/peer as the median [range] of the rounds' ratios; SQNR of \
         each side's int8 (first output) against its own float over {SQNR_ITEMS} items; float err: our float import \
         against ONNX Runtime's fp32 (largest difference over the largest value)"
    );
    let cols: String = FLAVOURS.iter().map(|f| format!(" {:>34}", format!("{f} ms / SQNR / ours/it"))).collect();
    println!(
        "{:<34} {:<24} {:>7} {:>9} {:>8} {:>10}{cols}",
        "model", "ours", "threads", "ours ms", "SQNR dB", "float err"
    );
    for (c, om) in ours.iter().enumerate() {
        let (name, gmac) = (MODELS[om.model].name, MODELS[om.model].gmac);
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
                "{:<34} {:<24} {:>7} {:>9.2} {:>8.2} {:>10}{cols}",
                format!("{name}{}", om.suffix),
                om.what,
                t,
                ms,
                om.sqnr,
                om.float_rel_err.map_or("-".into(), |e| format!("{e:.1e}"))
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
    Ok(())
}
