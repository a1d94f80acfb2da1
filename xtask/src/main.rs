//! Project chores as Rust code: `cargo xtask <command>` (the alias lives in
//! `.cargo/config.toml`).
//!
//! - `demo`: the main job, README's first command: the bundled digits model fused,
//!   calibrated, converted to int8 and evaluated against its float self.
//! - `schemes`: qtensor alone, quantizing a synthetic layer under each scheme.
//! - `bench`: kernel benchmarks on real layer shapes (int8, f32, % of the measured peak),
//!   with `--peers` PyTorch's quantized ops in the same run, `--json PATH` for records.
//! - `conformance`: the kernel tests once per forced instruction set.
//! - `sanitize`: the unsafe-code crates under AddressSanitizer (every tier) or Miri.
//! - `fuzz`: the loaders under cargo-fuzz, from seeds of every saved node kind.
//! - `accuracy`: the digits model under every qconfig preset and observer, against the
//!   thresholds in `xtask/accuracy-thresholds.json` (non-zero exit below them).

mod accuracy;
mod bench;
mod bench_models;
mod bench_transformers;
mod conformance;
mod demo;
mod fuzz;
mod sanitize;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use ndarray::{Array2, ArrayView2, Axis};
use qtensor::{
    choose_qparams, choose_qparams_per_channel, isa, DType, QElement, QParams, QScheme, QTensor, QuantRange,
    DEFAULT_EPS,
};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "qrust project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: quantize the bundled digits model and compare it with its float self.
    Demo {
        /// Also write the per-module report as JSON to this file.
        #[arg(long)]
        report_json: Option<std::path::PathBuf>,
        /// Also draw SVG pictures into this directory: per-module SQNR, and each
        /// activation's calibration histogram with the range int8 keeps.
        #[arg(long)]
        plots: Option<std::path::PathBuf>,
    },
    /// Quantize a synthetic layer under every scheme and report the error each one costs.
    Schemes {
        /// Seed of the synthetic data.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// The digits model under every qconfig preset and observer; fails below the committed
    /// thresholds (`xtask/accuracy-thresholds.json`).
    Accuracy {
        /// Measure and (re)write the thresholds instead of checking them.
        #[arg(long)]
        write_thresholds: bool,
    },
    /// The kernel crates' tests once per forced instruction set of the architecture (x86-64:
    /// scalar, avx2, avx512vnni, amx, skipped on CPUs without it; aarch64: scalar, neon,
    /// dotprod, i8mm).
    Conformance {
        /// Cross-build for this target and run through its cargo runner (e.g.
        /// `aarch64-unknown-linux-gnu` with `qemu-aarch64 -cpu max` as the runner).
        #[arg(long)]
        target: Option<String>,
    },
    /// The crates with unsafe code under AddressSanitizer for every instruction set, or under
    /// Miri (scalar tier) with `--miri`; needs the nightly toolchain.
    Sanitize {
        /// Run Miri instead of AddressSanitizer.
        #[arg(long)]
        miri: bool,
    },
    /// Fuzz the model and weight loaders (`cargo +nightly fuzz`, from `cargo install
    /// cargo-fuzz`), starting from seeds of every saved node kind.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (load_model, load_state_dict).
        #[arg(long)]
        target: Option<String>,
        /// Only write the seed corpus (`fuzz/corpus/<target>/`).
        #[arg(long)]
        seeds_only: bool,
    },
    /// Kernel benchmarks: int8 vs f32 vs this machine's peak, optionally vs PyTorch.
    Bench {
        /// Thread counts to run, comma-separated (the f32 baseline always runs one thread).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        threads: Vec<usize>,
        /// Also time PyTorch's quantized ops on the same shapes (needs a Python with torch:
        /// `$QRUST_PYTHON` or `python3`).
        #[arg(long)]
        peers: bool,
        /// Batch sizes for the whole models, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batches: Vec<usize>,
        /// With --peers: rounds of ours-then-peers timings per model configuration (ratios
        /// are the median of the rounds').
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only benchmarks whose name contains this: a kernel shape's or a model's name, or
        /// `models`, `onnx`, `transformers`, `observer`.
        #[arg(long)]
        filter: Option<String>,
        /// Write the results as JSON records here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Run our kernels on this instruction-set tier (scalar, avx2, avx512vnni, amx; on aarch64
        /// neon, dotprod, i8mm), as `QUANT_FORCE_ISA` does; PyTorch's peer is capped to the
        /// same tier where FBGEMM and oneDNN can be (avx2), and peers that cannot be capped
        /// are left out unless the tier is the CPU's best.
        #[arg(long)]
        isa: Option<String>,
        /// Our models' configuration: `default` (qrust's: 8-bit activations), `x86`
        /// (PyTorch's x86 one, as the PyTorch peer uses: 7-bit activations, which let the
        /// AVX2 tier sum products in 16-bit pairs) or `mse-weights` (the default with each
        /// weight channel's scale of least squared error, `qobserve::SymmetricMse`).
        #[arg(long, default_value = "default")]
        qconfig: String,
        /// How our zoo models' weights are drawn (`qnn::zoo::WeightInit`): `normal`
        /// (bell-shaped, as trained layers' are) or `uniform` (every channel's codes spread
        /// over the whole int8 range). The peers run the same weights.
        #[arg(long, default_value = "normal")]
        weights: String,
    },
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { report_json, plots } => demo::run(&workspace_root(), report_json.as_deref(), plots.as_deref()),
        Command::Conformance { target } => conformance::run(&workspace_root(), target.as_deref()),
        Command::Sanitize { miri } => sanitize::run(&workspace_root(), miri),
        Command::Fuzz { seconds, target, seeds_only } => {
            fuzz::run(&workspace_root(), seconds, target.as_deref(), seeds_only)
        }
        Command::Accuracy { write_thresholds } => accuracy::run(&workspace_root(), write_thresholds),
        Command::Schemes { seed } => demo(seed).map_err(|e| e.to_string()),
        Command::Bench { threads, batches, rounds, peers, filter, json, isa, qconfig, weights } => bench::run(
            &workspace_root(),
            &bench::RunOptions {
                threads: &threads,
                batches: &batches,
                rounds,
                peers,
                isa: isa.as_deref(),
                qconfig: &qconfig,
                weights: &weights,
            },
            filter.as_deref(),
            json.as_ref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Deterministic xorshift generator with a Box-Muller normal.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Signal-to-quantization-noise ratio in dB, as PyTorch's Numeric Suite computes it.
fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = reference.iter().zip(approx).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    10.0 * (signal / noise.max(f64::MIN_POSITIVE)).log10()
}

fn min_max(x: ArrayView2<'_, f32>) -> (f32, f32) {
    x.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

struct Row {
    tensor: &'static str,
    scheme: String,
    params: String,
    sqnr: f64,
    max_err: f32,
    micros: f64,
}

fn measure<T: QElement>(
    tensor: &'static str,
    scheme: &str,
    x: &Array2<f32>,
    params: QParams,
    range: QuantRange,
) -> qtensor::Result<Row> {
    let describe = match &params {
        QParams::PerTensor { scale, zero_point } => format!("scale {scale:.3e}, zp {zero_point}"),
        QParams::PerChannel(pc) => {
            let (lo, hi) = pc.scales().iter().fold((f32::MAX, 0.0f32), |(a, b), &s| (a.min(s), b.max(s)));
            format!("{} scales {lo:.2e}..{hi:.2e}", pc.len())
        }
    };
    let start = Instant::now();
    let q = QTensor::<T>::quantize_in_range(x, params, range)?;
    let micros = start.elapsed().as_secs_f64() * 1e6;
    let back = q.dequantize();
    let xs = x.as_slice().expect("standard layout");
    let ys = back.as_slice().expect("standard layout");
    let max_err = xs.iter().zip(ys).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    Ok(Row {
        tensor,
        scheme: format!("{scheme} ({})", T::DTYPE),
        params: describe,
        sqnr: sqnr_db(xs, ys),
        max_err,
        micros,
    })
}

fn demo(seed: u64) -> qtensor::Result<()> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // A linear layer's weights, 256 outputs x 1024 inputs, whose rows differ in magnitude by
    // 100x (as after batch-norm folding), and post-ReLU activations with a long tail.
    let (out_ch, in_ch, batch) = (256usize, 1024usize, 256usize);
    let row_gain: Vec<f32> = (0..out_ch).map(|o| 0.002 * 100f32.powf(o as f32 / out_ch as f32)).collect();
    let w = Array2::from_shape_fn((out_ch, in_ch), |(o, _)| rng.normal() * row_gain[o]);
    let act = Array2::from_shape_fn((batch, in_ch), |_| (rng.normal() * 1.5).max(0.0).powf(1.5));

    println!("qrust demo: qtensor on a synthetic linear layer (qnn does not run models yet)");
    println!(
        "weights {out_ch}x{in_ch} (row scales 0.002..0.2), activations {batch}x{in_ch} (post-ReLU, long tail); \
         kernels: {} (set QUANT_FORCE_ISA=scalar to compare)\n",
        isa::selected()
    );

    let (wmin, wmax) = min_max(w.view());
    let (amin, amax) = min_max(act.view());
    let row_stats: Vec<(f32, f32)> = w.axis_iter(Axis(0)).map(|r| min_max(r.insert_axis(Axis(0)))).collect();
    let (mins, maxs): (Vec<f32>, Vec<f32>) = row_stats.into_iter().unzip();
    let i8_full = QuantRange::full(DType::I8);
    let u8_full = QuantRange::full(DType::U8);
    let u8_reduced = QuantRange::reduced(DType::U8);

    let rows = vec![
        measure::<u8>(
            "activations",
            "per-tensor affine",
            &act,
            choose_qparams(amin, amax, DType::U8, QScheme::Affine, u8_full, DEFAULT_EPS)?,
            u8_full,
        )?,
        measure::<u8>(
            "activations",
            "per-tensor affine, reduce_range",
            &act,
            choose_qparams(amin, amax, DType::U8, QScheme::Affine, u8_reduced, DEFAULT_EPS)?,
            u8_reduced,
        )?,
        measure::<i8>(
            "weights",
            "per-tensor symmetric",
            &w,
            choose_qparams(wmin, wmax, DType::I8, QScheme::Symmetric, i8_full, DEFAULT_EPS)?,
            i8_full,
        )?,
        measure::<i8>(
            "weights",
            "per-channel symmetric",
            &w,
            choose_qparams_per_channel(&mins, &maxs, 0, DType::I8, QScheme::Symmetric, i8_full, DEFAULT_EPS)?,
            i8_full,
        )?,
        measure::<i8>(
            "weights",
            "per-channel affine",
            &w,
            choose_qparams_per_channel(&mins, &maxs, 0, DType::I8, QScheme::Affine, i8_full, DEFAULT_EPS)?,
            i8_full,
        )?,
    ];

    println!(
        "{:<12} {:<48} {:<30} {:>9} {:>11} {:>10}",
        "tensor", "scheme", "qparams", "SQNR dB", "max |err|", "quantize"
    );
    for r in &rows {
        println!(
            "{:<12} {:<48} {:<30} {:>9.2} {:>11.3e} {:>8.0}us",
            r.tensor, r.scheme, r.params, r.sqnr, r.max_err, r.micros
        );
    }
    let gain = rows[3].sqnr - rows[2].sqnr;
    println!("\nper-channel weights gain {gain:.1} dB over per-tensor here: the largest rows no longer set the step of every row.");
    println!(
        "reduce_range costs {:.1} dB on activations (PyTorch's x86 default pays it to dodge int16 saturation).",
        rows[0].sqnr - rows[1].sqnr
    );

    let mut bad = act.clone();
    bad[[3, 5]] = f32::NAN;
    if let Err(e) = QTensor::<u8>::quantize(&bad, QParams::per_tensor(0.1, 0)?) {
        println!("\nand a NaN in the input is an error, not a silent value:\n  {e}");
    }
    Ok(())
}
