//! `cargo xtask bench`: kernel throughput on real layer shapes, int8 against our own f32 and
//! against this machine's measured peak, and (with `--peers`) against PyTorch in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use qkernels::{
    gemm, linear_f32, Activation, Conv2dGeometry, DynamicActivations, GemmOutput, OutputQuant, PackedConv2d,
    PackedConv2dF32, PackedWeights, QImage, QMatrix, WeightLayout,
};
use serde::Serialize;

/// One benchmarked shape.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind_of_op", rename_all = "snake_case")]
pub enum Shape {
    Linear {
        name: String,
        m: usize,
        k: usize,
        n: usize,
        /// Dynamic quantization: f32 in and out, the input quantized per call (PyTorch, per
        /// tensor only: `quantized::linear_dynamic`); else u8 in and out.
        #[serde(skip)]
        dynamic: Option<qkernels::DynamicActivations>,
    },
    Conv {
        name: String,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        oc: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    },
}

impl Shape {
    fn name(&self) -> &str {
        match self {
            Shape::Linear { name, .. } | Shape::Conv { name, .. } => name,
        }
    }

    fn conv_out(&self) -> (usize, usize) {
        match *self {
            Shape::Conv { h, w, kh, kw, stride, padding, dilation, .. } => (
                (h + 2 * padding - dilation * (kh - 1) - 1) / stride + 1,
                (w + 2 * padding - dilation * (kw - 1) - 1) / stride + 1,
            ),
            Shape::Linear { .. } => (1, 1),
        }
    }

    /// Multiply-accumulates of the padded problem (the usual convention).
    fn macs(&self) -> f64 {
        match *self {
            Shape::Linear { m, k, n, .. } => (m * k * n) as f64,
            Shape::Conv { n, c, oc, kh, kw, groups, .. } => {
                let (oh, ow) = self.conv_out();
                (n * oh * ow * oc * kh * kw * (c / groups)) as f64
            }
        }
    }

    /// The JSON PyTorch's timing script reads.
    fn peer_spec(&self) -> serde_json::Value {
        match self {
            Shape::Linear { name, m, k, n, dynamic } => {
                let kind = if dynamic.is_some() { "dynamic_linear" } else { "linear" };
                serde_json::json!({"name": name, "kind": kind, "m": m, "k": k, "n": n})
            }
            Shape::Conv { name, n, h, w, c, oc, kh, kw, stride, padding, dilation, groups } => serde_json::json!({
                "name": name, "kind": "conv", "n": n, "h": h, "w": w, "c": c, "oc": oc, "kh": kh, "kw": kw,
                "stride": stride, "padding": padding, "dilation": dilation, "groups": groups
            }),
        }
    }
}

/// A dynamically quantized BERT-base layer at 128 tokens: 768 input features, `n` outputs.
fn dynamic(name: &str, n: usize, how: Option<DynamicActivations>) -> Shape {
    Shape::Linear { name: name.into(), m: 128, k: 768, n, dynamic: how }
}

fn conv(name: &str, c: usize, oc: usize, hw: usize, k: usize, stride: usize, groups: usize) -> Shape {
    Shape::Conv {
        name: name.into(),
        n: 1,
        h: hw,
        w: hw,
        c,
        oc,
        kh: k,
        kw: k,
        stride,
        padding: k / 2,
        dilation: 1,
        groups,
    }
}

/// The shapes of issue 3: large GEMMs, ResNet-18 and MobileNetV2 layers.
pub fn kernel_shapes() -> Vec<Shape> {
    vec![
        Shape::Linear { name: "linear_512x512x512".into(), m: 512, k: 512, n: 512, dynamic: None },
        Shape::Linear { name: "linear_1024x1024x1024".into(), m: 1024, k: 1024, n: 1024, dynamic: None },
        Shape::Linear { name: "linear_3136x576x64".into(), m: 3136, k: 576, n: 64, dynamic: None },
        Shape::Linear { name: "linear_196x2304x256".into(), m: 196, k: 2304, n: 256, dynamic: None },
        // BERT-base's feed-forward pair at 128 tokens, static int8.
        Shape::Linear { name: "linear_128x768x3072".into(), m: 128, k: 768, n: 3072, dynamic: None },
        Shape::Linear { name: "linear_128x3072x768".into(), m: 128, k: 3072, n: 768, dynamic: None },
        // BERT-base at 128 tokens: an attention projection and the feed-forward expansion,
        // dynamically quantized as PyTorch's quantize_dynamic runs them.
        dynamic("dynamic_linear_128x768x768", 768, Some(DynamicActivations::PerTensor { reduce_range: true })),
        dynamic("dynamic_linear_128x768x3072", 3072, Some(DynamicActivations::PerTensor { reduce_range: true })),
        // Per token (PyTorch has no such mode: its per-tensor layer is the peer).
        dynamic(
            "dynamic_per_token_linear_128x768x768",
            768,
            Some(DynamicActivations::PerToken { reduce_range: false }),
        ),
        dynamic(
            "dynamic_per_token_linear_128x768x3072",
            3072,
            Some(DynamicActivations::PerToken { reduce_range: false }),
        ),
        conv("resnet18_conv1_7x7s2", 3, 64, 224, 7, 2, 1),
        conv("resnet18_layer1_3x3", 64, 64, 56, 3, 1, 1),
        conv("resnet18_layer2_3x3", 128, 128, 28, 3, 1, 1),
        conv("resnet18_layer3_3x3", 256, 256, 14, 3, 1, 1),
        conv("resnet18_layer4_3x3", 512, 512, 7, 3, 1, 1),
        conv("resnet18_downsample_1x1s2", 64, 128, 56, 1, 2, 1),
        conv("mobilenetv2_dw3x3_112x32", 32, 32, 112, 3, 1, 32),
        conv("mobilenetv2_dw3x3_56x144", 144, 144, 56, 3, 1, 144),
        conv("mobilenetv2_dw3x3_14x384", 384, 384, 14, 3, 1, 384),
        conv("mobilenetv2_dw3x3s2_112x96", 96, 96, 112, 3, 2, 96),
        conv("efficientnet_dw5x5s2_56x144", 144, 144, 56, 5, 2, 144),
        conv("mobilenetv2_pw1x1_56x24to144", 24, 144, 56, 1, 1, 1),
    ]
}

/// Median wall time of `f` in milliseconds: 3 warm-up calls, then at least `min_reps` calls
/// and at least 0.25 s.
pub fn median_ms(min_reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_reps || start.elapsed().as_secs_f64() < 0.25 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if times.len() >= 2000 {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 - 0.5
    }
}

/// (int8 median ms, f32 median ms) for one shape.
fn run_shape(shape: &Shape, threads: usize) -> Result<(f64, f64), String> {
    let mut rng = Lcg(0x5eed);
    let quant = OutputQuant { scale: 0.05, zero_point: 0, activation: Activation::Relu };
    match *shape {
        Shape::Linear { m, k, n, dynamic: Some(how), .. } => {
            let wf = ndarray::Array2::from_shape_fn((n, k), |_| rng.unit() * 0.2);
            let wq = qkernels::quantize_weights_per_channel(&wf.view().into_dyn()).map_err(|e| e.to_string())?;
            let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let layer = qkernels::PackedLinear::new(&wq, Some(&bias)).map_err(|e| e.to_string())?;
            let xf: Vec<f32> = (0..m * k).map(|_| rng.unit() * 4.0).collect();
            let mut out = vec![0.0f32; m * n];
            let int8 = qkernels::with_threads(threads, || {
                median_ms(10, || {
                    layer.forward_dynamic(&xf, m, &mut out, how, false, threads).expect("dynamic linear");
                })
            });
            let wf = wf.into_raw_vec_and_offset().0;
            let f32ms = median_ms(5, || linear_f32(&xf, m, k, &wf, n, Some(&bias), &mut out).expect("linear_f32"));
            Ok((int8, f32ms))
        }
        Shape::Linear { m, k, n, .. } => {
            let wf = ndarray::Array2::from_shape_fn((n, k), |_| rng.unit() * 0.2);
            let wq = qkernels::quantize_weights_per_channel(&wf.view().into_dyn()).map_err(|e| e.to_string())?;
            let packed = PackedWeights::new(&wq).map_err(|e| e.to_string())?;
            let a: Vec<u8> = (0..m * k).map(|_| rng.next() as u8).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let mut out = vec![0u8; m * n];
            // Inside the kernels' pool, as a model's layers run (see `qkernels::with_threads`).
            let int8 = qkernels::with_threads(threads, || {
                median_ms(10, || {
                    let am = QMatrix { data: &a, m, k, lda: k, scale: 1.0 / 255.0, zero_point: 0 };
                    gemm(&am, &packed, Some(&bias), GemmOutput::U8 { data: &mut out, ldc: n, quant }, threads)
                        .expect("gemm");
                })
            });
            let xf: Vec<f32> = a.iter().map(|&v| v as f32 / 255.0).collect();
            let wf = wf.into_raw_vec_and_offset().0;
            let mut of = vec![0.0f32; m * n];
            let f32ms = median_ms(5, || linear_f32(&xf, m, k, &wf, n, Some(&bias), &mut of).expect("linear_f32"));
            Ok((int8, f32ms))
        }
        Shape::Conv { n, h, w, c, oc, kh, kw, stride, padding, dilation, groups, .. } => {
            let geom = Conv2dGeometry { stride: [stride; 2], padding: [padding; 2], dilation: [dilation; 2], groups };
            let wf = ndarray::Array4::from_shape_fn((oc, kh, kw, c / groups), |_| rng.unit() * 0.2);
            let wq = qkernels::quantize_weights_per_channel(&wf.view().into_dyn()).map_err(|e| e.to_string())?;
            let bias: Vec<f32> = (0..oc).map(|_| rng.unit()).collect();
            let packed = PackedConv2d::new(&wq, Some(&bias), geom).map_err(|e| e.to_string())?;
            let x: Vec<u8> = (0..n * h * w * c).map(|_| rng.next() as u8).collect();
            let (oh, ow) = packed.output_hw(h, w).map_err(|e| e.to_string())?;
            let mut out = vec![0u8; n * oh * ow * oc];
            let img = QImage { data: &x, n, h, w, c, scale: 1.0 / 255.0, zero_point: 0 };
            let int8 = qkernels::with_threads(threads, || {
                median_ms(10, || packed.forward_u8(&img, quant, &mut out, threads).expect("conv"))
            });
            let xf: Vec<f32> = x.iter().map(|&v| v as f32 / 255.0).collect();
            let wf = wf.into_raw_vec_and_offset().0;
            let mut of = vec![0.0f32; out.len()];
            // Packed once, as a model's float layers are.
            let pf = PackedConv2dF32::new(
                &wf,
                WeightLayout::Ohwi,
                (oc, c / groups, kh, kw),
                Some(&bias),
                geom,
                Activation::None,
            )
            .map_err(|e| e.to_string())?;
            let f32ms = median_ms(5, || pf.forward(&xf, (n, h, w, c), &mut of, 1).expect("conv f32"));
            Ok((int8, f32ms))
        }
    }
}

/// One JSON record.
#[derive(Debug, Default, Serialize)]
pub struct Record {
    pub name: String,
    /// Our kernels' instruction-set tier.
    pub isa: &'static str,
    /// Our models' configuration (`--qconfig`).
    pub qconfig: &'static str,
    /// How the zoo models' weights were drawn (`--weights`).
    pub weights: &'static str,
    pub kind: &'static str,
    pub dtype: &'static str,
    pub threads: usize,
    /// Images per call (models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    pub median_ms: f64,
    pub gmacs_per_s: f64,
    /// Of the probe's int8 peak for the tier that ran (`tdpbusd` for AMX) times the thread count.
    pub pct_of_peak: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    /// Our 1-thread time over this one (models at more than one thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup_vs_1_thread: Option<f64>,
    /// int8 output against our f32 output on the same input (models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqnr_db: Option<f64>,
    /// The peer this row is judged against: PyTorch for kernels and observers, the faster of
    /// the peers for models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_median_ms: Option<f64>,
    /// Ours / the peer's time (models: the median of the rounds' ratios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_peer: Option<f64>,
    /// The lowest and highest of the rounds' ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_spread: Option<[f64; 2]>,
    /// The peer's int8 SQNR against its own float model, on the same images (models
    /// imported from ONNX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_sqnr_db: Option<f64>,
    /// This model's time over the same model built in Rust (models imported from ONNX: the
    /// median of the rounds' ratios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_rust_model: Option<f64>,
    /// Our float output against ONNX Runtime's fp32 one on the same images: the largest
    /// absolute difference over the largest absolute value (models imported from ONNX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_rel_err: Option<f64>,
    /// ONNX Runtime running our QDQ export of this model: the share of its outputs identical
    /// to ours (models imported from ONNX).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qdq_identical_share: Option<f64>,
    /// The same comparison's largest difference, in steps of the output's scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qdq_max_steps: Option<f64>,
    /// Every peer measured on this row (models: PyTorch and ONNX Runtime).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerRecord>,
}

/// One peer's time for a record.
#[derive(Debug, Serialize)]
pub struct PeerRecord {
    pub peer: &'static str,
    pub peer_median_ms: f64,
    /// Ours / the peer's time (models: the median of the rounds' ratios).
    pub ratio_vs_peer: f64,
    /// The lowest and highest of the rounds' ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_spread: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    /// The peer's int8 output against its own f32 output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqnr_db: Option<f64>,
}

/// Finds a Python that can `import torch`: `$QRUST_PYTHON`, then `python3`.
fn find_torch_python() -> Option<String> {
    find_python_with("torch")
}

/// `$QRUST_PYTHON`, else `python3`, if it can import `modules` (comma-separated).
pub(crate) fn find_python_with(modules: &str) -> Option<String> {
    let candidates = std::env::var("QRUST_PYTHON").ok().into_iter().chain(["python3".to_string()]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", &format!("import {modules}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    None
}

fn peer_timings(root: &Path, shapes: &[Shape], threads: usize) -> Result<Vec<(String, f64)>, String> {
    let Some(py) = find_torch_python() else {
        return Err("no Python with torch found (tried $QRUST_PYTHON and python3). Get one with:\n  \
             python3 -m venv ~/qrust-venv && ~/qrust-venv/bin/pip install torch numpy\n  \
             QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --peers"
            .into());
    };
    let script = root.join("scripts/peers/torch_kernels.py");
    let spec = serde_json::Value::Array(shapes.iter().map(Shape::peer_spec).collect()).to_string();
    let mut child = Command::new(&py)
        .arg(&script)
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("running {py} {}: {e}", script.display()))?;
    use std::io::Write;
    child.stdin.take().expect("piped stdin").write_all(spec.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("peer output is not JSON: {e}"))?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|r| Some((r["name"].as_str()?.to_string(), r["median_ms"].as_f64()?))).collect())
        .unwrap_or_default())
}

/// A normal(0, 1)-like batch (Box-Muller on a fixed LCG), as `torch.randn`.
pub(crate) fn randn(seed: u64, shape: &[usize]) -> ndarray::ArrayD<f32> {
    let mut rng = Lcg(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u, w) = ((rng.next() as f32 + 1.0) / 2_147_483_649.0, rng.next() as f32 / 2_147_483_648.0);
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * w).cos()
        })
        .collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).expect("shape")
}

/// Observer throughput on PyTorch's measurement batch (4x64x112x112, 12.8 MB), and the time
/// to calibrate 32 batches of 1x64x56x56 through a fresh histogram observer; with `--peers`,
/// PyTorch's `scripts/peers/torch_observers.py` on the same shapes.
fn run_observers(root: &Path, peers: bool, records: &mut Vec<Record>) -> Result<(), String> {
    use qobserve::{HistogramObserver, MinMaxObserver, Observer, QuantSpec};
    let x = randn(1, &[4, 64, 112, 112]);
    let bytes = (x.len() * 4) as f64;
    let mut hist = HistogramObserver::new(QuantSpec::u8_affine()).map_err(|e| e.to_string())?;
    hist.observe(x.view()).map_err(|e| e.to_string())?;
    let hist_ms = median_ms(10, || hist.observe(x.view()).expect("observe"));
    let mut mm = MinMaxObserver::new(QuantSpec::u8_affine());
    let mm_ms = median_ms(10, || mm.observe(x.view()).expect("observe"));
    let batches: Vec<_> = (0..32).map(|i| randn(100 + i, &[1, 64, 56, 56])).collect();
    let cal_ms = median_ms(5, || {
        let mut o = HistogramObserver::new(QuantSpec::u8_affine()).expect("observer");
        for b in &batches {
            o.observe(b.view()).expect("observe");
        }
        std::hint::black_box(o.qparams().expect("qparams"));
    });
    let peer = if peers {
        match find_torch_python() {
            Some(py) => {
                let out = Command::new(&py)
                    .arg(root.join("scripts/peers/torch_observers.py"))
                    .stderr(Stdio::inherit())
                    .output()
                    .map_err(|e| format!("running {py}: {e}"))?;
                serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
            }
            None => {
                eprintln!("--peers: no Python with torch found (set QRUST_PYTHON)");
                None
            }
        }
    } else {
        None
    };
    let p = |k: &str| peer.as_ref().and_then(|v| v[k].as_f64());
    let rows = [
        ("observer_histogram_2048_12.8MB", hist_ms, p("histogram_ms_per_batch")),
        ("observer_minmax_12.8MB", mm_ms, p("minmax_gbps").map(|g| bytes / g / 1e6)),
        ("calibrate_32x_1x64x56x56_histogram", cal_ms, p("calibrate_32_ms")),
    ];
    println!(
        "
observers, 1 thread"
    );
    println!("{:<36} {:>9} {:>9} {:>10} {:>10}", "what", "ms", "GB/s", "torch ms", "ours/torch");
    for (name, ms, pm) in rows {
        let gbps =
            if name.starts_with("calibrate") { 32.0 * 64.0 * 56.0 * 56.0 * 4.0 / ms / 1e6 } else { bytes / ms / 1e6 };
        println!(
            "{:<36} {:>9.3} {:>9.2} {:>10} {:>10}",
            name,
            ms,
            gbps,
            pm.map_or("-".into(), |m| format!("{m:.3}")),
            pm.map_or("-".into(), |m| format!("{:.2}", ms / m))
        );
        records.push(Record {
            name: name.into(),
            kind: "observer",
            dtype: "f32",
            threads: 1,
            median_ms: ms,
            gmacs_per_s: 0.0,
            pct_of_peak: None,
            peer: pm.map(|_| "pytorch"),
            peer_median_ms: pm,
            ratio_vs_peer: pm.map(|m| ms / m),
            ..Record::default()
        });
    }
    Ok(())
}

/// What `cargo xtask bench` runs.
pub struct RunOptions<'a> {
    pub threads: &'a [usize],
    pub batches: &'a [usize],
    pub rounds: usize,
    pub peers: bool,
    /// The instruction-set tier to force (`--isa`).
    pub isa: Option<&'a str>,
    /// Our models' configuration (`--qconfig`: `default`, `x86` or `mse-weights`).
    pub qconfig: &'a str,
    /// How the zoo models' weights are drawn (`--weights`: `normal` or `uniform`).
    pub weights: &'a str,
}

/// Forces our tier to `name` (before any kernel runs) and caps PyTorch's to the same where
/// it can be: `FBGEMM_ENABLE_INSTRUCTIONS` and `ONEDNN_MAX_CPU_ISA`, inherited by the peer
/// processes. Returns which peers can run at that tier: (PyTorch, ONNX Runtime).
fn force_isa(name: &str) -> Result<(bool, bool), String> {
    use qtensor::isa::Isa;
    let isa = Isa::parse(name).ok_or_else(|| {
        let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
        format!("--isa {name:?} is not an instruction set; use one of {}", names.join(", "))
    })?;
    if !isa.is_supported() {
        return Err(format!("--isa {isa}: this CPU lacks it"));
    }
    std::env::set_var(qtensor::isa::FORCE_ENV, isa.name());
    if qtensor::isa::selected() != isa {
        return Err(format!(
            "--isa {isa}: the kernels already chose {} (set {}={} instead)",
            qtensor::isa::selected(),
            qtensor::isa::FORCE_ENV,
            isa.name()
        ));
    }
    Ok(match isa {
        Isa::Avx512Vnni | Isa::Amx => (true, true),
        Isa::Avx2 => {
            std::env::set_var("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2");
            std::env::set_var("ONEDNN_MAX_CPU_ISA", "AVX2");
            // On a CPU whose best tier is AVX2, ONNX Runtime runs at that level uncapped.
            let ort = Isa::best_supported() == Isa::Avx2;
            println!(
                "--isa avx2: PyTorch capped with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2; {}",
                if ort {
                    "ONNX Runtime as it is (this CPU has nothing above AVX2)"
                } else {
                    "ONNX Runtime left out (its MLAS kernels cannot be capped)"
                }
            );
            (true, ort)
        }
        Isa::Scalar => {
            println!("--isa scalar: no peer can be capped to scalar code; peers left out");
            (false, false)
        }
        Isa::Neon | Isa::Dotprod | Isa::I8mm if isa == Isa::best_supported() => (true, true),
        Isa::Neon | Isa::Dotprod | Isa::I8mm => {
            println!("--isa {isa}: the peers cannot be capped below this CPU's best aarch64 tier; peers left out");
            (false, false)
        }
    })
}

/// Runs the benchmarks `filter` selects, prints a table, and writes the records to `json` when
/// given.
pub fn run(root: &Path, o: &RunOptions<'_>, filter: Option<&str>, json: Option<&PathBuf>) -> Result<(), String> {
    let (threads_list, batches, rounds) = (o.threads, o.batches, o.rounds);
    let (torch_ok, ort_ok) = match o.isa {
        Some(name) => force_isa(name)?,
        None => (true, true),
    };
    let peers = o.peers && torch_ok;
    let qconfig = match o.qconfig {
        "default" => qobserve::QConfig::default(),
        "x86" => qobserve::QConfig::pytorch_x86(),
        "mse-weights" => qobserve::QConfig {
            weight_quantizer: Some(std::sync::Arc::new(qobserve::SymmetricMse)),
            ..Default::default()
        },
        other => return Err(format!("--qconfig {other:?}: use default, x86 or mse-weights")),
    };
    let (weights, weights_name) = match o.weights {
        "normal" => (qnn::zoo::WeightInit::Normal, "normal"),
        "uniform" => (qnn::zoo::WeightInit::Uniform, "uniform"),
        other => return Err(format!("--weights {other:?}: use normal or uniform")),
    };
    let peak = qkernels::peak::measure();
    match peak {
        Some(p) => println!(
            "machine ceilings, one core (independent loops of the int8 instruction and of FMAs): int8 {:.0} GMAC/s \
             ({}), AVX2 two quads at a time {:.0} GMAC/s, f32 {:.0} GMAC/s{}; kernels: {} (% peak against {:.0} \
             GMAC/s)",
            p.int8_gmacs,
            if qtensor::isa::Isa::Avx512Vnni.is_supported() {
                "vpdpbusd"
            } else {
                "AVX2 vpmaddubsw + vpmaddwd + vpaddd"
            },
            p.avx2_paired_int8_gmacs,
            p.f32_gmacs,
            p.amx_int8_gmacs.map(|a| format!(", AMX tdpbusd int8 {a:.0} GMAC/s")).unwrap_or_default(),
            qtensor::isa::selected(),
            p.int8_for(qtensor::isa::selected()),
        ),
        None => println!("no AVX2: peak probe skipped; kernels: {}", qtensor::isa::selected()),
    }
    println!("int8 kernels are timed inside their thread pool, as a model's layers run (qkernels::with_threads)");
    let shapes: Vec<Shape> =
        kernel_shapes().into_iter().filter(|s| filter.is_none_or(|f| s.name().contains(f))).collect();
    let mut records = Vec::new();
    // Ours first, at every thread count, then the peers: neither side runs in the wake of the
    // other's processes.
    let mut ours_all = Vec::new();
    for &threads in threads_list {
        ours_all.push(shapes.iter().map(|shape| run_shape(shape, threads)).collect::<Result<Vec<_>, _>>()?);
    }
    for (&threads, ours) in threads_list.iter().zip(&ours_all).filter(|_| !shapes.is_empty()) {
        let peer = if peers {
            match peer_timings(root, &shapes, threads) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("--peers: {e}");
                    None
                }
            }
        } else {
            None
        };
        println!("\n{threads} thread(s)");
        println!(
            "{:<34} {:>9} {:>8} {:>7} {:>9} {:>8} {:>9} {:>10} {:>9}",
            "shape", "int8 ms", "GMAC/s", "% peak", "f32 ms", "GMAC/s", "int8/f32", "torch ms", "ours/torch"
        );
        for (shape, &(i8ms, f32ms)) in shapes.iter().zip(ours) {
            let macs = shape.macs();
            let gi = macs / i8ms / 1e6;
            let gf = macs / f32ms / 1e6;
            let pct = peak.map(|p| 100.0 * gi / (p.int8_for(qtensor::isa::selected()) * threads as f64));
            let pct_f = peak.map(|p| 100.0 * gf / p.f32_gmacs);
            let pm = peer.as_ref().and_then(|p| p.iter().find(|(n, _)| n == shape.name()).map(|(_, ms)| *ms));
            println!(
                "{:<34} {:>9.3} {:>8.1} {:>6.0}% {:>9.3} {:>8.1} {:>8.2}x {:>10} {:>9}",
                shape.name(),
                i8ms,
                gi,
                pct.unwrap_or(f64::NAN),
                f32ms,
                gf,
                f32ms / i8ms,
                pm.map_or("-".into(), |m| format!("{m:.3}")),
                pm.map_or("-".into(), |m| format!("{:.2}", i8ms / m)),
            );
            records.push(Record {
                name: shape.name().into(),
                kind: "kernel",
                dtype: "int8",
                threads,
                median_ms: i8ms,
                gmacs_per_s: gi,
                pct_of_peak: pct,
                peer: pm.map(|_| "pytorch"),
                peer_median_ms: pm,
                ratio_vs_peer: pm.map(|m| i8ms / m),
                ..Record::default()
            });
            records.push(Record {
                name: shape.name().into(),
                kind: "kernel",
                dtype: "f32",
                threads: 1,
                median_ms: f32ms,
                gmacs_per_s: gf,
                pct_of_peak: pct_f,
                ..Record::default()
            });
        }
    }
    if filter.is_none_or(|f| "observer calibrate".contains(f)) {
        run_observers(root, peers, &mut records)?;
    }
    let options = crate::bench_models::Options {
        threads: threads_list,
        batches,
        rounds,
        peers,
        onnxruntime: ort_ok,
        qconfig: &qconfig,
        weights,
        filter,
        peak_int8_gmacs: peak.map(|p| p.int8_for(qtensor::isa::selected())),
    };
    crate::bench_models::run(root, &options, &mut records)?;
    crate::bench_transformers::run(root, &options, &mut records)?;
    for r in &mut records {
        r.isa = qtensor::isa::selected().name();
        r.weights = weights_name;
        r.qconfig = match o.qconfig {
            "x86" => "x86",
            "mse-weights" => "mse-weights",
            _ => "default",
        };
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("\nwrote {} records to {}", records.len(), path.display());
    }
    Ok(())
}
