//! Whole models in `cargo xtask bench`: ours and, with `--peers`, PyTorch and ONNX Runtime on
//! the same weights and inputs, alternated over several rounds.
//!
//! The weights (random, seeded, with non-zero biases and batch-norm statistics as a trained
//! model has) and the inputs are written once to `target/bench-models/` as safetensors; the
//! peer scripts (`scripts/peers/{torch,ort}_models.py`, protocol in `peer_server.py`) load
//! the same files, quantize the same model on the same calibration images, and then wait for
//! timing requests. Each round times every configuration (model x batch x threads) on our
//! side and then on each peer's; a record keeps the median of the rounds' times and, per
//! peer, the median and the range of the rounds' ratios, so one noisy minute cannot decide a
//! ratio.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ndarray::{ArrayD, Axis};
use serde_json::Value as J;

use crate::bench::{find_python_with, median_ms, randn, PeerRecord, Record};

/// A model of the bench: name, constructor, GMAC per image at 224x224 (torchvision's
/// figures for the two graph models).
type Entry = (&'static str, fn(usize) -> qnn::Graph, f64);

const MODELS: [Entry; 5] = [
    ("resnet18", |c| qnn::zoo::resnet18(c).into(), 1.814),
    ("mobilenet_v2", |c| qnn::zoo::mobilenet_v2(c).into(), 0.301),
    ("resnet50", |c| qnn::zoo::resnet50(c).into(), 4.089),
    ("mobilenet_v3_large", qnn::zoo::mobilenet_v3_large, 0.217),
    ("efficientnet_b0", qnn::zoo::efficientnet_b0, 0.386),
];

/// Models the bench only imports from ONNX (no Rust twin in the zoo): name, GMAC per image
/// (torchvision's figures). ONNX Runtime's peer builds them with random weights of a trained
/// model's kind.
const ONNX_ONLY: [(&str, f64); 3] = [("shufflenet_v2_x1_0", 0.146), ("convnext_tiny", 4.456), ("vit_b_16", 17.564)];

/// Calibration images (one per batch, for us and the peers alike).
const CALIBRATION_IMAGES: u64 = 64;
/// Images the int8 SQNR is measured over (`xq`), on every side.
const SQNR_IMAGES: usize = 16;

/// Pause after a peer's timing before ours: its idle worker threads spin for a while before
/// they sleep, and would take our second core.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// One peer script running as a timing server.
pub(crate) struct PeerServer {
    pub(crate) who: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
    /// Per model: `{"sqnr_db", "f32_ms", "quantize_ms"}`.
    ready: J,
}

impl PeerServer {
    pub(crate) fn start(
        py: &str,
        script: &Path,
        who: &'static str,
        dir: &Path,
        models: &[&str],
    ) -> Result<Self, String> {
        let log = dir.join(format!("{who}.log"));
        let err = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut child = Command::new(py)
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .args(["--models", &models.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("running {py} {}: {e}", script.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Ok(PeerServer { who, child, stdin, stdout, log, ready: J::Null })
    }

    fn read_line(&mut self) -> Result<J, String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        serde_json::from_str(&line)
            .map_err(|_| format!("{} stopped answering; its log is {}", self.who, self.log.display()))
    }

    pub(crate) fn wait_ready(&mut self) -> Result<(), String> {
        self.ready = self.read_line()?["ready"].clone();
        Ok(())
    }

    pub(crate) fn time(&mut self, model: &str, threads: usize, batch: usize) -> Result<f64, String> {
        let req = serde_json::json!({"model": model, "threads": threads, "batch": batch});
        let stdin = self.stdin.as_mut().expect("open until drop");
        writeln!(stdin, "{req}").and_then(|()| stdin.flush()).map_err(|e| format!("{}: {e}", self.who))?;
        let reply = self.read_line()?;
        reply["int8_ms"].as_f64().ok_or_else(|| format!("{}: no int8_ms in {reply}", self.who))
    }

    /// Has the peer run the ONNX model at `model` on input `input` of the inputs file and
    /// write its first output to `out` (a TensorProto file).
    fn run_file(&mut self, model: &Path, input: &str, out: &Path) -> Result<(), String> {
        let req = serde_json::json!({"run_file": model, "input": input, "out": out});
        let stdin = self.stdin.as_mut().expect("open until drop");
        writeln!(stdin, "{req}").and_then(|()| stdin.flush()).map_err(|e| format!("{}: {e}", self.who))?;
        let reply = self.read_line()?;
        match reply["error"].as_str() {
            Some(e) => Err(format!("{} could not run {}: {e}", self.who, model.display())),
            None => Ok(()),
        }
    }

    pub(crate) fn ready_of(&self, model: &str, key: &str) -> Option<f64> {
        self.ready[model][key].as_f64()
    }

    /// Whether the peer runs `model` in int8 (PyTorch's eager mode has no quantizable
    /// EfficientNet).
    fn has_int8(&self, model: &str) -> bool {
        self.ready[model]["int8"] != false
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Writes `tensors` as a safetensors file.
pub(crate) fn write_tensors(path: &Path, tensors: &[(&str, &ArrayD<f32>)]) -> Result<(), String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.shape().to_vec(), t.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n, v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Per-round medians of one configuration.
#[derive(Default)]
struct Series {
    ours: Vec<f64>,
    /// Per peer, in `peers` order.
    peers: Vec<Vec<f64>>,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The options of the model bench.
pub struct Options<'a> {
    pub threads: &'a [usize],
    pub batches: &'a [usize],
    pub rounds: usize,
    pub peers: bool,
    /// Whether ONNX Runtime's peer runs (it cannot be capped to a lower tier).
    pub onnxruntime: bool,
    /// Our models' configuration.
    pub qconfig: &'a qobserve::QConfig,
    /// How the zoo models' weights are drawn.
    pub weights: qnn::zoo::WeightInit,
    pub filter: Option<&'a str>,
    pub peak_int8_gmacs: Option<f64>,
}

/// Runs the model bench; appends records.
pub fn run(root: &Path, o: &Options<'_>, records: &mut Vec<Record>) -> Result<(), String> {
    use qnn::Module;
    let models: Vec<Entry> =
        MODELS.into_iter().filter(|(n, _, _)| o.filter.is_none_or(|f| n.contains(f) || "models".contains(f))).collect();
    let onnx_only: Vec<(&'static str, f64)> = ONNX_ONLY
        .into_iter()
        .filter(|(n, _)| o.filter.is_none_or(|f| n.contains(f) || "models onnx".contains(f)))
        .collect();
    if models.is_empty() && onnx_only.is_empty() {
        return Ok(());
    }
    let dir = root.join("target/bench-models");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let calib: Vec<ArrayD<f32>> = (0..CALIBRATION_IMAGES).map(|i| randn(200 + i, &[1, 3, 224, 224])).collect();
    let calib_all = ndarray::concatenate(Axis(0), &calib.iter().map(ArrayD::view).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;
    let inputs: Vec<(usize, ArrayD<f32>)> =
        o.batches.iter().map(|&b| (b, randn(7 + b as u64, &[b, 3, 224, 224]))).collect();
    let x1 = inputs.iter().find(|(b, _)| *b == 1).map_or_else(|| randn(8, &[1, 3, 224, 224]), |(_, x)| x.clone());
    // The accuracy images: every side's int8 SQNR is over their outputs (one image's is too
    // noisy to rank observers or peers by tenths of a dB).
    let xq = randn(300, &[SQNR_IMAGES, 3, 224, 224]);
    let mut files: Vec<(String, &ArrayD<f32>)> =
        vec![("calib".into(), &calib_all), ("x1".into(), &x1), ("xq".into(), &xq)];
    files.extend(inputs.iter().filter(|(b, _)| *b != 1).map(|(b, x)| (format!("x{b}"), x)));
    write_tensors(&dir.join("inputs.safetensors"), &files.iter().map(|(n, t)| (n.as_str(), *t)).collect::<Vec<_>>())?;

    // Our models: weights written for the peers, float time, int8 conversion, SQNR.
    struct Ours {
        name: &'static str,
        gmac: f64,
        f32_ms: f64,
        /// Fuse, prepare, calibrate and convert, one thread.
        quantize_ms: f64,
        sqnr: f64,
        q: qnn::QuantizedModel,
    }
    let mut ours = Vec::new();
    for (name, ctor, gmac) in models {
        let mut model = ctor(1000);
        qnn::zoo::randomize_with(&mut model, 11, o.weights);
        qnn::save_safetensors(&model, dir.join(format!("{name}.safetensors"))).map_err(|e| e.to_string())?;
        // The whole quantization of a fresh copy, timed as a user waits for it: fuse,
        // prepare, calibrate on the images one at a time, convert.
        let mut fresh = ctor(1000);
        qnn::zoo::randomize_with(&mut fresh, 11, o.weights);
        let t0 = std::time::Instant::now();
        let mut p = qnn::prepare(fresh, &qnn::QConfigMapping::new(o.qconfig.clone())).map_err(|e| e.to_string())?;
        for img in &calib {
            p.calibrate(img).map_err(|e| e.to_string())?;
        }
        let q = p.convert().map_err(|e| e.to_string())?;
        let quantize_ms = t0.elapsed().as_secs_f64() * 1e3;
        qnn::fuse_graph(&mut model).map_err(|e| e.to_string())?;
        let f32_ms = median_ms(5, || {
            std::hint::black_box(model.forward(&x1).expect("float forward"));
        });
        let reference = model.forward(&xq).map_err(|e| e.to_string())?;
        let sqnr = qnn::sqnr_db(&reference, &q.forward(&xq).map_err(|e| e.to_string())?);
        ours.push(Ours { name, gmac, f32_ms, quantize_ms, sqnr, q });
    }
    let names: Vec<&str> = ours.iter().map(|m| m.name).collect();

    // ONNX Runtime's peer exports each model to `<name>.onnx`; files of an earlier run must
    // not stand in for this run's.
    let ort_names: Vec<&str> = names.iter().copied().chain(onnx_only.iter().map(|m| m.0)).collect();
    for m in &ort_names {
        for suffix in [".onnx", ".ort_f32.pb", ".ort_int8.pb"] {
            let _ = std::fs::remove_file(dir.join(format!("{m}{suffix}")));
        }
    }

    // The peers build their models side by side (nothing is timed meanwhile).
    let mut peers: Vec<PeerServer> = Vec::new();
    let scripts = [
        ("pytorch", "torch_models.py", "torch, torchvision, safetensors"),
        ("onnxruntime", "ort_models.py", "torch, torchvision, onnx, onnxruntime, safetensors"),
    ];
    for (who, script, modules) in
        scripts.into_iter().filter(|(who, _, _)| o.peers && (o.onnxruntime || *who != "onnxruntime"))
    {
        let Some(py) = find_python_with(modules) else {
            eprintln!(
                "--peers: no Python with {modules} found for {who}; get one with\n  \
                 python3 -m venv ~/qrust-venv && ~/qrust-venv/bin/pip install {} numpy\n  \
                 QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --peers",
                modules.replace(',', "")
            );
            continue;
        };
        // The models only imported from ONNX are ONNX Runtime's alone.
        let list = if who == "onnxruntime" { &ort_names } else { &names };
        if !list.is_empty() {
            peers.push(PeerServer::start(&py, &root.join("scripts/peers").join(script), who, &dir, list)?);
        }
    }
    if !peers.is_empty() {
        eprintln!("peers are quantizing the same models (logs in {})", dir.display());
    }
    let mut started = Vec::new();
    for mut p in peers {
        match p.wait_ready() {
            Ok(()) => started.push(p),
            Err(e) => eprintln!("--peers: {e}"),
        }
    }
    let mut peers = started;

    // The same models imported from the ONNX files ONNX Runtime's peer exported and
    // quantized (qonnx), calibrated on the same images as ours.
    let ort = peers.iter().position(|p| p.who == "onnxruntime");
    let mut imported: Vec<Imported> = Vec::new();
    if let Some(ort) = ort {
        let all = ours.iter().enumerate().map(|(m, om)| (om.name, om.gmac, Some(m)));
        for (name, gmac, rust) in all.chain(onnx_only.iter().map(|&(n, g)| (n, g, None))) {
            let mut im = import_onnx(&dir, (name, gmac, rust), (&calib, o.qconfig), &xq)?;
            im.qdq = qdq_agreement(&dir, name, &im.q, &xq, &mut peers[ort])?;
            imported.push(im);
        }
    } else {
        eprintln!(
            "onnx_<model> rows skipped: they import the ONNX files ONNX Runtime's peer exports (run with --peers, \
             without --isa below avx512vnni, and a Python with torch, torchvision, onnx and onnxruntime)"
        );
    }

    // Rounds: every configuration, ours then each peer's.
    let configs: Vec<(usize, usize, usize)> = (0..ours.len())
        .flat_map(|m| o.batches.iter().flat_map(move |&b| o.threads.iter().map(move |&t| (m, b, t))))
        .collect();
    let mut series: Vec<Series> =
        configs.iter().map(|_| Series { ours: Vec::new(), peers: vec![Vec::new(); peers.len()] }).collect();
    let rounds = if peers.is_empty() { 1 } else { o.rounds.max(1) };
    for round in 0..rounds {
        eprintln!("models: round {} of {rounds}", round + 1);
        for (&(m, b, t), s) in configs.iter().zip(&mut series) {
            let x = &inputs.iter().find(|(bb, _)| *bb == b).expect("an input per batch size").1;
            let q = &mut ours[m].q;
            q.set_threads(t);
            s.ours.push(median_ms(10, || {
                std::hint::black_box(q.forward(x).expect("int8 forward"));
            }));
            if let Some(im) = imported.iter_mut().find(|im| im.rust == Some(m)).filter(|_| (b, t) == (1, 1)) {
                im.q.set_threads(1);
                let q = &im.q;
                im.times.push(median_ms(10, || {
                    std::hint::black_box(q.forward(x).expect("int8 forward"));
                }));
            }
            for (p, times) in peers.iter_mut().zip(&mut s.peers).filter(|(p, _)| p.has_int8(ours[m].name)) {
                times.push(p.time(ours[m].name, t, b)?);
                std::thread::sleep(SETTLE);
            }
        }
        // The models only imported from ONNX: ours, then ONNX Runtime's, one thread, batch 1.
        let x1 = &inputs.iter().find(|(b, _)| *b == 1).map(|(_, x)| x);
        for im in imported.iter_mut().filter(|im| im.rust.is_none()) {
            let (Some(x), Some(ort)) = (x1, ort) else { break };
            im.q.set_threads(1);
            let q = &im.q;
            im.times.push(median_ms(10, || {
                std::hint::black_box(q.forward(x).expect("int8 forward"));
            }));
            im.ort_times.push(peers[ort].time(im.name, 1, 1)?);
            std::thread::sleep(SETTLE);
        }
    }
    // The imported twins of our models were timed beside them: ONNX Runtime's and the Rust
    // model's times of the same rounds.
    for im in &mut imported {
        if let (Some(m), Some(ort)) = (im.rust, ort) {
            if let Some((_, s)) = configs.iter().zip(&series).find(|(&c, _)| c == (m, 1, 1)) {
                im.ort_times = s.peers[ort].clone();
                im.rust_times = s.ours.clone();
            }
        }
    }

    println!(
        "\nmodels, 3x224x224, same weights and inputs for every side; int8 medians of {rounds} round(s), \
         ratios ours/peer as the median [range] of the rounds' ratios"
    );
    let peer_cols: String =
        peers.iter().map(|p| format!(" {:>11} {:>19}", format!("{} ms", short(p.who)), "ours/peer")).collect();
    println!(
        "{:<14} {:>5} {:>7} {:>9} {:>8} {:>7} {:>9}{peer_cols}",
        "model", "batch", "threads", "int8 ms", "img/s", "% peak", "speed-up"
    );
    for (&(m, b, t), s) in configs.iter().zip(&series) {
        let om = &ours[m];
        let ms = median(&s.ours);
        let gmacs = om.gmac * b as f64 * 1e3 / ms;
        let pct = o.peak_int8_gmacs.map(|p| 100.0 * gmacs / (p * t as f64));
        let one_thread = configs.iter().zip(&series).find(|(&(m1, b1, t1), _)| (m1, b1, t1) == (m, b, 1));
        let speedup = (t > 1).then_some(one_thread).flatten().map(|(_, s1)| median(&s1.ours) / ms);
        let mut peer_records = Vec::new();
        let mut cols = String::new();
        for (p, times) in peers.iter().zip(&s.peers) {
            if times.is_empty() {
                cols += &format!(" {:>11} {:>19}", "-", "-");
                continue;
            }
            let ratios: Vec<f64> = s.ours.iter().zip(times).map(|(a, b)| a / b).collect();
            let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
            let pm = median(times);
            let ratio = median(&ratios);
            cols += &format!(" {:>11.2} {:>19}", pm, format!("{ratio:.2} [{lo:.2}-{hi:.2}]"));
            peer_records.push(PeerRecord {
                peer: p.who,
                peer_median_ms: pm,
                ratio_vs_peer: ratio,
                ratio_spread: Some([lo, hi]),
                images_per_s: Some(b as f64 * 1e3 / pm),
                sqnr_db: if b == 1 && t == 1 { p.ready_of(om.name, "sqnr_db") } else { None },
            });
        }
        println!(
            "{:<14} {:>5} {:>7} {:>9.2} {:>8.1} {:>7} {:>9}{cols}",
            om.name,
            b,
            t,
            ms,
            b as f64 * 1e3 / ms,
            pct.map_or("-".into(), |p| format!("{p:.0}%")),
            speedup.map_or("-".into(), |s| format!("{s:.2}x")),
        );
        let faster = peer_records.iter().min_by(|a, b| a.peer_median_ms.total_cmp(&b.peer_median_ms));
        records.push(Record {
            name: if b == 1 { format!("model_{}", om.name) } else { format!("model_{}_b{b}", om.name) },
            kind: "model",
            dtype: "int8",
            threads: t,
            batch: Some(b),
            median_ms: ms,
            gmacs_per_s: gmacs,
            pct_of_peak: pct,
            images_per_s: Some(b as f64 * 1e3 / ms),
            speedup_vs_1_thread: speedup,
            sqnr_db: (b == 1 && t == 1).then_some(om.sqnr),
            peer: faster.map(|p| p.peer),
            peer_median_ms: faster.map(|p| p.peer_median_ms),
            ratio_vs_peer: faster.map(|p| p.ratio_vs_peer),
            ratio_spread: faster.and_then(|p| p.ratio_spread),
            peers: peer_records,
            ..Record::default()
        });
    }
    if let Some(ort) = ort {
        onnx_rows(&imported, &peers[ort], o.peak_int8_gmacs, records);
    }
    println!("\nfloat (1 thread, batch 1) and int8 accuracy (int8 output vs the same side's f32, SQNR over {SQNR_IMAGES} images)");
    let peer_cols: String = peers
        .iter()
        .map(|p| format!(" {:>14} {:>14}", format!("{} f32 ms", short(p.who)), format!("{} SQNR", short(p.who))))
        .collect();
    println!("{:<14} {:>9} {:>9}{peer_cols}", "model", "f32 ms", "SQNR dB");
    for om in &ours {
        let mut cols = String::new();
        let mut peer_records = Vec::new();
        for p in &peers {
            let (pf, ps) = (p.ready_of(om.name, "f32_ms"), p.ready_of(om.name, "sqnr_db"));
            let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
            cols += &format!(" {:>14} {:>14}", opt(pf), opt(ps));
            if let Some(pf) = pf {
                peer_records.push(PeerRecord {
                    peer: p.who,
                    peer_median_ms: pf,
                    ratio_vs_peer: om.f32_ms / pf,
                    ratio_spread: None,
                    images_per_s: None,
                    sqnr_db: None,
                });
            }
        }
        println!("{:<14} {:>9.2} {:>9.1}{cols}", om.name, om.f32_ms, om.sqnr);
        let faster = peer_records.iter().min_by(|a, b| a.peer_median_ms.total_cmp(&b.peer_median_ms));
        records.push(Record {
            name: format!("model_{}", om.name),
            kind: "model",
            dtype: "f32",
            threads: 1,
            batch: Some(1),
            median_ms: om.f32_ms,
            gmacs_per_s: om.gmac * 1e3 / om.f32_ms,
            pct_of_peak: None,
            images_per_s: Some(1e3 / om.f32_ms),
            speedup_vs_1_thread: None,
            sqnr_db: None,
            peer: faster.map(|p| p.peer),
            peer_median_ms: faster.map(|p| p.peer_median_ms),
            ratio_vs_peer: faster.map(|p| p.ratio_vs_peer),
            ratio_spread: None,
            peers: peer_records,
            ..Record::default()
        });
    }
    println!(
        "\nquantizing a whole model, 1 thread: fuse, prepare, calibrate {CALIBRATION_IMAGES} images one at a time, \
         convert (ONNX Runtime: quant_pre_process and quantize_static on the exported file)"
    );
    let peer_cols: String = peers.iter().map(|p| format!(" {:>16}", format!("{} ms", short(p.who)))).collect();
    println!("{:<18} {:>10}{peer_cols} {:>16}", "model", "ours ms", "ours/faster peer");
    for om in &ours {
        let times: Vec<Option<f64>> = peers.iter().map(|p| p.ready_of(om.name, "quantize_ms")).collect();
        let cols: String =
            times.iter().map(|t| format!(" {:>16}", t.map_or("-".into(), |v| format!("{v:.0}")))).collect();
        let peer_records: Vec<PeerRecord> = peers
            .iter()
            .zip(&times)
            .filter_map(|(p, t)| {
                t.map(|pt| PeerRecord {
                    peer: p.who,
                    peer_median_ms: pt,
                    ratio_vs_peer: om.quantize_ms / pt,
                    ratio_spread: None,
                    images_per_s: None,
                    sqnr_db: None,
                })
            })
            .collect();
        let faster = peer_records.iter().min_by(|a, b| a.peer_median_ms.total_cmp(&b.peer_median_ms));
        println!(
            "{:<18} {:>10.0}{cols} {:>16}",
            om.name,
            om.quantize_ms,
            faster.map_or("-".into(), |f| format!("{:.2}", f.ratio_vs_peer))
        );
        records.push(Record {
            name: format!("quantize_{}", om.name),
            kind: "quantize",
            dtype: "int8",
            threads: 1,
            batch: Some(1),
            median_ms: om.quantize_ms,
            peer: faster.map(|p| p.peer),
            peer_median_ms: faster.map(|p| p.peer_median_ms),
            ratio_vs_peer: faster.map(|p| p.ratio_vs_peer),
            peers: peer_records,
            ..Record::default()
        });
    }
    Ok(())
}

/// A model imported from ONNX Runtime's export of it, converted to int8, with its round times.
struct Imported {
    name: &'static str,
    gmac: f64,
    /// Its twin among our Rust-built models.
    rust: Option<usize>,
    q: qnn::QuantizedModel,
    /// int8 against our float import of the same file, over the SQNR images.
    sqnr: f64,
    /// Our float import against ONNX Runtime's fp32 output on the same images.
    float_rel_err: Option<f64>,
    times: Vec<f64>,
    /// ONNX Runtime's times of its int8 model of the same file, and the Rust twin's, in the
    /// same rounds.
    ort_times: Vec<f64>,
    rust_times: Vec<f64>,
    /// ONNX Runtime running our QDQ export: the share of outputs identical to ours and the
    /// largest difference in output steps.
    qdq: Option<(f64, f64)>,
}

/// Imports `<name>.onnx`, checks its float outputs against ONNX Runtime's, and converts it to
/// int8 with our default configuration on the calibration images.
fn import_onnx(
    dir: &Path,
    (name, gmac, rust): (&'static str, f64, Option<usize>),
    (calib, qconfig): (&[ArrayD<f32>], &qobserve::QConfig),
    xq: &ArrayD<f32>,
) -> Result<Imported, String> {
    let path = dir.join(format!("{name}.onnx"));
    let m = qonnx::load(&path, &qonnx::ImportOptions::default()).map_err(|e| e.to_string())?;
    let reference = m.graph.run(std::slice::from_ref(xq)).map_err(|e| e.to_string())?.remove(0);
    let float_rel_err = rel_err_to_pb(&dir.join(format!("{name}.ort_f32.pb")), &reference);
    let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qconfig.clone())).map_err(|e| e.to_string())?;
    for img in calib {
        p.calibrate(img).map_err(|e| e.to_string())?;
    }
    let q = p.convert().map_err(|e| e.to_string())?;
    let sqnr = qnn::sqnr_db(&reference, &q.forward(xq).map_err(|e| e.to_string())?);
    Ok(Imported {
        name,
        gmac,
        rust,
        q,
        sqnr,
        float_rel_err,
        times: Vec::new(),
        ort_times: Vec::new(),
        rust_times: Vec::new(),
        qdq: None,
    })
}

/// `ours` against the tensor in the TensorProto file `path` (ONNX Runtime's output): the
/// largest difference over the largest value; `None` when the file is missing or unreadable,
/// or holds another shape.
pub(crate) fn rel_err_to_pb(path: &Path, ours: &ArrayD<f32>) -> Option<f64> {
    let theirs = qonnx::tensor::read_pb(path).ok().filter(|t| t.shape() == ours.shape())?;
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let diff = theirs.iter().zip(ours).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Some(f64::from(diff / scale))
}

/// Our int8 model exported as ONNX QDQ and run by ONNX Runtime on the SQNR images: the share
/// of its outputs identical to ours, and the largest difference in steps of the output scale.
fn qdq_agreement(
    dir: &Path,
    name: &str,
    q: &qnn::QuantizedModel,
    xq: &ArrayD<f32>,
    ort: &mut PeerServer,
) -> Result<Option<(f64, f64)>, String> {
    let path = dir.join(format!("{name}.qrust_qdq.onnx"));
    let out = dir.join(format!("{name}.qrust_qdq_out.pb"));
    let _ = std::fs::remove_file(&out);
    qonnx::save_qdq(q, &[xq.shape().to_vec()], &path).map_err(|e| e.to_string())?;
    ort.run_file(&path, "xq", &out)?;
    let theirs = qonnx::tensor::read_pb(&out).map_err(|e| e.to_string())?;
    let ours = q.forward(xq).map_err(|e| e.to_string())?;
    if theirs.shape() != ours.shape() {
        return Err(format!(
            "{name}: ONNX Runtime's output of our QDQ export is {:?}, ours {:?}",
            theirs.shape(),
            ours.shape()
        ));
    }
    let step = q.output_quants().last().map_or(1.0, |(_, p)| f64::from(p.scale));
    let same = theirs.iter().zip(&ours).filter(|(a, b)| a == b).count() as f64 / ours.len() as f64;
    let worst = theirs.iter().zip(&ours).fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs()))) / step;
    Ok(Some((same, worst)))
}

/// Prints and records the `onnx_<model>` rows: one thread, batch 1, against ONNX Runtime's
/// int8 of the same file and against the model built in Rust (timed in the same rounds).
fn onnx_rows(imported: &[Imported], ort: &PeerServer, peak: Option<f64>, records: &mut Vec<Record>) {
    println!(
        "\nmodels imported from ONNX Runtime's ONNX export (qonnx), 1 thread, batch 1: against ONNX Runtime's int8 of \
         the same file and the same model built in Rust; SQNR of each side's int8 against its own float"
    );
    println!(
        "{:<26} {:>9} {:>16} {:>9} {:>19} {:>9} {:>9} {:>11} {:>22}",
        "model",
        "int8 ms",
        "/ built in Rust",
        "ort ms",
        "ours/ort",
        "SQNR dB",
        "ort SQNR",
        "float err",
        "our QDQ in ort: same"
    );
    for im in imported.iter().filter(|im| !im.times.is_empty() && im.ort_times.len() == im.times.len()) {
        let ms = median(&im.times);
        let ratios: Vec<f64> = im.times.iter().zip(&im.ort_times).map(|(a, b)| a / b).collect();
        let vs_rust: Vec<f64> = im.times.iter().zip(&im.rust_times).map(|(a, b)| a / b).collect();
        let vs_rust = (!vs_rust.is_empty()).then(|| median(&vs_rust));
        let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
        let (ratio, pm) = (median(&ratios), median(&im.ort_times));
        let ort_sqnr = ort.ready_of(im.name, "sqnr_db");
        println!(
            "{:<26} {:>9.2} {:>16} {:>9.2} {:>19} {:>9.2} {:>9} {:>11} {:>22}",
            format!("onnx_{}", im.name),
            ms,
            vs_rust.map_or("-".into(), |v| format!("{v:.3}")),
            pm,
            format!("{ratio:.2} [{lo:.2}-{hi:.2}]"),
            im.sqnr,
            ort_sqnr.map_or("-".into(), |v| format!("{v:.2}")),
            im.float_rel_err.map_or("-".into(), |v| format!("{v:.1e}")),
            im.qdq.map_or("-".into(), |(same, worst)| format!("{:.1}%, max {worst:.0} steps", same * 100.0)),
        );
        let gmacs = im.gmac * 1e3 / ms;
        records.push(Record {
            name: format!("onnx_{}", im.name),
            kind: "model",
            dtype: "int8",
            threads: 1,
            batch: Some(1),
            median_ms: ms,
            gmacs_per_s: gmacs,
            pct_of_peak: peak.map(|p| 100.0 * gmacs / p),
            images_per_s: Some(1e3 / ms),
            sqnr_db: Some(im.sqnr),
            peer: Some(ort.who),
            peer_median_ms: Some(pm),
            ratio_vs_peer: Some(ratio),
            ratio_spread: Some([lo, hi]),
            peer_sqnr_db: ort_sqnr,
            ratio_vs_rust_model: vs_rust,
            float_rel_err: im.float_rel_err,
            qdq_identical_share: im.qdq.map(|q| q.0),
            qdq_max_steps: im.qdq.map(|q| q.1),
            peers: vec![PeerRecord {
                peer: ort.who,
                peer_median_ms: pm,
                ratio_vs_peer: ratio,
                ratio_spread: Some([lo, hi]),
                images_per_s: Some(1e3 / pm),
                sqnr_db: ort_sqnr,
            }],
            ..Record::default()
        });
    }
}

pub(crate) fn short(who: &str) -> &str {
    match who {
        "pytorch" => "torch",
        "onnxruntime" => "ort",
        other => other,
    }
}
