//! `qrust`: an ONNX float model quantized to int8, run and reported on, from the command line.
//!
//! ```text
//! qrust inspect  model.onnx
//! qrust quantize model.onnx --calib images/ -o model.int8.safetensors [--config q.toml]
//! qrust run      model.int8.safetensors --input cat.jpg --top 5
//! qrust report   model.onnx model.int8.safetensors --input images/ [--json report.json] [--plots dir/]
//! qrust export-qdq model.int8.safetensors -o model.qdq.onnx
//! ```

/// `println!` that ends the program quietly when standard output is closed (`qrust ... | head`).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod config;
mod data;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use ndarray::ArrayD;
use qnn::{prepare, Mode, QuantizedModel};

#[derive(Parser, Debug)]
#[command(name = "qrust", version, about = "Quantize ONNX float models to int8 for the CPU, run them, report on them")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Import an ONNX model and list its inputs, outputs and layers.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        #[command(flatten)]
        shape: ShapeArg,
    },
    /// Calibrate an ONNX model on data and save it in int8.
    Quantize {
        /// The ONNX float model.
        model: PathBuf,
        /// Calibration data: .npy / .npz arrays [N, ...], an image, or a folder of images
        /// (not needed when every quantized layer is dynamic: a `dynamic*` preset). A model of
        /// several inputs takes an .npz of one array per input, named as the inputs (integer
        /// token ids are read as f32).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Where the int8 model goes (default: next to the model, `<name>.int8.safetensors`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// A TOML file of quantization rules (presets, per-name / per-op / per-kind rules,
        /// observers, skips).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Calibration batch size.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Threads for calibration.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Also draw each activation's calibration histogram, with the range int8 keeps, as
        /// SVG files in this folder (histogram-based observers).
        #[arg(long)]
        plots: Option<PathBuf>,
        /// SmoothQuant before static quantization: move this share (0 to 1; 0.5 is the
        /// paper's default) of each channel's range from the input of linear layers that
        /// read a LayerNorm into their weights, measured on the calibration data.
        #[arg(long, value_name = "ALPHA")]
        smooth_quant: Option<f32>,
        #[command(flatten)]
        shape: ShapeArg,
        #[command(flatten)]
        images: ImageArgs,
    },
    /// Run a model (int8 from `quantize`, or an ONNX float model) on data.
    Run {
        /// The int8 model (`.safetensors`), or an ONNX float model (`.onnx`).
        model: PathBuf,
        /// The input: .npy / .npz, an image, or a folder of images; for a model of several
        /// inputs, an .npz of one array per input, named as the inputs.
        #[arg(long)]
        input: PathBuf,
        /// Write the output (the first, of models with several) here as .npy.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the indices and values of the `top` largest outputs of each item.
        #[arg(long)]
        top: Option<usize>,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run this many times and print the median latency (the first run is not counted).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Also time every node of an int8 model over the `repeat` runs and print a table:
        /// median time, share of the whole, and GMAC/s for layers with weights.
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        shape: ShapeArg,
        #[command(flatten)]
        images: ImageArgs,
    },
    /// Write an int8 model as an ONNX QDQ model (QuantizeLinear / DequantizeLinear with our
    /// scales and zero points) for ONNX Runtime or TensorRT.
    ExportQdq {
        /// The int8 model from `quantize`.
        int8: PathBuf,
        /// The ONNX file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The input's shape to declare, e.g. `1,3,224,224` (its batch is written as symbolic).
        #[arg(long, value_delimiter = ',')]
        input_shape: Vec<usize>,
    },
    /// Compare the int8 model with its float model layer by layer (SQNR per layer).
    Report {
        /// The ONNX float model.
        model: PathBuf,
        /// Its int8 model from `quantize`.
        int8: PathBuf,
        /// Data to compare on (a model of several inputs: an .npz of one array per input,
        /// named as the inputs).
        #[arg(long)]
        input: PathBuf,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw the per-layer SQNR as an SVG bar chart (`sqnr.svg`) in this folder.
        #[arg(long)]
        plots: Option<PathBuf>,
        /// The `--smooth-quant` the int8 model was quantized with: the float model is
        /// smoothed the same way (on the same `--calib` data and `--batch-size`) before the
        /// comparison.
        #[arg(long, value_name = "ALPHA", requires = "calib")]
        smooth_quant: Option<f32>,
        /// The calibration data `quantize` was given (with `--smooth-quant`).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// The calibration batch size `quantize` was given (with `--smooth-quant`).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        shape: ShapeArg,
        #[command(flatten)]
        images: ImageArgs,
    },
}

#[derive(Args, Debug, Clone)]
struct ShapeArg {
    /// The input's shape where the model leaves sizes symbolic, e.g. `1,3,224,224` (or
    /// `name=1,3,224,224` for one input of several); without it, an `.npz` given as the data
    /// gives them (each array's item shape). A sequence length given either way is the one
    /// imported; the model runs at any other where the import can follow it (`inspect` says).
    #[arg(long)]
    input_shape: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct ImageArgs {
    /// Images: the shorter side is resized to this before the centre crop (default: the
    /// crop x 256 / 224).
    #[arg(long)]
    resize: Option<u32>,
    /// Images: the centre crop's side (default: the model input's height, else 224).
    #[arg(long)]
    crop: Option<u32>,
    /// Images: per-channel mean of [0, 1] values (ImageNet's by default).
    #[arg(long, value_delimiter = ',', default_value = "0.485,0.456,0.406")]
    mean: Vec<f32>,
    /// Images: per-channel standard deviation (ImageNet's by default).
    #[arg(long, value_delimiter = ',', default_value = "0.229,0.224,0.225")]
    std: Vec<f32>,
}

impl ImageArgs {
    fn prep(&self, input: Option<&[usize]>) -> Result<data::ImagePrep, String> {
        let three = |v: &[f32], what: &str| -> Result<[f32; 3], String> {
            v.try_into().map_err(|_| format!("--{what} takes three values (R, G, B), not {}", v.len()))
        };
        let from_model = input.and_then(|s| (s.len() == 4 && s[1] == 3).then(|| s[2] as u32));
        let crop = self.crop.or(from_model).unwrap_or(224);
        Ok(data::ImagePrep {
            resize: self.resize.unwrap_or((crop * 256).div_ceil(224)),
            crop,
            mean: three(&self.mean, "mean")?,
            std: three(&self.std, "std")?,
        })
    }
}

fn options(shape: &ShapeArg) -> Result<qonnx::ImportOptions, String> {
    let mut o = qonnx::ImportOptions::default();
    for s in &shape.input_shape {
        let (name, dims) = match s.split_once('=') {
            Some((n, d)) => (n.to_string(), d),
            None => (String::new(), s.as_str()),
        };
        let dims: Vec<usize> = dims
            .split(',')
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("--input-shape '{s}': sizes are numbers, e.g. 1,3,224,224"))
            })
            .collect::<Result<_, _>>()?;
        o.input_shapes.insert(name, dims);
    }
    Ok(o)
}

/// An input's name and declared sizes (`None`: symbolic).
type Declared = (String, Vec<Option<i64>>);

/// The model's inputs (initializers left out), as the file declares them.
fn declared_inputs(path: &Path) -> Result<Vec<Declared>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let m = qonnx::decode_model(&bytes, &path.display().to_string()).map_err(|e| e.to_string())?;
    let g = m.graph.unwrap_or_default();
    let inits: Vec<&str> = g.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    Ok(g.input
        .iter()
        .filter_map(|v| v.name.clone().map(|n| (n, v)))
        .filter(|(n, _)| !inits.contains(&n.as_str()))
        .map(|(n, v)| {
            let dims = v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).and_then(|t| t.shape.as_ref());
            let dims = dims.map(|s| s.dim.iter().map(|d| d.dim_value.filter(|&x| x > 0)).collect()).unwrap_or_default();
            (n, dims)
        })
        .collect())
}

/// Imports a model; an unnamed `--input-shape` applies to its first input. Inputs that leave
/// sizes past the batch symbolic and have no `--input-shape` take them from `data` when it is
/// an `.npz` of one array per input (the calibration or input data): each array's item shape.
fn import(path: &Path, shape: &ShapeArg, data: Option<&Path>) -> Result<qonnx::Imported, String> {
    let mut opts = options(shape)?;
    if let Some(dims) = opts.input_shapes.remove("") {
        let first = declared_inputs(path)?.into_iter().next().map(|(n, _)| n);
        opts.input_shapes.insert(first.unwrap_or_default(), dims);
    }
    let npz = data.filter(|d| d.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")));
    if let Some(npz) = npz {
        let open: Vec<String> = declared_inputs(path)?
            .into_iter()
            .filter(|(n, dims)| !opts.input_shapes.contains_key(n) && dims.iter().skip(1).any(Option::is_none))
            .map(|(n, _)| n)
            .collect();
        if !open.is_empty() {
            for (name, x) in open.iter().zip(data::read_inputs(npz, &open)?) {
                let item: Vec<usize> = [1].into_iter().chain(x.shape().iter().skip(1).copied()).collect();
                opts.input_shapes.insert(name.clone(), item);
            }
        }
    }
    qonnx::load(path, &opts).map_err(|e| e.to_string())
}

fn single_input(m: &qonnx::Imported) -> Result<Vec<usize>, String> {
    match m.inputs.as_slice() {
        [one] => Ok(one.shape.clone()),
        more => Err(format!(
            "the model has {} inputs ({}); the command line feeds models of one input (from Rust, qonnx::load \
             and QuantizedModel::forward_inputs take several)",
            more.len(),
            more.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Inspect { model, shape } => inspect(&model, &shape),
        Cmd::Quantize { model, calib, output, config, batch_size, threads, plots, smooth_quant, shape, images } => {
            let opts = QuantizeOpts { output, config, batch_size, threads, plots, smooth_quant };
            quantize(&model, calib.as_deref(), &opts, &shape, &images)
        }
        Cmd::Run { model, input, output, top, threads, repeat, profile, shape, images } => {
            run_model(&model, &input, output.as_deref(), top, (threads, repeat, profile), &shape, &images)
        }
        Cmd::ExportQdq { int8, output, input_shape } => {
            let q = QuantizedModel::load(&int8).map_err(|e| e.to_string())?;
            let shapes = if input_shape.is_empty() { Vec::new() } else { vec![input_shape] };
            qonnx::save_qdq(&q, &shapes, &output).map_err(|e| e.to_string())?;
            say!("wrote {} (ONNX opset {}, QDQ)", output.display(), qonnx::EXPORT_OPSET);
            Ok(())
        }
        Cmd::Report { model, int8, input, json, plots, smooth_quant, calib, batch_size, shape, images } => {
            let smooth = smooth_quant.map(|a| (a, calib.unwrap_or_default(), batch_size));
            report(&model, &int8, &input, (json.as_deref(), plots.as_deref()), smooth, &shape, &images)
        }
    }
}

fn inspect(path: &Path, shape: &ShapeArg) -> Result<(), String> {
    let m = import(path, shape, None)?;
    say!("{}: opset {}, written by {}", path.display(), m.opset, if m.producer.is_empty() { "?" } else { &m.producer });
    for i in &m.inputs {
        let seq = match (i.sequence_axis, &m.sequence) {
            (Some(k), Some(q)) if q.dynamic.is_ok() => format!(", any {} (axis {k})", q.name),
            _ => String::new(),
        };
        let any = if i.dynamic_batch { format!(" (any batch size{seq})") } else { String::new() };
        say!("input  {} {:?}{any}", i.name, i.shape);
    }
    for o in &m.outputs {
        say!("output {o}");
    }
    if let Some(q) = &m.sequence {
        match &q.dynamic {
            Ok(()) => {
                say!("size   '{}' imported at {}; the model runs at any (up to its constants' lengths)", q.name, q.size)
            }
            Err(why) => say!("size   '{}' fixed at {}: {why}", q.name, q.size),
        }
    }
    let infos = m
        .graph
        .value_info(&m.inputs.iter().map(|i| i.shape.as_slice()).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;
    let shapes: HashMap<&str, &[usize]> = infos.iter().map(|v| (v.name.as_str(), v.shape.as_slice())).collect();
    say!("{:<48} {:<12} {:<18} output shape", "node", "ONNX op", "layer");
    let kinds: HashMap<&str, &str> = m.graph.node_kinds().into_iter().collect();
    for (onnx, op, nodes) in &m.nodes {
        for n in nodes {
            let _ = onnx;
            say!(
                "{:<48} {:<12} {:<18} {:?}",
                n,
                op,
                kinds.get(n.as_str()).unwrap_or(&"?"),
                shapes.get(n.as_str()).unwrap_or(&&[][..])
            );
        }
    }
    Ok(())
}

fn load_data(path: &Path, input: Option<&[usize]>, images: &ImageArgs) -> Result<ArrayD<f32>, String> {
    data::read(path, &images.prep(input)?)
}

/// `quantize`'s options beyond the model and its data.
struct QuantizeOpts {
    output: Option<PathBuf>,
    config: Option<PathBuf>,
    batch_size: usize,
    threads: usize,
    plots: Option<PathBuf>,
    smooth_quant: Option<f32>,
}

/// Applies `--smooth-quant` to the imported graph on the calibration batches (one array
/// per input in each), and says what it did.
fn smooth(g: &mut qnn::Graph, batches: &[Vec<ArrayD<f32>>], alpha: f32) -> Result<(), String> {
    if batches.is_empty() {
        return Err("--smooth-quant measures the activations on the calibration data: give --calib".into());
    }
    let report = qnn::smooth_quant(g, batches, alpha).map_err(|e| e.to_string())?;
    say!(
        "SmoothQuant (alpha {alpha}): {} LayerNorms smoothed, {} left alone",
        report.smoothed.len(),
        report.skipped.len()
    );
    for s in &report.smoothed {
        say!(
            "  {} -> {}: channel factors {:.3}-{:.3}, largest / median channel range {:.1} -> {:.1}",
            s.norm,
            s.linears.join(", "),
            s.scale_range.0,
            s.scale_range.1,
            s.outlier_ratio.0,
            s.outlier_ratio.1
        );
    }
    for (norm, why) in &report.skipped {
        say!("  {norm}: left alone, {why}");
    }
    Ok(())
}

/// The calibration batch size: `asked`, or, for a model whose graph takes one batch size
/// alone (PyTorch's dynamo exporter writes batch 1 into its reshapes), that batch, said when
/// it differs.
fn calibration_batch(m: &qonnx::Imported, asked: usize) -> usize {
    match m.graph.fixed_batch() {
        Some(fixed) if fixed != asked => {
            say!(
                "input '{}' fixes the batch at {fixed} (its first dimension is not symbolic, and the graph takes no \
                 other): calibrating {fixed} item{} at a time",
                m.inputs[0].name,
                if fixed == 1 { "" } else { "s" }
            );
            fixed
        }
        _ => asked,
    }
}

/// Checks that `items` calibration items make whole batches for a model whose graph takes
/// one batch size alone.
fn whole_batches(m: &qonnx::Imported, items: usize) -> Result<(), String> {
    match m.graph.fixed_batch() {
        Some(batch) if !items.is_multiple_of(batch) => Err(format!(
            "the model's input '{}' fixes the batch at {batch}, and {items} calibration items do not make whole \
             batches: give a multiple of {batch} items, or export the model with a symbolic batch dimension",
            m.inputs[0].name
        )),
        _ => Ok(()),
    }
}

fn quantize(
    path: &Path,
    calib: Option<&Path>,
    o: &QuantizeOpts,
    shape: &ShapeArg,
    images: &ImageArgs,
) -> Result<(), String> {
    let (output, config, threads) = (o.output.clone(), o.config.as_deref(), o.threads);
    let t0 = Instant::now();
    let mut m = import(path, shape, calib)?;
    let mut by_op: HashMap<String, Vec<String>> = HashMap::new();
    for (_, op, nodes) in &m.nodes {
        by_op.entry(op.clone()).or_default().extend(nodes.iter().cloned());
    }
    let text = match config {
        Some(p) => {
            Some((std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?, p.display().to_string()))
        }
        None => None,
    };
    let mapping = config::mapping(text.as_ref().map(|(t, p)| (t.as_str(), p.as_str())), &by_op)?;
    say!(
        "imported {} ({} layers, opset {}) in {:.2} s",
        path.display(),
        m.graph.node_names().len(),
        m.opset,
        t0.elapsed().as_secs_f64()
    );
    let batch_size = calibration_batch(&m, o.batch_size);
    // A model of several inputs (token ids, a mask) calibrates on an .npz of one array per
    // input, batch by batch.
    if m.inputs.len() > 1 {
        let names: Vec<String> = m.inputs.iter().map(|i| i.name.clone()).collect();
        let xs = match calib {
            Some(c) => data::read_inputs(c, &names)?,
            None => Vec::new(),
        };
        for (x, i) in xs.iter().zip(&m.inputs) {
            if x.shape().get(1..) != i.shape.get(1..) {
                return Err(format!(
                    "calibration array '{}' has items of shape {:?}; the model's input is {:?}",
                    i.name,
                    x.shape().get(1..).unwrap_or(&[]),
                    i.shape.get(1..).unwrap_or(&[])
                ));
            }
        }
        let n = xs.first().map_or(0, |x| x.shape()[0]);
        if calib.is_some() && n == 0 {
            return Err(format!(
                "{}: no calibration items",
                calib.map(|c| c.display().to_string()).unwrap_or_default()
            ));
        }
        whole_batches(&m, n)?;
        let t1 = Instant::now();
        let batches = data::input_batches(&xs, batch_size);
        if let Some(alpha) = o.smooth_quant {
            smooth(&mut m.graph, &batches, alpha)?;
        }
        let mut prepared = prepare(m.graph, &mapping).map_err(|e| e.to_string())?;
        for b in &batches {
            prepared.calibrate_inputs(b).map_err(|e| e.to_string())?;
        }
        let q = prepared.convert().map_err(|e| e.to_string())?;
        say!("calibrated on {n} items of {} inputs, converted in {:.2} s", names.len(), t1.elapsed().as_secs_f64());
        print_plan(&q);
        let out = output.unwrap_or_else(|| path.with_extension("int8.safetensors"));
        q.save(&out).map_err(|e| e.to_string())?;
        say!("saved {}", out.display());
        return Ok(());
    }
    let in_shape = single_input(&m)?;
    let batches = match calib {
        Some(calib) => {
            let batches = data::batches(calib, batch_size, &images.prep(Some(&in_shape))?)?;
            match batches.first() {
                Some(b) if b.shape()[1..] != in_shape[1..] => {
                    return Err(format!(
                        "calibration data {} has items of shape {:?}; the model's input '{}' is {:?}",
                        calib.display(),
                        &b.shape()[1..],
                        m.inputs[0].name,
                        &in_shape[1..]
                    ))
                }
                Some(_) => {}
                None => return Err(format!("{}: no calibration data", calib.display())),
            }
            batches
        }
        None => Vec::new(),
    };
    let items: usize = batches.iter().map(|b| b.shape()[0]).sum();
    whole_batches(&m, items)?;
    let t1 = Instant::now();
    if let Some(alpha) = o.smooth_quant {
        let per_input: Vec<Vec<ArrayD<f32>>> = batches.iter().map(|b| vec![b.clone()]).collect();
        smooth(&mut m.graph, &per_input, alpha)?;
    }
    let mut prepared = prepare(m.graph, &mapping).map_err(|e| e.to_string())?;
    prepared.calibrate_batches(&batches, threads.max(1)).map_err(|e| e.to_string())?;
    if let Some(dir) = &o.plots {
        let pictures: Vec<(String, String)> = prepared
            .observers()
            .into_iter()
            .filter_map(|(name, obs)| {
                let file = format!("hist-{}.svg", name.trim_start_matches('/').replace([' ', '/', ':'], "_"));
                qnn::plots::histogram_chart(&name, obs).map(|svg| (file, svg))
            })
            .collect();
        qnn::plots::write_files(dir, &pictures).map_err(|e| e.to_string())?;
        say!("drew {} calibration histograms in {}", pictures.len(), dir.display());
    }
    let q = prepared.convert().map_err(|e| {
        if calib.is_none() {
            format!("{e}\n(no --calib given: only dynamic layers can be converted without calibration data)")
        } else {
            e.to_string()
        }
    })?;
    if items == 0 {
        say!("converted without calibration data in {:.2} s", t1.elapsed().as_secs_f64());
    } else {
        say!(
            "calibrated on {items} items in {} batches, converted in {:.2} s",
            batches.len(),
            t1.elapsed().as_secs_f64()
        );
    }
    print_plan(&q);
    let out = output.unwrap_or_else(|| path.with_extension("int8.safetensors"));
    q.save(&out).map_err(|e| e.to_string())?;
    say!("saved {}", out.display());
    Ok(())
}

fn print_plan(q: &QuantizedModel) {
    let plan = q.plan();
    let count = |f: &dyn Fn(&Mode) -> bool| plan.iter().filter(|p| f(&p.mode)).count();
    let int8 = count(&|m| matches!(m, Mode::Int8 | Mode::Int8SameParams));
    let pass = count(&|m| matches!(m, Mode::Passthrough));
    let dynamic = count(&|m| matches!(m, Mode::Dynamic));
    let float: Vec<_> = plan.iter().filter(|p| matches!(p.mode, Mode::Float(_))).collect();
    let dynamic = if dynamic > 0 { format!(", {dynamic} dynamic") } else { String::new() };
    say!("plan: {int8} layers in int8{dynamic}, {} in float, {pass} folded away", float.len());
    let corrected = plan.iter().filter(|p| p.bias_corrected).count();
    if corrected > 0 {
        say!(
            "  bias corrected: {corrected} layer(s) (their rounded weights' mean, measured on the calibration data, \
             taken off their biases; bias_correction = false keeps them as they are)"
        );
    }
    for p in float {
        if let Mode::Float(why) = &p.mode {
            say!("  float: {} ({}): {why}", p.name, p.kind);
        }
    }
    // Which kernels run the layers on this machine (`run --profile` names them per node),
    // the per-layer input-code bounds of AVX2's vpmaddubsw gathered into one range.
    /// A kernel description (with `{}` for the bound), how many layers, the bounds' range.
    type Group = (String, usize, Option<(u32, u32)>);
    let mut kernels: Vec<Group> = Vec::new();
    for (_, k) in q.kernels() {
        let (key, bound) = match k.split_once("<= ").and_then(|(head, rest)| {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            rest[..digits].parse::<u32>().ok().map(|b| (format!("{head}<= {{}}{}", &rest[digits..]), b))
        }) {
            Some((key, b)) => (key, Some(b)),
            None => (k, None),
        };
        match kernels.iter_mut().find(|e| e.0 == key) {
            Some(e) => {
                e.1 += 1;
                e.2 = e.2.zip(bound).map(|((lo, hi), b)| (lo.min(b), hi.max(b)));
            }
            None => kernels.push((key, 1, bound.map(|b| (b, b)))),
        }
    }
    for (key, n, bound) in kernels {
        let text = match bound {
            Some((lo, hi)) if lo == hi => key.replace("{}", &lo.to_string()),
            Some((lo, hi)) => key.replace("{}", &format!("{lo}..{hi}")),
            None => key,
        };
        say!("  kernels: {n} x {text}");
    }
}

fn is_onnx(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some("onnx")
}

fn run_model(
    path: &Path,
    input: &Path,
    output: Option<&Path>,
    top: Option<usize>,
    (threads, repeat, profile): (usize, usize, bool),
    shape: &ShapeArg,
    images: &ImageArgs,
) -> Result<(), String> {
    if profile && is_onnx(path) {
        return Err(format!(
            "--profile times the nodes of an int8 model, and {} is an ONNX float model; \
             run `qrust quantize` on it first and profile its output",
            path.display()
        ));
    }
    // Runs `f` once, then `repeat - 1` more times: the output, and the median time of the
    // runs after the first (the first alone when there are none).
    let timed = |f: &mut dyn FnMut() -> Result<ArrayD<f32>, String>| -> Result<(ArrayD<f32>, f64), String> {
        let t = Instant::now();
        let y = f()?;
        let mut times = vec![t.elapsed().as_secs_f64() * 1e3];
        if repeat > 1 {
            times.clear();
            for _ in 1..repeat {
                let t = Instant::now();
                std::hint::black_box(f()?);
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok((y, times[times.len() / 2]))
    };
    let (y, ms) = if is_onnx(path) {
        let m = import(path, shape, Some(input))?;
        let xs = if m.inputs.len() > 1 {
            data::read_inputs(input, &m.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>())?
        } else {
            vec![load_data(input, Some(&single_input(&m)?), images)?]
        };
        timed(&mut || {
            let ys = qnn::qkernels::with_threads(threads.max(1), || m.graph.run(&xs)).map_err(|e| e.to_string())?;
            ys.into_iter().next().ok_or_else(|| "the model has no output".to_string())
        })?
    } else {
        let mut q = QuantizedModel::load(path).map_err(|e| e.to_string())?;
        q.set_threads(threads.max(1));
        // An int8 model does not declare its input size: images take --crop (224 by default).
        let xs = if q.input_names().len() > 1 {
            data::read_inputs(input, q.input_names())?
        } else {
            vec![load_data(input, None, images)?]
        };
        if profile {
            // A model whose batch is fixed is profiled on its first batch.
            let first: Vec<ArrayD<f32>> = match q.fixed_batch() {
                Some(b) if xs.iter().any(|x| x.shape().first().is_some_and(|&n| n > b)) => {
                    say!("profiling the first {b} item(s): the model's batch is fixed at {b}");
                    xs.iter().map(|x| x.slice_axis(ndarray::Axis(0), (0..b).into()).to_owned()).collect()
                }
                _ => xs.clone(),
            };
            let nodes = q.profile(&first, repeat.max(1)).map_err(|e| e.to_string())?;
            print_profile(&nodes, repeat.max(1));
        }
        // The first output, of models with several.
        timed(&mut || {
            q.forward_inputs(&xs)
                .map_err(|e| e.to_string())?
                .into_iter()
                .next()
                .ok_or_else(|| "the model has no output".to_string())
        })?
    };
    let how = if repeat > 1 { format!("median of {} runs", repeat - 1) } else { "one run".to_string() };
    say!("output {:?} in {ms:.2} ms ({how}, {threads} thread(s))", y.shape());
    if let Some(k) = top {
        let n = y.shape().first().copied().unwrap_or(0);
        let len = y.len();
        let flat = y.into_shape_with_order((n, len / n.max(1))).map_err(|e| e.to_string())?;
        for (i, row) in flat.outer_iter().enumerate() {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let best: Vec<String> = idx.iter().take(k).map(|&j| format!("{j} ({:.3})", row[j])).collect();
            say!("item {i}: {}", best.join(", "));
        }
        return match output {
            Some(o) => data::write_npy(o, &flat.into_dyn()),
            None => Ok(()),
        };
    }
    if let Some(o) = output {
        data::write_npy(o, &y)?;
        say!("wrote {}", o.display());
    }
    Ok(())
}

/// The per-node table of `run --profile`, slowest op kinds summed at the end.
fn print_profile(nodes: &[qnn::NodeTime], runs: usize) {
    let total: f64 = nodes.iter().map(|n| n.median_ms).sum();
    let width = nodes.iter().map(|n| n.name.len()).max().unwrap_or(4).clamp(4, 48);
    say!("per node, median of {runs} run(s):");
    say!("{:<width$}  {:<15} {:<18} {:>9} {:>6} {:>8}  kernel", "node", "op", "output", "ms", "share", "GMAC/s");
    for n in nodes {
        let gmacs = n.macs.map_or(String::from("-"), |m| format!("{:.1}", m as f64 / (n.median_ms * 1e6)));
        let shape = format!("{:?}", n.out_shape);
        if let Some(conv) = &n.runs_in {
            say!("{:<width$}  {:<15} {shape:<18} (runs in {conv})", n.name, n.op);
            continue;
        }
        say!(
            "{:<width$}  {:<15} {shape:<18} {:>9.4} {:>5.1}% {:>8}  {}",
            n.name,
            n.op,
            n.median_ms,
            100.0 * n.median_ms / total.max(f64::MIN_POSITIVE),
            gmacs,
            n.kernel.as_deref().unwrap_or("")
        );
    }
    let mut by_op: Vec<(&str, f64, u64)> = Vec::new();
    for n in nodes {
        match by_op.iter_mut().find(|e| e.0 == n.op) {
            Some(e) => {
                e.1 += n.median_ms;
                e.2 += n.macs.unwrap_or(0);
            }
            None => by_op.push((n.op, n.median_ms, n.macs.unwrap_or(0))),
        }
    }
    by_op.sort_by(|a, b| b.1.total_cmp(&a.1));
    say!("per op (sum of node medians {total:.3} ms):");
    for (op, ms, macs) in by_op {
        let gmacs = if macs > 0 { format!(", {:.1} GMAC/s", macs as f64 / (ms * 1e6)) } else { String::new() };
        say!("  {op:<15} {ms:>9.4} ms {:>5.1}%{gmacs}", 100.0 * ms / total.max(f64::MIN_POSITIVE));
    }
}

fn report(
    model: &Path,
    int8: &Path,
    input: &Path,
    (json, plots): (Option<&Path>, Option<&Path>),
    smooth_with: Option<(f32, PathBuf, usize)>,
    shape: &ShapeArg,
    images: &ImageArgs,
) -> Result<(), String> {
    let m = import(model, shape, Some(input))?;
    let q = QuantizedModel::load(int8).map_err(|e| e.to_string())?;
    // A model of several inputs reads an .npz of one array per input, as `quantize` does.
    let names: Vec<String> = m.inputs.iter().map(|i| i.name.clone()).collect();
    let several = names.len() > 1;
    let one_shape = if several { Vec::new() } else { single_input(&m)? };
    let xs =
        if several { data::read_inputs(input, &names)? } else { vec![load_data(input, Some(&one_shape), images)?] };
    let mut float = m.graph;
    if let Some((alpha, calib, batch_size)) = smooth_with {
        let per_input: Vec<Vec<ArrayD<f32>>> = if several {
            data::input_batches(&data::read_inputs(&calib, &names)?, batch_size)
        } else {
            data::batches(&calib, batch_size, &images.prep(Some(&one_shape))?)?.into_iter().map(|b| vec![b]).collect()
        };
        smooth(&mut float, &per_input, alpha)?;
    }
    if q.plan().iter().any(|p| p.name.is_empty()) {
        return Err("the int8 model has unnamed layers".into());
    }
    qnn::fuse_graph(&mut float).map_err(|e| e.to_string())?;
    let rows = q.report_graph(&float, &xs).map_err(|e| e.to_string())?;
    say!("{:<48} {:<18} {:<8} {:>9} {:>10}", "layer", "kind", "mode", "SQNR dB", "weight dB");
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in &rows {
        let mode = match &r.mode {
            Mode::Int8 | Mode::Int8SameParams => "int8",
            Mode::Passthrough => "folded",
            Mode::Float(_) => "float",
            Mode::Dynamic => "dynamic",
        };
        say!("{:<48} {:<18} {:<8} {:>9} {:>10}", r.name, r.kind, mode, num(r.sqnr_db), num(r.weight_sqnr_db));
    }
    if let Some(j) = json {
        std::fs::write(j, qnn::report_json(&rows)).map_err(|e| format!("{}: {e}", j.display()))?;
        say!("wrote {}", j.display());
    }
    if let Some(dir) = plots {
        let bars: Vec<_> = rows.iter().map(|r| (r.name.clone(), r.sqnr_db, r.weight_sqnr_db)).collect();
        qnn::plots::write_files(dir, &[("sqnr.svg".to_string(), qnn::plots::sqnr_chart(&bars))])
            .map_err(|e| e.to_string())?;
        say!("wrote {}", dir.join("sqnr.svg").display());
    }
    Ok(())
}
