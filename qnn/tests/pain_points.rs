//! PyTorch's worst quantization errors, each with the message that says what to do instead.

use std::any::Any;

use ndarray::{ArrayD, IxDyn};
use qnn::layers::{Conv2d, Flatten, Linear, ReLU};
use qnn::{fuse, load_safetensors, prepare, zoo, Mode, Module, NnError, QConfigMapping, QuantizedModel, Sequential};
use qobserve::QConfig;

fn digits() -> Sequential {
    let mut m = zoo::digits();
    load_safetensors(&mut m, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    m
}

fn inputs(n: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[n, 1, 8, 8]), |i| ((i[0] * 7 + i[2] * 8 + i[3]) % 17) as f32 / 16.0)
}

fn calibrated(model: Sequential, mapping: &QConfigMapping) -> QuantizedModel {
    let mut p = prepare(model, mapping).unwrap();
    p.calibrate(&inputs(16)).unwrap();
    p.convert().unwrap()
}

/// PyTorch: "No function is registered for ... QuantizedCPU" when a BatchNorm was not fused.
/// Here `prepare` fuses by default: forgetting `fuse` costs nothing.
#[test]
fn forgetting_to_fuse_costs_nothing() {
    let x = inputs(8);
    let mut fused_by_hand = digits();
    fuse(&mut fused_by_hand).unwrap();
    let want = calibrated(fused_by_hand, &QConfigMapping::new(QConfig::default())).forward(&x).unwrap();
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap(); // not fused
    let patterns: Vec<&str> = p.fused().iter().map(|f| f.pattern.as_str()).collect();
    assert_eq!(patterns, ["Conv2d+BatchNorm2d+ReLU", "Conv2d+BatchNorm2d+ReLU", "Linear+ReLU"]);
    assert!(p.plan().iter().all(|e| !matches!(e.mode, Mode::Float(_))), "{:?}", p.plan());
    p.calibrate(&inputs(16)).unwrap();
    assert_eq!(p.convert().unwrap().forward(&x).unwrap(), want, "the same model as fused by hand");
}

/// With fusion turned off, an unfused batch-norm runs in float between automatic boundaries,
/// and the plan says why; strict mode refuses it, naming it.
#[test]
fn an_unfused_batch_norm_runs_in_float_and_is_reported() {
    let q = calibrated(digits(), &QConfigMapping::new(QConfig::default()).fusion(false));
    let bn = q.plan().iter().find(|e| e.name == "bn1").unwrap();
    assert!(matches!(&bn.mode, Mode::Float(qnn::FloatReason::Unfused { kind }) if kind == "BatchNorm2d"), "{bn:?}");
    let Mode::Float(why) = &bn.mode else { panic!("{bn:?}") };
    let why = why.to_string();
    assert!(why.contains("not fused") && why.contains("fuse first"), "{why}");
    let y = q.forward(&inputs(2)).unwrap();
    assert_eq!(y.shape(), &[2, 10]);
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default()).fusion(false).strict(true)).unwrap();
    p.calibrate(&inputs(4)).unwrap();
    let e = p.convert().unwrap_err().to_string();
    assert!(e.contains("bn1 (BatchNorm2d)") && e.contains("bn2 (BatchNorm2d)") && e.contains("not fused"), "{e}");
    // Strict with nothing in float converts.
    let mut p = prepare(digits(), &QConfigMapping::new(QConfig::default()).strict(true)).unwrap();
    p.calibrate(&inputs(4)).unwrap();
    assert!(p.convert().is_ok());
}

/// The model input's observer is configured by the input's name (or the kind "input").
#[test]
fn the_model_input_is_configured_by_name() {
    use qobserve::ObserverSpec;
    let fixed = |scale: f32, zero_point: i32| {
        QConfig::new(ObserverSpec::FixedQParams { scale, zero_point }, QConfig::default().weight)
    };
    let q = calibrated(digits(), &QConfigMapping::new(QConfig::default()).set_name("input", fixed(0.5, 3)));
    assert_eq!((q.input_quant().scale, q.input_quant().zero_point), (0.5, 3));
    let q = calibrated(digits(), &QConfigMapping::new(QConfig::default()).set_kind("input", fixed(0.25, 7)));
    assert_eq!((q.input_quant().scale, q.input_quant().zero_point), (0.25, 7));
    // A graph's inputs by their own names.
    let mut g = qnn::GraphBuilder::new();
    let x = g.input("pixels");
    let y = g.layer("conv", Conv2d::new(1, 2, 1), x).unwrap();
    g.output(y);
    let mut p =
        prepare(g.build().unwrap(), &QConfigMapping::new(QConfig::default()).set_name("pixels", fixed(0.125, 9)))
            .unwrap();
    p.calibrate(&inputs(2)).unwrap();
    let q = p.convert().unwrap();
    assert_eq!((q.input_quant().scale, q.input_quant().zero_point), (0.125, 9));
}

/// A report against a float twin that was not fused as the converted model was: an error
/// naming the first node that differs, not a meaningless SQNR.
#[test]
fn report_refuses_an_unfused_twin() {
    let q = calibrated(digits(), &QConfigMapping::new(QConfig::default()));
    let e = q.report(&digits(), &inputs(2)).unwrap_err().to_string();
    assert!(e.contains("bn1") && e.contains("BatchNorm2d") && e.contains("fuse the twin"), "{e}");
    let mut twin = digits();
    fuse(&mut twin).unwrap();
    assert_eq!(q.report(&twin, &inputs(2)).unwrap().len(), q.plan().len());
}

/// A user's layer with no int8 implementation: runs in float, reported, the rest in int8.
#[derive(Debug)]
struct Scale2x;

impl Module for Scale2x {
    fn kind(&self) -> &'static str {
        "Scale2x"
    }
    fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
        Ok(x * 2.0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[test]
fn a_custom_layer_without_int8_runs_in_float() {
    let mut model = Sequential::new()
        .add("conv", Conv2d::new(1, 4, 3).padding(1))
        .add("relu", ReLU)
        .add("scale", Scale2x)
        .add("flatten", Flatten)
        .add("fc", Linear::new(4 * 8 * 8, 3));
    fuse(&mut model).unwrap();
    let q = calibrated(model, &QConfigMapping::new(QConfig::default()));
    let modes: Vec<(&str, &Mode)> = q.plan().iter().map(|e| (e.name.as_str(), &e.mode)).collect();
    assert_eq!(modes[0], ("conv", &Mode::Int8));
    assert!(matches!(modes[2].1, Mode::Float(qnn::FloatReason::NoInt8 { kind }) if kind == "Scale2x"), "{modes:?}");
    assert_eq!(modes[4], ("fc", &Mode::Int8));
    assert_eq!(q.forward(&inputs(1)).unwrap().shape(), &[1, 3]);
}

/// PyTorch silently uses scale 1.0, zero point 0 for an observer that saw nothing.
#[test]
fn converting_without_calibration_is_an_error() {
    let p = prepare(digits(), &QConfigMapping::new(QConfig::default())).unwrap();
    let e = p.convert().unwrap_err().to_string();
    assert!(e.contains("observer for model input saw no data: did calibration run"), "{e}");
}

/// PyTorch: "'Sequential' object has no attribute 'conv_1'".
#[test]
fn a_configuration_naming_a_missing_module_is_an_error() {
    let e = prepare(digits(), &QConfigMapping::new(QConfig::default()).skip_name("fc_2")).unwrap_err();
    assert!(matches!(e, NnError::UnknownModule { .. }));
    assert!(e.to_string().contains("did you mean fc2"), "{e}");
}

#[test]
fn a_wrongly_shaped_input_names_the_module_and_shapes() {
    let mut model = digits();
    fuse(&mut model).unwrap();
    let q = calibrated(model, &QConfigMapping::new(QConfig::default()));
    let e = q.forward(&ArrayD::zeros(IxDyn(&[1, 3, 8, 8]))).unwrap_err().to_string();
    assert!(e.starts_with("conv1:") && e.contains("[1, 8, 8, 1]") && e.contains("[1, 8, 8, 3]"), "{e}");
}

#[test]
fn skipping_by_name_keeps_a_module_in_float() {
    let mut model = digits();
    fuse(&mut model).unwrap();
    let q = calibrated(model, &QConfigMapping::new(QConfig::default()).skip_name("fc2"));
    let fc2 = q.plan().iter().find(|e| e.name == "fc2").unwrap();
    assert!(matches!(&fc2.mode, Mode::Float(qnn::FloatReason::Configured)));
    assert_eq!(q.forward(&inputs(3)).unwrap().shape(), &[3, 10]);
}

#[test]
fn the_converted_model_is_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QuantizedModel>();
    let mut model = digits();
    fuse(&mut model).unwrap();
    let q = calibrated(model, &QConfigMapping::new(QConfig::default()));
    let x = inputs(4);
    let reference = q.forward_value(&x).unwrap().to_f32();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..20 {
                    assert_eq!(q.forward_value(&x).unwrap().to_f32(), reference);
                }
            });
        }
    });
}

/// The same layer with its own int8 implementation (a lookup table): it runs in int8.
#[derive(Debug)]
struct Scale2xInt8;

#[derive(Debug)]
struct Scale2xTable(qkernels::Lut);

impl qnn::Int8Layer for Scale2xTable {
    fn forward_u8(&self, x: &[u8], shape: &[usize], _threads: usize) -> qnn::Result<(Vec<u8>, Vec<usize>)> {
        let mut y = vec![0u8; x.len()];
        self.0.apply(x, &mut y).map_err(|e| NnError::Op { module: String::new(), source: e })?;
        Ok((y, shape.to_vec()))
    }
}

impl Module for Scale2xInt8 {
    fn kind(&self) -> &'static str {
        "Scale2x"
    }
    fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
        Ok(x * 2.0)
    }
    fn has_int8(&self) -> bool {
        true
    }
    fn int8(&self, cx: &qnn::ops::LowerCx<'_>) -> qnn::Result<Box<dyn qnn::Int8Layer>> {
        Ok(Box::new(Scale2xTable(qkernels::Lut::from_fn(cx.in_q, cx.out_q(), |v| 2.0 * v))))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[test]
fn a_custom_layer_with_its_own_int8_runs_in_int8() {
    let build = |custom: Box<dyn Module>| {
        let mut model = Sequential::new().add("conv", Conv2d::new(1, 4, 3).padding(1)).add("relu", ReLU);
        model.push("scale", custom);
        let mut model = model.add("flatten", Flatten).add("fc", Linear::new(4 * 8 * 8, 3));
        qnn::zoo::randomize(&mut model, 3);
        model
    };
    let float = build(Box::new(Scale2xInt8));
    let want = float.forward(&inputs(2)).unwrap();
    let mut model = build(Box::new(Scale2xInt8));
    fuse(&mut model).unwrap();
    let q = calibrated(model, &QConfigMapping::new(QConfig::default()));
    let scale = q.plan().iter().find(|e| e.name == "scale").unwrap();
    assert_eq!(scale.mode, Mode::Int8);
    let got = q.forward(&inputs(2)).unwrap();
    assert!(qnn::sqnr_db(&want, &got) > 25.0, "SQNR {}", qnn::sqnr_db(&want, &got));
}

/// The same for a model with residual blocks, pooled buffers, cached plans and layers that
/// split their work over two threads each: every call from every thread gives the bits of a
/// single-threaded call.
#[test]
fn a_residual_model_with_split_layers_is_shared_between_threads() {
    let mut model = zoo::resnet18(10);
    zoo::randomize(&mut model, 21);
    fuse(&mut model).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 32, 32]), |i| {
        ((i[0] * 3 + i[1] * 5 + i[2] * 7 + i[3]) % 29) as f32 / 14.0 - 1.0
    });
    let mut p = prepare(model, &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let mut q = p.convert().unwrap();
    let qnn::Value::U8 { data: reference, .. } = q.forward_value(&x).unwrap() else { panic!() };
    q.set_threads(2);
    let q = &q;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (x, reference) = (&x, &reference);
            s.spawn(move || {
                for call in 0..5 {
                    let qnn::Value::U8 { data, .. } = q.forward_value(x).unwrap() else { panic!() };
                    assert!(data == *reference, "thread {t}, call {call}");
                }
            });
        }
    });
}

/// A batch of at least as many images as threads is split between them, each thread running
/// the whole model on its share (shares may be uneven): the bits of one thread, for a model
/// ending in int8 and one ending in float, and each image's output is what it gets alone.
#[test]
fn a_batch_split_between_threads_gives_the_bits_of_one_thread() {
    for keep_classifier_float in [false, true] {
        let mut model = zoo::mobilenet_v2(10);
        zoo::randomize(&mut model, 4);
        fuse(&mut model).unwrap();
        let x = ArrayD::from_shape_fn(IxDyn(&[5, 3, 32, 32]), |i| {
            ((i[0] * 13 + i[1] * 5 + i[2] * 7 + i[3]) % 31) as f32 / 15.0 - 1.0
        });
        let mut mapping = QConfigMapping::new(QConfig::default());
        if keep_classifier_float {
            mapping = mapping.skip_name("classifier.1");
        }
        let mut p = prepare(model, &mapping).unwrap();
        p.calibrate(&x).unwrap();
        let mut q = p.convert().unwrap();
        let one = q.forward(&x).unwrap();
        for i in 0..5 {
            let alone = q.forward(&x.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned().into_dyn()).unwrap();
            assert_eq!(alone, one.slice(ndarray::s![i..i + 1, ..]).into_dyn(), "image {i}");
        }
        for threads in [2, 3, 5, 8] {
            q.set_threads(threads);
            assert_eq!(q.forward(&x).unwrap(), one, "{threads} threads, float classifier: {keep_classifier_float}");
        }
    }
}

/// A custom layer may mix the images of a batch (this one subtracts the batch mean), so a
/// model holding one is never split by batch: every thread count gives one thread's result.
#[test]
fn a_model_with_a_custom_layer_is_not_split_by_batch() {
    #[derive(Debug)]
    struct MinusBatchMean;
    impl Module for MinusBatchMean {
        fn kind(&self) -> &'static str {
            "MinusBatchMean"
        }
        fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
            let mean = x.mean_axis(ndarray::Axis(0)).unwrap();
            Ok(x - &mean)
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }
    let mut model = Sequential::new()
        .add("conv", Conv2d::new(1, 4, 3).padding(1))
        .add("center", MinusBatchMean)
        .add("relu", ReLU)
        .add("flatten", Flatten)
        .add("fc", Linear::new(4 * 8 * 8, 3));
    zoo::randomize(&mut model, 9);
    let mut q = calibrated(model, &QConfigMapping::new(QConfig::default()));
    let one = q.forward(&inputs(4)).unwrap();
    q.set_threads(2);
    assert_eq!(q.forward(&inputs(4)).unwrap(), one);
}
