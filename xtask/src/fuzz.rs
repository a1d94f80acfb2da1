//! `cargo xtask fuzz`: writes seed inputs for the fuzz targets in `fuzz/` (saved models and
//! weight files of the bundled architectures, covering every node and op kind the saved
//! format has), then runs each target under `cargo +nightly fuzz` for a while. Crashes land in
//! `fuzz/artifacts/<target>/`; copy each into `fuzz/regressions/<target>/` so the ordinary
//! test suite (`qnn/tests/fuzz_regressions.rs`) replays it on stable.

use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use qkernels::Pool2d;
use qnn::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, ChannelShuffle, Conv2d, DeQuantStub, Dropout, Flatten, HardSigmoid,
    Hardswish, Hardtanh, Linear, MaxPool2d, Pad2d, PadMode, Permute, QuantStub, ReLU, ReLU6, Reshape, SiLU, Sigmoid,
    Softmax, Tanh, Upsample, GELU,
};
use qnn::{fuse, prepare, zoo, Concat, Graph, GraphBuilder, QConfigMapping, Residual, Sequential};
use qobserve::QConfig;

pub const TARGETS: [&str; 3] = ["load_model", "load_state_dict", "load_onnx"];

fn input(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|k: usize| ((k * 7) % 13) as f32 / 6.0 - 1.0).collect())
        .expect("shape")
}

/// Every saved node and op kind in one small model: stubs, convolution with batch-norm and
/// ReLU6, a residual block, a concatenation of pools, lookup-table activations, a float
/// batch-norm left unfused, flatten and linear.
fn every_kind() -> Sequential {
    let pool = |k| Pool2d { padding: [1, 1], stride: [1, 1], ..Pool2d::square(k) };
    let body = Sequential::new().add("conv", Conv2d::new(4, 4, 3).padding(1)).add("bn", BatchNorm2d::new(4));
    Sequential::new()
        .add("quant", QuantStub)
        .add("stem", Conv2d::new(1, 4, 3).padding(1))
        .add("stem_bn", BatchNorm2d::new(4))
        .add("stem_act", ReLU6)
        .add("res", Residual { body, shortcut: None, add_name: "add".into(), relu: Some("relu".into()) })
        .add(
            "cat",
            Concat::new("cat")
                .branch("max", Sequential::new().add("pool", MaxPool2d(pool(3))))
                .branch("avg", Sequential::new().add("pool", AvgPool2d(pool(3)))),
        )
        .add("hs", Hardswish)
        .add("pool", AdaptiveAvgPool2d(2, 2))
        .add("lone_bn", BatchNorm2d::new(8))
        .add("drop", Dropout(0.1))
        .add("flat", Flatten)
        .add("fc", Linear::new(32, 6))
        .add("act", ReLU)
        .add("head", Linear::new(6, 3))
        .add("sig", Sigmoid)
        .add("dequant", DeQuantStub)
}

/// The graph ops and the rest of the op files in one graph: a squeeze-and-excitation product,
/// the other lookup tables, the shape ops, padding, resizing, chunks, a clamp, softmax, and a convolution and a linear layer kept
/// in float (saved with their weights).
fn every_graph_op() -> Result<Graph, qnn::NnError> {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("stem", Conv2d::new(1, 4, 3).padding(1), x)?;
    let y = g.layer("silu", SiLU, y)?;
    let s = g.layer("se.pool", AdaptiveAvgPool2d(1, 1), y)?;
    let s = g.layer("se.fc", Conv2d::new(4, 4, 1), s)?;
    let s = g.layer("se.gate", HardSigmoid, s)?;
    let y = g.mul("se.scale", y, s)?;
    let y = g.layer("shuffle", ChannelShuffle { groups: 2 }, y)?;
    let y = g.layer("pad", Pad2d { pads: [1, 0, 0, 1], mode: PadMode::Reflect }, y)?;
    let y = g.layer("down", MaxPool2d::new(2, 2, 0), y)?;
    let y = g.layer("up", Upsample::bilinear(2.0, false), y)?;
    let halves = g.chunk("halves", y, 2, 1)?;
    let y = g.cat("rejoin", &[halves[1], halves[0]])?;
    let y = g.layer("clip", Hardtanh { min_val: -1.0, max_val: 1.0 }, y)?;
    let y = g.layer("tanh", Tanh, y)?;
    let y = g.layer("float_conv", Conv2d::new(4, 4, 1), y)?;
    let y = g.layer("tokens", Reshape::batch_and(&[4, -1]), y)?;
    let y = g.layer("swap", Permute { dims: vec![0, 2, 1] }, y)?;
    let y = g.layer("gelu", GELU { tanh: true }, y)?;
    let y = g.layer("softmax", Softmax { dim: -1 }, y)?;
    let y = g.layer("flat", Flatten, y)?;
    let y = g.layer("float_fc", Linear::new(4 * 64, 3), y)?;
    g.output(y);
    let mut graph = g.build()?;
    zoo::randomize(&mut graph, 4);
    Ok(graph)
}

/// Min-max activations over a custom 4-bit range (its op is saved inside a range clamp).
fn four_bit() -> Result<QConfig, String> {
    let range = qtensor::QuantRange::custom(qtensor::DType::U8, 0, 15).map_err(|e| e.to_string())?;
    Ok(QConfig {
        activation: qobserve::ObserverSpec::MinMax(qobserve::QuantSpec { range, ..qobserve::QuantSpec::u8_affine() }),
        ..QConfig::default()
    })
}

fn saved(mut model: Sequential, x: &ArrayD<f32>) -> Result<Vec<u8>, String> {
    fuse(&mut model).map_err(|e| e.to_string())?;
    saved_graph(model.into(), &QConfigMapping::new(QConfig::default()), x)
}

fn saved_graph(mut model: Graph, mapping: &QConfigMapping, x: &ArrayD<f32>) -> Result<Vec<u8>, String> {
    qnn::fuse_graph(&mut model).map_err(|e| e.to_string())?;
    let mut p = prepare(model, mapping).map_err(|e| e.to_string())?;
    p.calibrate(x).map_err(|e| e.to_string())?;
    p.convert().map_err(|e| e.to_string())?.to_bytes().map_err(|e| e.to_string())
}

/// Writes the seed inputs of every target under `dir/<target>/`.
pub fn write_seeds(root: &Path, dir: &Path) -> Result<(), String> {
    let mut digits = zoo::digits();
    qnn::load_safetensors(&mut digits, root.join("qnn/data/digits_model.safetensors")).map_err(|e| e.to_string())?;
    let mut kinds = every_kind();
    zoo::randomize(&mut kinds, 3);
    let models = [
        ("digits.qmodel", saved(digits, &input(&[4, 1, 8, 8]))?),
        ("every_kind.qmodel", saved(kinds, &input(&[2, 1, 8, 8]))?),
        (
            "every_graph_op.qmodel",
            saved_graph(
                every_graph_op().map_err(|e| e.to_string())?,
                &QConfigMapping::new(QConfig::default())
                    .skip_name("float_conv")
                    .skip_name("float_fc")
                    .set_name("tanh", four_bit()?),
                &input(&[2, 1, 8, 8]),
            )?,
        ),
    ];
    let weights = std::fs::read(root.join("qnn/data/digits_model.safetensors")).map_err(|e| e.to_string())?;
    for (target, files) in [("load_model", &models[..]), ("load_state_dict", &[("digits.safetensors", weights)][..])] {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for (name, bytes) in files {
            std::fs::write(d.join(name), bytes).map_err(|e| e.to_string())?;
        }
    }
    // The ONNX fixtures of qonnx's tests: every op the importer reads, at several opsets.
    let d = dir.join("load_onnx");
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    let models = root.join("qonnx/tests/data/models");
    for case in std::fs::read_dir(&models).map_err(|e| format!("{}: {e}", models.display()))? {
        let case = case.map_err(|e| e.to_string())?.path();
        let src = case.join("model.onnx");
        if src.exists() {
            let name = format!("{}.onnx", case.file_name().and_then(|n| n.to_str()).unwrap_or("model"));
            std::fs::copy(&src, d.join(name)).map_err(|e| format!("{}: {e}", src.display()))?;
        }
    }
    Ok(())
}

pub fn run(root: &Path, seconds: u64, only: Option<&str>, seeds_only: bool) -> Result<(), String> {
    let corpus = root.join("fuzz/corpus");
    write_seeds(root, &corpus)?;
    if seeds_only {
        println!("seeds written to {}", corpus.display());
        return Ok(());
    }
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        println!("fuzzing {target} for {seconds} s (corpus fuzz/corpus/{target}, crashes in fuzz/artifacts/{target})");
        let status = Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-malloc_limit_mb=512", "-timeout=10"])
            .status()
            .map_err(|e| {
                format!("cannot run cargo fuzz ({e}); install it with `cargo install cargo-fuzz` (needs a nightly toolchain)")
            })?;
        if !status.success() {
            return Err(format!(
                "{target} found a failure: the input is in fuzz/artifacts/{target}/; copy it into \
                 fuzz/regressions/{target}/ and fix it"
            ));
        }
    }
    Ok(())
}
