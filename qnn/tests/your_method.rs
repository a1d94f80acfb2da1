//! "My quantization method is different from PyTorch's, and my custom layers have to be
//! supported": the bundled digits model (trained in PyTorch), quantized the way the people
//! who asked would do it, without touching any layer's code. Each case prints its held-out
//! accuracy and the SQNR of its logits against the float model's (`cargo test --test
//! your_method -- --nocapture`), and holds them to a floor.

use ndarray::{ArrayD, Axis, IxDyn};
use qnn::ops::{register_int8_layer, LowerCx, OpReader, OpWriter};
use qnn::{load_safetensors, prepare, sqnr_db, zoo, FloatReason, Int8Layer, Mode, Module, NnError, QConfigMapping};
use qobserve::{Bits, Log2, PerGroup, PowerOfTwo, QConfig};
use qtensor::QParams;
use safetensors::SafeTensors;
use std::any::Any;

fn data(name: &str) -> ArrayD<f32> {
    let bytes = std::fs::read(format!("{}/data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("images").unwrap();
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn labels() -> Vec<usize> {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_test.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("labels").unwrap();
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize).collect()
}

fn accuracy(logits: &ArrayD<f32>) -> f64 {
    let labels = labels();
    let hits = logits
        .axis_iter(Axis(0))
        .zip(&labels)
        .filter(|(row, &l)| {
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            best == l
        })
        .count();
    hits as f64 / labels.len() as f64
}

/// The user's own classifier layer: a linear layer written from scratch, with PyTorch's
/// parameter names so the trained `fc2.weight` / `fc2.bias` load into it. `int8` says
/// whether it offers an int8 form.
#[derive(Debug)]
struct MyLinear {
    weight: ArrayD<f32>,
    bias: ArrayD<f32>,
    int8: bool,
}

impl MyLinear {
    fn new(inputs: usize, outputs: usize, int8: bool) -> Self {
        MyLinear { weight: ArrayD::zeros(IxDyn(&[outputs, inputs])), bias: ArrayD::zeros(IxDyn(&[outputs])), int8 }
    }
}

impl Module for MyLinear {
    fn kind(&self) -> &'static str {
        "MyLinear"
    }
    fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
        let (o, i) = (self.weight.shape()[0], self.weight.shape()[1]);
        if x.ndim() != 2 || x.shape()[1] != i {
            return Err(NnError::Shape {
                module: "MyLinear".into(),
                kind: "MyLinear",
                expected: format!("[batch, {i}]"),
                got: x.shape().to_vec(),
            });
        }
        let w = self.weight.view().into_shape_with_order((o, i)).unwrap();
        let x2 = x.view().into_shape_with_order((x.shape()[0], i)).unwrap();
        Ok((x2.dot(&w.t()) + self.bias.view().into_shape_with_order(o).unwrap()).into_dyn())
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![("weight", &self.weight), ("bias", &self.bias)]
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![("weight", &mut self.weight), ("bias", &mut self.bias)]
    }
    fn has_int8(&self) -> bool {
        self.int8
    }
    fn int8(&self, cx: &LowerCx<'_>) -> qnn::Result<Box<dyn Int8Layer>> {
        // The weights as the configuration quantizes them: whatever method the user chose.
        let w = cx.quantize_weight(&self.weight)?;
        let QParams::PerChannel(pc) = w.params() else {
            return Err(NnError::Config {
                module: cx.name.into(),
                reason: "MyLinear wants per-channel weights".into(),
            });
        };
        Ok(Box::new(MyLinearInt8 {
            weight: w.int_repr().iter().copied().collect(),
            scales: pc.scales().to_vec(),
            bias: self.bias.iter().copied().collect(),
            inputs: self.weight.shape()[1],
            in_q: (cx.in_q.scale, cx.in_q.zero_point),
            out_q: (cx.out_q().scale, cx.out_q().zero_point),
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Its int8 form: integer dot products, requantized in `f32`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct MyLinearInt8 {
    #[serde(skip)]
    weight: Vec<i8>,
    #[serde(skip)]
    scales: Vec<f32>,
    #[serde(skip)]
    bias: Vec<f32>,
    inputs: usize,
    in_q: (f32, i32),
    out_q: (f32, i32),
}

impl Int8Layer for MyLinearInt8 {
    fn forward_u8(&self, x: &[u8], shape: &[usize], _threads: usize) -> qnn::Result<(Vec<u8>, Vec<usize>)> {
        let outputs = self.scales.len();
        let mut y = Vec::with_capacity(x.len() / self.inputs * outputs);
        for row in x.chunks_exact(self.inputs) {
            for o in 0..outputs {
                let w = &self.weight[o * self.inputs..(o + 1) * self.inputs];
                let acc: i32 = row.iter().zip(w).map(|(&a, &b)| (a as i32 - self.in_q.1) * b as i32).sum();
                let real = acc as f32 * self.in_q.0 * self.scales[o] + self.bias[o];
                y.push(((real / self.out_q.0).round() as i32 + self.out_q.1).clamp(0, 255) as u8);
            }
        }
        Ok((y, vec![shape[0], outputs]))
    }
    fn weights(&self) -> Vec<(&'static str, ArrayD<f32>)> {
        let w: Vec<f32> =
            self.weight.iter().enumerate().map(|(i, &q)| q as f32 * self.scales[i / self.inputs]).collect();
        vec![("weight", ArrayD::from_shape_vec(IxDyn(&[self.scales.len(), self.inputs]), w).unwrap())]
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<qnn::Result<serde_json::Value>> {
        let o = self.scales.len();
        w.i8s(format!("{node}.weight"), vec![o, self.inputs], &self.weight);
        w.f32s(format!("{node}.scales"), vec![o], &self.scales);
        w.f32s(format!("{node}.bias"), vec![o], &self.bias);
        Some(Ok(serde_json::json!({ "node": node, "layer": serde_json::to_value(self).unwrap() })))
    }
}

fn load_my_linear(j: &serde_json::Value, r: &OpReader<'_>) -> qnn::Result<Box<dyn Int8Layer>> {
    let bad = |reason: String| NnError::File { file: String::new(), reason };
    let node = j["node"].as_str().ok_or_else(|| bad("MyLinear: no node".into()))?;
    let mut layer: MyLinearInt8 = serde_json::from_value(j["layer"].clone()).map_err(|e| bad(e.to_string()))?;
    layer.weight = r.i8s(&format!("{node}.weight"))?.1;
    layer.scales = r.f32s(&format!("{node}.scales"))?.1;
    layer.bias = r.f32s(&format!("{node}.bias"))?.1;
    if layer.weight.len() != layer.scales.len() * layer.inputs || layer.bias.len() != layer.scales.len() {
        return Err(bad("MyLinear: tensor sizes disagree".into()));
    }
    Ok(Box::new(layer))
}

/// The trained digits model with its classifier replaced by the user's own layer.
fn model(int8_classifier: bool) -> qnn::Sequential {
    let mut m = zoo::digits();
    for (name, layer) in m.layers_mut() {
        if name == "fc2" {
            *layer = Box::new(MyLinear::new(64, 10, int8_classifier));
        }
    }
    load_safetensors(&mut m, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    m
}

/// The float model fused as `prepare` fuses it, to compare the converted one against.
fn twin(int8_classifier: bool) -> qnn::Sequential {
    let mut m = model(int8_classifier);
    qnn::fuse(&mut m).unwrap();
    m
}

fn calibrated(mapping: &QConfigMapping, int8_classifier: bool) -> qnn::Prepared {
    let mut p = prepare(model(int8_classifier), mapping).unwrap();
    p.calibrate(&data("calib.safetensors")).unwrap();
    p
}

/// Accuracy and SQNR of `logits` against the float model, printed and returned.
fn score(case: &str, logits: &ArrayD<f32>) -> (f64, f64) {
    let float = model(false).forward(&data("digits_test.safetensors")).unwrap();
    let (acc, db) = (accuracy(logits), sqnr_db(&float, logits));
    println!("{case:<46} accuracy {:5.1}%  SQNR {db:5.1} dB", acc * 100.0);
    (acc, db)
}

#[test]
fn the_float_model_with_a_custom_layer_matches_the_trained_one() {
    let (acc, _) = score("float, custom classifier", &model(false).forward(&data("digits_test.safetensors")).unwrap());
    let mut original = zoo::digits();
    load_safetensors(&mut original, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    assert_eq!(acc, accuracy(&original.forward(&data("digits_test.safetensors")).unwrap()));
    assert!(acc > 0.98, "{acc}");
}

/// A custom layer without an int8 form runs in float between automatic boundaries, and the
/// plan and the report say so.
#[test]
fn a_custom_layer_without_int8_falls_back_to_float_and_is_reported() {
    let q = calibrated(&QConfigMapping::new(QConfig::default()), false).convert().unwrap();
    let fc2 = q.plan().iter().find(|e| e.name == "fc2").unwrap();
    assert_eq!(fc2.mode, Mode::Float(FloatReason::NoInt8 { kind: "MyLinear".into() }));
    let x = data("digits_test.safetensors");
    let (acc, db) = score("custom layer in float (no int8 form)", &q.forward(&x).unwrap());
    assert!(acc >= 0.98 && db >= 33.0, "{acc} {db}");
    let report = q.report(&twin(false), &x).unwrap();
    let row = report.iter().find(|r| r.name == "fc2").unwrap();
    assert!(matches!(row.mode, Mode::Float(FloatReason::NoInt8 { .. })) && row.sqnr_db.is_some(), "{row:?}");
}

/// A custom layer with an int8 form runs in int8 with the configured weight quantization,
/// reports its weight SQNR, and saves and loads once its loader is registered.
#[test]
fn a_custom_layer_with_int8_runs_in_int8_reports_its_weights_and_saves() {
    let q = calibrated(&QConfigMapping::new(QConfig::default()), true).convert().unwrap();
    assert!(q.plan().iter().all(|e| !matches!(e.mode, Mode::Float(_))), "{:?}", q.plan());
    let x = data("digits_test.safetensors");
    let y = q.forward(&x).unwrap();
    let (acc, db) = score("custom layer in int8", &y);
    assert!(acc >= 0.98 && db >= 33.0, "{acc} {db}");
    let report = q.report(&twin(true), &x).unwrap();
    let fc2 = report.iter().find(|r| r.name == "fc2").unwrap();
    let w_db = fc2.weight_sqnr_db.expect("the custom layer's weights are compared");
    println!("  fc2 (MyLinear) weight SQNR {w_db:.1} dB");
    assert!(w_db > 35.0 && w_db.is_finite(), "{w_db}");

    let path = std::env::temp_dir().join(format!("qrust-your-method-{}.safetensors", std::process::id()));
    q.save(&path).unwrap();
    // Not yet registered in this process (each test binary has its own registry): the error
    // names the layer and the call to make.
    let before = qnn::QuantizedModel::load(&path);
    if let Err(e) = &before {
        let e = e.to_string();
        assert!(e.contains("MyLinear") && e.contains("register_int8_layer"), "{e}");
    }
    let _ = register_int8_layer("MyLinear", load_my_linear);
    let loaded = qnn::QuantizedModel::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.forward(&x).unwrap(), y, "the loaded model computes the same bits");
}

/// Power-of-two scales on every activation and weight: every tensor still runs in int8, and
/// every scale the model uses is a power of two.
#[test]
fn a_power_of_two_method_runs_in_int8() {
    let pot = QConfig::default().with_activation_quantizer(PowerOfTwo).with_weight_quantizer(PowerOfTwo);
    let mut p = calibrated(&QConfigMapping::new(pot), true);
    let x = data("digits_test.safetensors");
    let simulated = p.simulate(&x).unwrap();
    let q = p.convert().unwrap();
    assert!(q.plan().iter().all(|e| !matches!(e.mode, Mode::Float(_))), "{:?}", q.plan());
    let pow2 = |s: f32| s.log2().fract() == 0.0;
    assert!(pow2(q.input_quant().scale));
    assert!(q.output_quants().iter().all(|(_, o)| pow2(o.scale)), "{:?}", q.output_quants());
    let y = q.forward(&x).unwrap();
    let (acc, db) = score("power-of-two scales (int8)", &y);
    score("power-of-two scales (simulated)", &simulated);
    assert!(acc >= 0.98 && db >= 30.0, "{acc} {db}");
    // Simulation predicts the int8 model.
    let agree = sqnr_db(&y, &simulated);
    assert!(agree > 35.0, "simulation against int8: {agree:.1} dB");
}

/// 4-bit weights with one scale per group of 16 input features: no int8 kernel sums under
/// several scales, so those layers run in float on their 4-bit weights, the plan says why,
/// and the converted model computes what simulation predicted.
#[test]
fn four_bit_per_group_weights_run_as_weight_only_quantization() {
    let mapping = QConfigMapping::new(QConfig::default())
        .set_kind("Linear", QConfig::default().with_weight_quantizer(PerGroup::new(16, 4).unwrap()));
    let mut p = calibrated(&mapping, true);
    let fc1 = p.plan().iter().find(|e| e.name == "fc1").unwrap();
    let Mode::Float(reason @ FloatReason::SimulatedOnly { quantizer, .. }) = &fc1.mode else { panic!("{fc1:?}") };
    assert!(quantizer.contains("4-bit per-group") && reason.to_string().contains("simulated only"), "{reason}");
    let x = data("digits_test.safetensors");
    let simulated = p.simulate(&x).unwrap();
    let q = p.convert().unwrap();
    let y = q.forward(&x).unwrap();
    let (acc, db) = score("4-bit per-group weights on fc1 (converted)", &y);
    score("4-bit per-group weights on fc1 (simulated)", &simulated);
    assert!(acc >= 0.97 && db >= 20.0, "{acc} {db}");
    let agree = sqnr_db(&y, &simulated);
    assert!(agree > 35.0, "simulation against the converted model: {agree:.1} dB");
    // The report shows the 4-bit weights' error.
    let report = q.report(&twin(true), &x).unwrap();
    let w_db = report.iter().find(|r| r.name == "fc1").unwrap().weight_sqnr_db.expect("fc1's weights differ");
    println!("  fc1 4-bit per-group weight SQNR {w_db:.1} dB");
    assert!((15.0..30.0).contains(&w_db), "{w_db}");
    // Saved and loaded, the 4-bit weights come back as they were quantized.
    let bytes = q.to_bytes().unwrap();
    assert_eq!(qnn::QuantizedModel::from_bytes(&bytes).unwrap().forward(&x).unwrap(), y);
    // Strict mode names it.
    let strict = mapping.clone().strict(true);
    let e = calibrated(&strict, true).convert().unwrap_err().to_string();
    assert!(e.contains("fc1 (Linear)") && e.contains("simulated only"), "{e}");
}

/// A log2 grid: on weights, the layers run in float on their log2 weights (no int8 kernel
/// multiplies by a non-uniform grid) and compute what simulation predicted; on activations,
/// simulation measures it and convert refuses, naming the tensor and what to do.
#[test]
fn a_log2_method_is_measured_in_simulation() {
    let x = data("digits_test.safetensors");
    let weights = QConfig::default().with_weight_quantizer(Log2::new(6).unwrap());
    let mut p = calibrated(&QConfigMapping::new(weights), true);
    let simulated = p.simulate(&x).unwrap();
    // Powers of two are coarse near each tensor's largest magnitude (nothing between it and
    // its half): 95.6% and 7.6 dB when written, against 99.0% and 35.8 dB for affine.
    let (acc, db) = score("6-bit log2 weights (simulated)", &simulated);
    assert!(acc >= 0.94 && db >= 6.0, "{acc} {db}");
    let q = p.convert().unwrap();
    let conv1 = q.plan().iter().find(|e| e.name == "conv1").unwrap();
    assert!(
        matches!(&conv1.mode, Mode::Float(FloatReason::SimulatedOnly { quantizer, .. }) if quantizer.contains("log2"))
    );
    let y = q.forward(&x).unwrap();
    score("6-bit log2 weights (converted, weight-only)", &y);
    let agree = sqnr_db(&y, &simulated);
    assert!(agree > 35.0, "simulation against the converted model: {agree:.1} dB");

    let activations = QConfig::default().with_activation_quantizer(Log2::new(8).unwrap());
    let mut p = calibrated(&QConfigMapping::new(activations), true);
    let (acc, _) = score("8-bit log2 activations (simulated)", &p.simulate(&x).unwrap());
    assert!(acc >= 0.9, "{acc}");
    let e = p.convert().unwrap_err().to_string();
    assert!(e.contains("model input") && e.contains("log2") && e.contains("Prepared::simulate"), "{e}");
}

/// 4-bit activations (`Bits`) run in int8 with every output clamped to 16 codes.
#[test]
fn four_bit_activations_are_clamped_to_their_range() {
    let four = QConfig::default().with_activation_quantizer(Bits::new(4).unwrap());
    let mut p = calibrated(&QConfigMapping::new(four), true);
    let x = data("digits_test.safetensors");
    let simulated = p.simulate(&x).unwrap();
    let q = p.convert().unwrap();
    let qnn::Value::U8 { data, .. } = q.forward_value(&x).unwrap() else { panic!("int8 logits") };
    assert!(data.iter().all(|&c| c <= 15), "codes above 15: {:?}", data.iter().max());
    let y = q.forward(&x).unwrap();
    let (acc, _) = score("4-bit activations (int8)", &y);
    score("4-bit activations (simulated)", &simulated);
    assert!(acc >= 0.8, "{acc}");
    let agree = sqnr_db(&y, &simulated);
    assert!(agree > 20.0, "simulation against int8: {agree:.1} dB");
}
