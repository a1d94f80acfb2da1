//! A converted model saved and loaded gives the same bits; damaged files are errors.

use ndarray::{ArrayD, IxDyn};
use qnn::{fuse, load_safetensors, prepare, zoo, QConfigMapping, QuantizedModel};
use qobserve::QConfig;

fn x(n: usize, c: usize, hw: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[n, c, hw, hw]), |i| {
        ((i[0] * 5 + i[1] * 11 + i[2] * 7 + i[3]) % 23) as f32 / 11.0 - 1.0
    })
}

fn convert(mut m: qnn::Sequential, input: &ArrayD<f32>) -> QuantizedModel {
    fuse(&mut m).unwrap();
    let mut p = prepare(m, &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(input).unwrap();
    p.convert().unwrap()
}

#[test]
fn saved_models_load_and_run_identically() {
    let mut digits = zoo::digits();
    load_safetensors(&mut digits, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
    let mut r18 = zoo::resnet18(10);
    zoo::randomize(&mut r18, 5);
    let mut mbv2 = zoo::mobilenet_v2(10);
    zoo::randomize(&mut mbv2, 6);
    for (name, model, input) in
        [("digits", digits, x(3, 1, 8)), ("resnet18", r18, x(1, 3, 32)), ("mobilenet_v2", mbv2, x(1, 3, 32))]
    {
        let q = convert(model, &input);
        let dir = std::env::temp_dir().join(format!("qrust-saved-{}-{name}.safetensors", std::process::id()));
        q.save(&dir).unwrap();
        let back = QuantizedModel::load(&dir).unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(back.plan(), q.plan(), "{name}");
        let (a, b) = (q.forward_value(&input).unwrap(), back.forward_value(&input).unwrap());
        let (qnn::Value::U8 { data: da, q: qa, .. }, qnn::Value::U8 { data: db, q: qb, .. }) = (a, b) else { panic!() };
        assert_eq!((&da, qa), (&db, qb), "{name}");
        // Layers split over threads: the same bits.
        let mut back = back;
        back.set_threads(2);
        let qnn::Value::U8 { data: dt, .. } = back.forward_value(&input).unwrap() else { panic!() };
        assert_eq!(dt, da, "{name}, 2 threads");
    }
}

#[test]
fn the_int8_file_is_about_a_quarter_of_the_float_one() {
    let mut m = zoo::resnet18(1000);
    zoo::randomize(&mut m, 1);
    let f32_bytes: usize = qnn::parameter_shapes(&m).iter().map(|(_, s)| s.iter().product::<usize>() * 4).sum();
    let q = convert(m, &x(1, 3, 32));
    let int8_bytes = q.to_bytes().unwrap().len();
    let ratio = int8_bytes as f64 / f32_bytes as f64;
    eprintln!("resnet18: f32 parameters {f32_bytes} bytes, int8 file {int8_bytes} bytes ({:.1}%)", ratio * 100.0);
    assert!(ratio <= 0.26, "{ratio}");
}

#[test]
fn damaged_files_are_errors_not_panics() {
    let q = convert(zoo::digits(), &x(2, 1, 8));
    let bytes = q.to_bytes().unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        assert!(QuantizedModel::from_bytes(&bytes[..cut]).is_err(), "truncated at {cut}");
    }
    let e = QuantizedModel::from_bytes(b"not a model at all, definitely not").unwrap_err().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    // A valid safetensors file that is not a model.
    let plain = safetensors::serialize(Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(), None).unwrap();
    let e = QuantizedModel::from_bytes(&plain).unwrap_err().to_string();
    assert!(e.contains("no qrust.model metadata"), "{e}");
    let e = QuantizedModel::load("/nonexistent/model.safetensors").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
}

/// `bytes` with its model description passed through `edit` (the tensors unchanged).
fn edited(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut desc: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["qrust.model"]).unwrap();
    edit(&mut desc);
    let meta: std::collections::HashMap<String, String> = [("qrust.model".to_string(), desc.to_string())].into();
    safetensors::serialize(st.tensors(), Some(meta)).unwrap()
}

#[test]
fn hostile_geometry_is_refused_before_allocating() {
    let q = convert(zoo::digits(), &x(2, 1, 8));
    let bytes = q.to_bytes().unwrap();
    let input = x(1, 1, 8);
    // Padding of 2^31 on the first convolution: a 2^32 x 2^32 output (the product would also
    // overflow usize with enough channels).
    let huge = edited(&bytes, |d| d["nodes"][0]["attrs"]["padding"] = serde_json::json!([1u64 << 31, 1u64 << 31]));
    let model = QuantizedModel::from_bytes(&huge).unwrap();
    let e = model.forward(&input).unwrap_err();
    assert!(matches!(e, qnn::NnError::Limit { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("conv1") && e.contains("Conv2d output of shape") && e.contains("set_max_activation_bytes"),
        "{e}"
    );
    // Within the default budget but above a server's own: refused too; the model itself runs.
    let mut model = QuantizedModel::from_bytes(&bytes).unwrap();
    model.set_max_activation_bytes(1000);
    let e = model.forward(&input).unwrap_err().to_string();
    assert!(e.contains("conv1") && e.contains("[1, 8, 8, 16]") && e.contains("1000 bytes"), "{e}");
    model.set_max_activation_bytes(qnn::DEFAULT_MAX_ACTIVATION_BYTES);
    assert_eq!(model.forward(&input).unwrap(), q.forward(&input).unwrap());
    // A pool output of 2^20 x 2^20: refused.
    let pool = edited(&bytes, |d| {
        let nodes = d["nodes"].as_array_mut().unwrap();
        let p = nodes.iter_mut().find(|n| n["name"] == "pool").unwrap();
        p["attrs"]["window"]["Adaptive"] = serde_json::json!([1u64 << 20, 1u64 << 20]);
    });
    let e = QuantizedModel::from_bytes(&pool).unwrap().forward(&input).unwrap_err().to_string();
    assert!(e.contains("pool") && e.contains("AdaptiveAvgPool2d output"), "{e}");
}

#[test]
fn fuzz_regressions_replay() {
    // Inputs the fuzzers (`cargo xtask fuzz`) once failed on, and the seeds' shapes: each must
    // give an answer or an error through the very code the fuzz targets run.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut n = 0;
    for (target, run) in
        [("load_model", qnn::fuzzing::saved_model as fn(&[u8])), ("load_state_dict", qnn::fuzzing::state_dict)]
    {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            eprintln!("replaying {}", path.display());
            run(&std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    // The committed seeds themselves go through the same code.
    let q = convert(zoo::digits(), &x(2, 1, 8));
    qnn::fuzzing::saved_model(&q.to_bytes().unwrap());
    qnn::fuzzing::state_dict(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap(),
    );
    eprintln!("{n} regression inputs replayed");
}

/// A layer kept in float is saved with its geometry: a hostile one is refused before its
/// float forward allocates (shape inference against the activation budget), and a degenerate
/// one is an error, not a panic.
#[test]
fn hostile_float_layers_are_refused_before_allocating() {
    let mut m = zoo::digits();
    fuse(&mut m).unwrap();
    let mut p = prepare(m, &QConfigMapping::new(QConfig::default()).skip_name("conv1")).unwrap();
    p.calibrate(&x(2, 1, 8)).unwrap();
    let q = p.convert().unwrap();
    let bytes = q.to_bytes().unwrap();
    let input = x(1, 1, 8);
    let conv1 = |d: &mut serde_json::Value| -> serde_json::Value {
        let n = d["nodes"].as_array().unwrap().iter().position(|n| n["name"] == "conv1").unwrap();
        assert_eq!(d["nodes"][n]["op"], "Float");
        serde_json::json!(n)
    };
    let huge = edited(&bytes, |d| {
        let n = conv1(d).as_u64().unwrap() as usize;
        d["nodes"][n]["attrs"]["attrs"]["padding"] = serde_json::json!([1u64 << 31, 1u64 << 31]);
    });
    let e = QuantizedModel::from_bytes(&huge).unwrap().forward(&input).unwrap_err();
    assert!(matches!(e, qnn::NnError::Limit { .. }), "{e:?}");
    assert!(e.to_string().contains("conv1"), "{e}");
    for (field, value) in [
        ("stride", serde_json::json!([0, 1])),
        ("dilation", serde_json::json!([1, 0])),
        ("groups", serde_json::json!(0)),
    ] {
        let bad = edited(&bytes, |d| {
            let n = conv1(d).as_u64().unwrap() as usize;
            d["nodes"][n]["attrs"]["attrs"][field] = value.clone();
        });
        // Refused when loading (the float kernel cannot be prepared), or at the latest when run.
        let e = match QuantizedModel::from_bytes(&bad) {
            Err(e) => e.to_string(),
            Ok(q) => q.forward(&input).unwrap_err().to_string(),
        };
        assert!(e.contains("conv1") && e.contains("(Conv2d)"), "{field}: {e}");
    }
}

/// A layer norm over the last axis (ConvNeXt's, on channels-last activations) runs in float
/// between int8 layers, computes PyTorch's formula, and saves and loads with its model.
/// LayerNorm over the channels of a permuted (4-D, stored NHWC) image: in int8 by default,
/// in float when skipped; both save and load.
#[test]
fn layer_norm_runs_in_int8_or_float_and_saves() {
    use qnn::layers::{Conv2d, LayerNorm, Permute};
    let mut ln = LayerNorm::new(4);
    ln.weight = ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 0.5, -1.0, 2.0]).unwrap();
    ln.bias = ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.0, 0.1, 0.2, -0.3]).unwrap();
    let input = x(2, 4, 5);
    // The formula, on one vector.
    let v = [1.0f32, 2.0, 4.0, -3.0];
    let y = qnn::Module::forward(&ln, &ArrayD::from_shape_vec(IxDyn(&[1, 4]), v.to_vec()).unwrap()).unwrap();
    let mean = v.iter().sum::<f32>() / 4.0;
    let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / 4.0;
    for (i, got) in y.iter().enumerate() {
        let want = (v[i] - mean) / (var + 1e-5).sqrt() * ln.weight[i] + ln.bias[i];
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    let graph = || {
        let mut g = qnn::GraphBuilder::new();
        let t = g.input("x");
        let t = g.layer("conv", Conv2d::new(4, 4, 3).padding(1), t).unwrap();
        let t = g.layer("to_nhwc", Permute { dims: vec![0, 2, 3, 1] }, t).unwrap();
        let t = g.layer("norm", ln.clone(), t).unwrap();
        let t = g.layer("to_nchw", Permute { dims: vec![0, 3, 1, 2] }, t).unwrap();
        let t = g.layer("conv2", Conv2d::new(4, 4, 1), t).unwrap();
        g.output(t);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 3);
        graph
    };
    let float = graph().run(std::slice::from_ref(&input)).unwrap().remove(0);
    for skip in [false, true] {
        let mut mapping = QConfigMapping::new(QConfig::default());
        if skip {
            mapping = mapping.skip_name("norm");
        }
        let mut p = prepare(graph(), &mapping).unwrap();
        p.calibrate(&input).unwrap();
        let q = p.convert().unwrap();
        let mode = q.plan().iter().find(|e| e.name == "norm").unwrap().mode.clone();
        assert!(if skip { matches!(mode, qnn::Mode::Float(_)) } else { mode == qnn::Mode::Int8 }, "{mode:?}");
        let got = q.forward(&input).unwrap();
        let noise: f32 = float.iter().zip(&got).map(|(a, b)| (a - b) * (a - b)).sum();
        let db = 10.0 * (float.iter().map(|a| a * a).sum::<f32>() / noise).log10();
        assert!(db > 25.0, "skip {skip}: SQNR {db:.1} dB");
        let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
        assert_eq!(back.forward(&input).unwrap(), got);
    }
}

/// An image as rows of channels and back (ConvNeXt's channels-last MLP, as qonnx imports
/// it): the float layers are `permute(0, 2, 3, 1).reshape(-1, c)` and its inverse, the int8
/// model keeps the bytes where they are and matches the same graph written with permutes,
/// and it saves and loads.
#[test]
fn image_rows_move_nothing_and_match_permutes() {
    use qnn::layers::{Conv2d, ImageRows, Linear, Permute, Reshape, RowsImage};
    let input = x(2, 4, 5);
    let rows = qnn::Module::forward(&ImageRows, &input).unwrap();
    let want = input.view().permuted_axes(IxDyn(&[0, 2, 3, 1])).as_standard_layout().into_owned();
    assert_eq!(rows.as_slice().unwrap(), want.as_slice().unwrap());
    assert_eq!(qnn::Module::forward(&RowsImage { h: 5, w: 5 }, &rows).unwrap(), input);
    let graph = |rows_ops: bool| {
        let mut g = qnn::GraphBuilder::new();
        let t = g.input("x");
        let t = g.layer("conv", Conv2d::new(4, 4, 3).padding(1), t).unwrap();
        let t = if rows_ops {
            g.layer("rows", ImageRows, t).unwrap()
        } else {
            let t = g.layer("nhwc", Permute { dims: vec![0, 2, 3, 1] }, t).unwrap();
            g.layer("rows", Reshape { shape: vec![-1, 4], keep_batch: false }, t).unwrap()
        };
        let t = g.layer("fc", Linear::new(4, 6), t).unwrap();
        let t = if rows_ops {
            g.layer("image", RowsImage { h: 5, w: 5 }, t).unwrap()
        } else {
            let t = g.layer("unrows", Reshape { shape: vec![-1, 5, 5, 6], keep_batch: false }, t).unwrap();
            g.layer("image", Permute { dims: vec![0, 3, 1, 2] }, t).unwrap()
        };
        let t = g.layer("conv2", Conv2d::new(6, 3, 1), t).unwrap();
        g.output(t);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 4);
        let mut p = prepare(graph, &QConfigMapping::new(QConfig::default())).unwrap();
        p.calibrate(&input).unwrap();
        p.convert().unwrap()
    };
    let (fast, slow) = (graph(true), graph(false));
    assert_eq!(fast.forward(&input).unwrap(), slow.forward(&input).unwrap());
    let back = QuantizedModel::from_bytes(&fast.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&input).unwrap(), fast.forward(&input).unwrap());
}

/// Token ids through an `Embedding` (float: a lookup) and an additive mask `[n, 1, 1, d]`
/// broadcast over `[n, 2, t, d]`: the addition runs in int8, the model takes its two inputs,
/// stays near its float twin, and saves and loads with the table.
#[test]
fn embeddings_and_broadcast_masks_run_in_int8_and_save() {
    use qnn::layers::{Embedding, Linear, Reshape};
    let mut table = Embedding::new(7, 4);
    table.weight = ArrayD::from_shape_fn(IxDyn(&[7, 4]), |i| ((i[0] * 5 + i[1] * 3) % 11) as f32 * 0.2 - 1.0);
    let graph = || {
        let mut g = qnn::GraphBuilder::new();
        let ids = g.input("ids");
        let mask = g.input("mask");
        let e = g.layer("embed", table.clone(), ids).unwrap();
        let e = g.layer("heads", Reshape { shape: vec![2, -1, 4], keep_batch: true }, e).unwrap();
        let m = g.add("masked", e, mask).unwrap();
        let y = g.layer("proj", Linear::new(4, 3), m).unwrap();
        g.output(y);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 5);
        // randomize filled the table too: put it back.
        qnn::Module::tensors_mut(&mut graph).into_iter().filter(|(k, _)| *k == "weight").for_each(|(_, w)| {
            if w.shape() == [7, 4] {
                w.assign(&table.weight)
            }
        });
        graph
    };
    let inputs = |n: usize| {
        let ids = ArrayD::from_shape_fn(IxDyn(&[n, 6]), |i| ((i[0] * 2 + i[1] * 3) % 7) as f32);
        let mask = ArrayD::from_shape_fn(IxDyn(&[n, 1, 1, 4]), |i| if (i[0] + i[3]) % 3 == 0 { -2.0 } else { 0.0 });
        vec![ids, mask]
    };
    let float = graph().run(&inputs(2)).unwrap().remove(0);
    assert_eq!(float.shape(), &[2, 2, 3, 3]);
    let mut p = prepare(graph(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate_inputs(&inputs(2)).unwrap();
    p.calibrate_inputs(&inputs(1)).unwrap();
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert!(matches!(mode("embed"), qnn::Mode::Float(_)), "{:?}", mode("embed"));
    assert_eq!(mode("masked"), qnn::Mode::Int8);
    let got = q.forward_inputs(&inputs(2)).unwrap().remove(0);
    let db = qnn::sqnr_db(&float, &got);
    assert!(db > 30.0, "SQNR {db:.1} dB");
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward_inputs(&inputs(2)).unwrap()[0], got);
}
