//! Models as graphs: any dataflow written with `GraphBuilder` (squeeze-and-excitation, two
//! inputs and two outputs, skips across stages), quantized and run like a container model.

use ndarray::{ArrayD, IxDyn};
use qnn::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, LayerNorm, Linear, ReLU, Sigmoid};
use qnn::{
    fuse_graph, prepare, smooth_quant, sqnr_db, zoo, Graph, GraphBuilder, Mode, Module, NnError, QConfigMapping,
    QuantizedModel, Sequential, Value,
};
use qobserve::QConfig;

fn images(seed: usize, shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v = (0..n).map(|k| ((k * 7919 + seed * 104_729) % 41) as f32 / 20.0 - 1.0).collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// `x * sigmoid(conv(relu(conv(pool(x)))))` after a conv + batch-norm + ReLU stem: the
/// squeeze-and-excitation block that containers cannot express.
fn se_block() -> Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("stem.conv", Conv2d::new(3, 8, 3).padding(1).no_bias(), x).unwrap();
    let y = g.layer("stem.bn", BatchNorm2d::new(8), y).unwrap();
    let y = g.layer("stem.relu", ReLU, y).unwrap();
    let s = g.layer("se.pool", AdaptiveAvgPool2d(1, 1), y).unwrap();
    let s = g.layer("se.fc1", Conv2d::new(8, 4, 1), s).unwrap();
    let s = g.layer("se.relu", ReLU, s).unwrap();
    let s = g.layer("se.fc2", Conv2d::new(4, 8, 1), s).unwrap();
    let s = g.layer("se.gate", Sigmoid, s).unwrap();
    let z = g.mul("se.scale", y, s).unwrap();
    g.output(z);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 5);
    graph
}

#[test]
fn a_squeeze_and_excitation_block_quantizes_end_to_end() {
    let x = images(1, &[2, 3, 10, 10]);
    let float = se_block().run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert_eq!(float.shape(), &[2, 8, 10, 10]);
    let mut graph = se_block();
    let fused = fuse_graph(&mut graph).unwrap();
    let patterns: Vec<&str> = fused.iter().map(|f| f.pattern.as_str()).collect();
    assert_eq!(patterns, ["Conv2d+BatchNorm2d+ReLU", "Conv2d+ReLU"]);
    let fused_out = graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert!(sqnr_db(&float, &fused_out) > 80.0, "fusion changed the function");
    let twin = {
        let mut t = se_block();
        fuse_graph(&mut t).unwrap();
        t
    };
    let mut p = prepare(graph, &QConfigMapping::new(QConfig::default())).unwrap();
    for s in 0..4 {
        p.calibrate(&images(10 + s, &[2, 3, 10, 10])).unwrap();
    }
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert_eq!(mode("stem.conv"), Mode::Int8);
    assert_eq!(mode("stem.bn"), Mode::Passthrough);
    assert_eq!(mode("se.gate"), Mode::Int8);
    assert_eq!(mode("se.scale"), Mode::Int8);
    let int8 = q.forward(&x).unwrap();
    let sqnr = sqnr_db(&float, &int8);
    assert!(sqnr > 25.0, "int8 SQNR {sqnr:.1} dB");
    // One report row per node, the product's error accumulated from the int8 branches.
    let report = q.report_graph(&twin, std::slice::from_ref(&x)).unwrap();
    assert_eq!(report.len(), q.plan().len());
    let last = report.last().unwrap();
    assert_eq!((last.name.as_str(), last.kind), ("se.scale", "mul"));
    // Against the fused float twin, which differs from the unfused model in the last bits.
    assert!((last.sqnr_db.unwrap() - sqnr).abs() < 0.05, "{:?} vs {sqnr}", last.sqnr_db);
    // Saved and loaded: the same bits.
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), int8);
}

/// Two inputs, a value read by three nodes, an addition and a concatenation of the same two
/// branches, two outputs: calibrated, run at 1 and 2 threads (a batch split between them),
/// saved and loaded, with the same bits every time.
#[test]
fn two_inputs_and_two_outputs() {
    let build = || {
        let mut g = GraphBuilder::new();
        let (a, b) = (g.input("a"), g.input("b"));
        let fa = g.layer("left", Conv2d::new(2, 4, 3).padding(1), a).unwrap();
        let fb = g.layer("right", Conv2d::new(2, 4, 1), b).unwrap();
        let sum = g.add("sum", fa, fb).unwrap();
        let both = g.cat("both", &[fa, fb, sum]).unwrap();
        g.output(sum);
        g.output(both);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 9);
        graph
    };
    let xs = [images(2, &[4, 2, 6, 6]), images(3, &[4, 2, 6, 6])];
    let float = build().run(&xs).unwrap();
    assert_eq!(float[1].shape(), &[4, 12, 6, 6]);
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    let e = p.calibrate(&xs[0]).unwrap_err().to_string();
    assert!(e.contains("calibrate_inputs"), "{e}");
    p.calibrate_inputs(&xs).unwrap();
    let mut q = p.convert().unwrap();
    assert!(q.plan().iter().all(|e| e.mode == Mode::Int8), "{:?}", q.plan());
    let out = q.forward_inputs(&xs).unwrap();
    for (f, i) in float.iter().zip(&out) {
        assert!(sqnr_db(f, i) > 30.0, "{:.1} dB", sqnr_db(f, i));
    }
    q.set_threads(2);
    assert_eq!(q.forward_inputs(&xs).unwrap(), out);
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward_inputs(&xs).unwrap(), out);
    let e = q.forward(&xs[0]).unwrap_err().to_string();
    assert!(e.contains("2 input arrays"), "{e}");
}

/// A container model written into a graph keeps its names and its results.
#[test]
fn containers_embed_in_a_graph_unchanged() {
    let load = || {
        let mut m = zoo::digits();
        qnn::load_safetensors(&mut m, concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits_model.safetensors")).unwrap();
        qnn::fuse(&mut m).unwrap();
        m
    };
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.sequential("", load(), x).unwrap();
    g.output(y);
    let graph = g.build().unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[8, 1, 8, 8]), |i| ((i[0] * 5 + i[2] * 3 + i[3]) % 17) as f32 / 16.0);
    assert_eq!(graph.run(std::slice::from_ref(&x)).unwrap()[0], load().forward(&x).unwrap());
    let convert = |m: Graph| {
        let mut p = prepare(m, &QConfigMapping::new(QConfig::default())).unwrap();
        p.calibrate(&x).unwrap();
        p.convert().unwrap()
    };
    let (a, b) = (convert(graph), convert(Graph::from(load())));
    assert_eq!(a.plan(), b.plan());
    let (Value::U8 { data: da, .. }, Value::U8 { data: db, .. }) =
        (a.forward_value(&x).unwrap(), b.forward_value(&x).unwrap())
    else {
        panic!()
    };
    assert_eq!(da, db);
}

/// torchvision's basic block calls its `relu` twice: two nodes, the second `relu:1`, and a
/// configuration naming the module reaches both calls.
#[test]
fn a_module_called_twice_is_two_nodes_one_configuration() {
    let mut m = zoo::resnet18(10);
    zoo::randomize(&mut m, 1);
    qnn::fuse(&mut m).unwrap();
    let p = prepare(m, &QConfigMapping::new(QConfig::default()).skip_name("layer1.0.relu")).unwrap();
    let calls: Vec<_> = p.plan().iter().filter(|e| e.name.starts_with("layer1.0.relu")).collect();
    assert_eq!(calls.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["layer1.0.relu", "layer1.0.relu:1"]);
    // The first call was fused into conv1 (nothing to run); the second runs in float.
    assert_eq!(calls[0].mode, Mode::Passthrough);
    assert!(matches!(&calls[1].mode, Mode::Float(qnn::FloatReason::Configured)));
}

#[test]
fn malformed_graphs_are_errors_that_say_what_is_wrong() {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("relu", ReLU, x).unwrap();
    let e = g.layer("relu", ReLU, y).unwrap_err().to_string();
    assert!(e.contains("'relu'") && e.contains("taken"), "{e}");
    let e = GraphBuilder::new().build().unwrap_err().to_string();
    assert!(e.contains("no output"), "{e}");
    let mut other = GraphBuilder::new();
    let (o1, o2) = (other.input("a"), other.input("b"));
    let _ = (o1, other.layer("r", ReLU, o2).unwrap());
    let foreign = other.layer("r2", ReLU, o2).unwrap();
    let e = g.layer("r3", ReLU, foreign).unwrap_err().to_string();
    assert!(e.contains("not of this graph"), "{e}");
    g.output(y);
    let graph = g.build().unwrap();
    let e = graph.run(&[]).unwrap_err().to_string();
    assert!(e.contains("1 input tensors"), "{e}");
    let e = Module::forward(&se_block(), &images(0, &[1, 2, 4, 4])).unwrap_err();
    assert!(matches!(e, NnError::Shape { .. }), "{e}");
    let seq_in_graph = Sequential::new().add("g", graph);
    let out = seq_in_graph.forward(&images(0, &[1, 2, 3, 3])).unwrap();
    assert!(out.iter().all(|&v| v >= 0.0));
}

/// `bytes` with its model description passed through `edit`.
fn edited(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut desc: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["qrust.model"]).unwrap();
    edit(&mut desc);
    let meta: std::collections::HashMap<String, String> = [("qrust.model".to_string(), desc.to_string())].into();
    safetensors::serialize(st.tensors(), Some(meta)).unwrap()
}

#[test]
fn saved_graphs_are_checked_when_loading() {
    let mut p = prepare(se_block(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&images(4, &[1, 3, 6, 6])).unwrap();
    let bytes = p.convert().unwrap().to_bytes().unwrap();
    let err = |b: Vec<u8>| QuantizedModel::from_bytes(&b).unwrap_err().to_string();
    let e = err(edited(&bytes, |d| d["format"] = "qrust-int8-v1".into()));
    assert!(e.contains("earlier version") && e.contains("convert the float model again"), "{e}");
    let e = err(edited(&bytes, |d| d["values"] = 1000.into()));
    assert!(e.contains("every value is an input or one node's output"), "{e}");
    let e = err(edited(&bytes, |d| d["nodes"][0]["inputs"] = serde_json::json!([5])));
    assert!(e.contains("before any node computes it"), "{e}");
    let e = err(edited(&bytes, |d| d["nodes"][1]["name"] = d["nodes"][0]["name"].clone()));
    assert!(e.contains("not unique"), "{e}");
    let e = err(edited(&bytes, |d| d["outputs"] = serde_json::json!([])));
    assert!(e.contains("no output"), "{e}");
    let e = err(edited(&bytes, |d| {
        d["nodes"].as_array_mut().unwrap().last_mut().unwrap()["inputs"] = serde_json::json!([1])
    }));
    assert!(e.contains("inputs do not fit"), "{e}");
}

/// A product runs in int8 in either operand order and, kept in float by configuration, in
/// float; operands that neither match nor broadcast are an error naming the node.
#[test]
fn products_broadcast_a_gate_either_way() {
    let build = |gate_first: bool| {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let y = g.layer("conv", Conv2d::new(2, 6, 3).padding(1), x).unwrap();
        let s = g.layer("pool", AdaptiveAvgPool2d(1, 1), y).unwrap();
        let s = g.layer("gate", qnn::layers::HardSigmoid, s).unwrap();
        let z = if gate_first { g.mul("scale", s, y) } else { g.mul("scale", y, s) }.unwrap();
        g.output(z);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 3);
        graph
    };
    let x = images(5, &[2, 2, 5, 5]);
    let float = build(false).run(std::slice::from_ref(&x)).unwrap().remove(0);
    let mut outs = Vec::new();
    for (gate_first, mapping) in [
        (false, QConfigMapping::new(QConfig::default())),
        (true, QConfigMapping::new(QConfig::default())),
        (false, QConfigMapping::new(QConfig::default()).skip_kind("mul")),
    ] {
        let mut p = prepare(build(gate_first), &mapping).unwrap();
        p.calibrate(&x).unwrap();
        let q = p.convert().unwrap();
        let y = q.forward(&x).unwrap();
        assert!(sqnr_db(&float, &y) > 25.0, "{:.1} dB", sqnr_db(&float, &y));
        outs.push(y);
    }
    assert_eq!(outs[0], outs[1], "the product commutes bit for bit");
    let mut g = GraphBuilder::new();
    let (a, b) = (g.input("a"), g.input("b"));
    let z = g.mul("odd", a, b).unwrap();
    g.output(z);
    let e = g.build().unwrap().run(&[images(0, &[1, 2, 3, 3]), images(0, &[1, 3, 1, 1])]).unwrap_err().to_string();
    assert!(e.contains("odd") && e.contains("[1, 3, 1, 1]"), "{e}");
}

/// Convolutions, and residual additions reading them: one whose other operand was computed
/// first (`s1`, the downsample order of torchvision's bottleneck), one whose other operand is
/// a graph input (`s2`), one whose other operand is the float output of a convolution kept
/// in float (`s4`, first operand), one that broadcasts a `[n, c, 1, 1]` operand (`s3`),
/// ReLUs after two of them; `s1` reads its convolution `c` through a batch-norm folded into
/// it (a pass-through node, as models built from modules keep it). With `twin`, every
/// convolution's output is also a graph output, so no addition can run inside its
/// convolution.
fn residual_graph(twin: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let (x, e, gate) = (g.input("x"), g.input("e"), g.input("gate"));
    let a = g.layer("a", Conv2d::new(3, 8, 3).padding(1), x).unwrap();
    let a = g.layer("a.relu", ReLU, a).unwrap();
    let b = g.layer("b", Conv2d::new(8, 8, 3).padding(1), a).unwrap();
    let c = g.layer("c", Conv2d::new(3, 8, 1), x).unwrap();
    let c_bn = g.layer("c.bn", BatchNorm2d::new(8), c).unwrap();
    let s1 = g.add("s1", b, c_bn).unwrap();
    let s1 = g.layer("s1.relu", ReLU, s1).unwrap();
    let d = g.layer("d", Conv2d::new(8, 8, 1), s1).unwrap();
    let s2 = g.add("s2", e, d).unwrap();
    let h = g.layer("h", Conv2d::new(8, 8, 1), s2).unwrap();
    let k = g.layer("k", Conv2d::new(8, 8, 3).padding(1), s2).unwrap();
    let s4 = g.add("s4", h, k).unwrap();
    let f = g.layer("f", Conv2d::new(8, 8, 1), s4).unwrap();
    let s3 = g.add("s3", f, gate).unwrap();
    let s3 = g.layer("s3.relu", ReLU, s3).unwrap();
    g.output(s3);
    if twin {
        for t in [b, c_bn, d, k, f] {
            g.output(t);
        }
    }
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 11);
    graph
}

#[test]
fn residual_additions_run_inside_their_convolutions_with_the_same_bits() {
    let inputs = |s: usize| vec![images(s, &[3, 3, 9, 9]), images(s + 1, &[3, 8, 9, 9]), images(s + 2, &[3, 8, 1, 1])];
    let convert = |twin: bool| {
        let mapping = QConfigMapping::new(QConfig::default()).skip_name("h");
        let mut p = prepare(residual_graph(twin), &mapping).unwrap();
        for s in 0..3 {
            p.calibrate_inputs(&inputs(10 * s)).unwrap();
        }
        p.convert().unwrap()
    };
    let (mut fused, mut apart) = (convert(false), convert(true));
    let x = inputs(7);
    let runs_in = |q: &QuantizedModel| -> Vec<(String, Option<String>)> {
        let prof = q.profile(&x, 1).unwrap().into_iter();
        prof.filter(|n| n.op == "Add" || n.name == "c.bn").map(|n| (n.name, n.runs_in)).collect()
    };
    let named = |v: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
        v.iter().map(|(a, b)| (a.to_string(), b.map(str::to_string))).collect()
    };
    assert_eq!(
        runs_in(&fused),
        named(&[("c.bn", Some("c")), ("s1", Some("c")), ("s2", Some("d")), ("s4", Some("k")), ("s3", Some("f"))])
    );
    assert_eq!(runs_in(&apart), named(&[("c.bn", None), ("s1", None), ("s2", None), ("s4", None), ("s3", None)]));
    assert!(matches!(fused.plan().iter().find(|e| e.name == "h").unwrap().mode, Mode::Float(_)));
    let sum = |q: &QuantizedModel| q.forward_values(&x).unwrap().swap_remove(0);
    let want = sum(&apart);
    let Value::U8 { data: ref want_bytes, .. } = want else { panic!("an int8 sum") };
    for threads in [1, 2] {
        fused.set_threads(threads);
        apart.set_threads(threads);
        for q in [&fused, &apart] {
            let Value::U8 { data, .. } = sum(q) else { panic!("an int8 sum") };
            assert_eq!(&data, want_bytes, "threads {threads}");
        }
    }
}

/// Self-attention's two products of computed values (`q · kᵀ` and `scores · v`), with a
/// softmax between them: all three run in int8, the model stays close to float, and it runs
/// alike at 2 threads and after a save and load.
#[test]
fn attention_products_of_two_computed_values_run_in_int8() {
    use qnn::layers::{Linear, Permute, Softmax};
    let build = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let q = g.layer("q", Linear::new(8, 8), x).unwrap();
        let k = g.layer("k", Linear::new(8, 8), x).unwrap();
        let v = g.layer("v", Linear::new(8, 8), x).unwrap();
        let kt = g.layer("kt", Permute { dims: vec![0, 2, 1] }, k).unwrap();
        let s = g.matmul("scores", q, kt).unwrap();
        let p = g.layer("softmax", Softmax { dim: -1 }, s).unwrap();
        let o = g.matmul("context", p, v).unwrap();
        g.output(o);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 3);
        graph
    };
    let x = images(4, &[2, 5, 8]);
    let float = build().run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert_eq!(float.shape(), &[2, 5, 8]);
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    for s in 0..4 {
        p.calibrate(&images(20 + s, &[2, 5, 8])).unwrap();
    }
    p.calibrate(&x).unwrap();
    let mut q = p.convert().unwrap();
    let entry = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().clone();
    for name in ["scores", "context"] {
        let e = entry(name);
        assert_eq!((e.kind, e.mode), ("matmul", Mode::Int8), "{name}");
    }
    let int8 = q.forward(&x).unwrap();
    let sqnr = sqnr_db(&float, &int8);
    assert!(sqnr > 25.0, "int8 SQNR {sqnr:.1} dB");
    q.set_threads(2);
    assert_eq!(q.forward(&x).unwrap(), int8);
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), int8);
    // Another number of tokens than calibrated: the products take any.
    let longer = images(5, &[2, 7, 8]);
    let f = build().run(std::slice::from_ref(&longer)).unwrap().remove(0);
    assert!(sqnr_db(&f, &q.forward(&longer).unwrap()) > 20.0);
}

/// `softmax(q @ kt) @ v` over 4-D heads, `kt` being `k` permuted by its last two axes
/// (`transpose_k`, node `kt`) and maybe scaled by a constant (`scale_k`, node `kscale`); with
/// `expose` the softmax's output is a model output too, so the attention does not fuse.
fn attention_graph(expose: bool, transpose_k: bool, scale_k: bool) -> Graph {
    use qnn::layers::{MulScalar, Permute, Softmax};
    let mut g = GraphBuilder::new();
    let (q, k, v) = (g.input("q"), g.input("k"), g.input("v"));
    let mut kt = if transpose_k { g.layer("kt", Permute { dims: vec![0, 1, 3, 2] }, k).unwrap() } else { k };
    if scale_k {
        kt = g.layer("kscale", MulScalar { factor: 0.35 }, kt).unwrap();
    }
    let s = g.matmul("scores", q, kt).unwrap();
    let p = g.layer("softmax", Softmax { dim: -1 }, s).unwrap();
    let o = g.matmul("context", p, v).unwrap();
    g.output(o);
    if expose {
        g.output(p);
    }
    g.build().unwrap()
}

/// The profiles of [`attention_graph`] converted: `fused` runs the softmax and the second
/// product inside the first (and the keys' permutation, which the profile shows at
/// `kt_shape`, with the scaling after it); a scaling without the permutation stays a step of
/// its own; `apart` runs every node on its own.
fn assert_attention_profile(
    (fused, apart): (&QuantizedModel, &QuantizedModel),
    xs: &[ArrayD<f32>],
    (kt_batch, transpose_k, scale_k): (usize, bool, bool),
    kt_shape: [usize; 4],
) {
    let prof = fused.profile(xs, 1).unwrap();
    let runs_in = |n: &str| prof.iter().find(|t| t.name == n).unwrap().runs_in.clone();
    assert_eq!(runs_in("softmax").as_deref(), Some("scores"), "keys of batch {kt_batch}");
    assert_eq!(runs_in("context").as_deref(), Some("scores"), "keys of batch {kt_batch}");
    if transpose_k {
        assert_eq!(runs_in("kt").as_deref(), Some("scores"), "keys of batch {kt_batch}");
        let kt = prof.iter().find(|t| t.name == "kt").unwrap();
        assert_eq!(kt.out_shape, kt_shape, "the transposed keys' shape in the profile");
    }
    if scale_k {
        let want = transpose_k.then_some("scores");
        assert_eq!(runs_in("kscale").as_deref(), want, "keys of batch {kt_batch}, transposed {transpose_k}");
    }
    let prof = apart.profile(xs, 1).unwrap();
    assert!(prof.iter().all(|t| t.runs_in.is_none()));
}

/// Attention over 4-D heads runs head by head in one step (the first product names the
/// other two in the profile) and gives the same bytes as its three ops run one after the
/// other, on one thread or two: the same graph with the softmax's output also a model output
/// does not fuse. Keys shared by the batch (broadcast) run the three ops in turn, alike. Keys
/// given as `k` and transposed by a permutation of the last two axes, then maybe scaled by a
/// constant (ViT's export), are packed as they are: the permutation and the scaling run in
/// the first product too.
#[test]
fn fused_attention_gives_the_bytes_of_its_three_ops() {
    let build = attention_graph;
    for (kt_batch, transpose_k, scale_k) in
        [(2, false, false), (1, false, false), (2, true, false), (2, true, true), (1, true, true), (2, false, true)]
    {
        let k_shape = if transpose_k { [kt_batch, 3, 9, 4] } else { [kt_batch, 3, 4, 9] };
        let xs = [images(6, &[2, 3, 7, 4]), images(7, &k_shape), images(8, &[2, 3, 9, 5])];
        let build = |expose: bool| build(expose, transpose_k, scale_k);
        let quantized = |expose: bool| {
            let mut p = prepare(build(expose), &QConfigMapping::new(QConfig::default())).unwrap();
            p.calibrate_inputs(&xs).unwrap();
            p.convert().unwrap()
        };
        let (mut fused, apart) = (quantized(false), quantized(true));
        let as_values = |q: &QuantizedModel| q.forward_values(&xs).unwrap().remove(0);
        let (Value::U8 { data: a, .. }, Value::U8 { data: b, .. }) = (as_values(&fused), as_values(&apart)) else {
            panic!("int8 outputs")
        };
        assert_eq!(a, b, "keys of batch {kt_batch}");
        // Two threads share the heads out: the same bytes.
        fused.set_threads(2);
        let Value::U8 { data: c, .. } = as_values(&fused) else { panic!("int8 outputs") };
        assert_eq!(c, b, "keys of batch {kt_batch}, two threads");
        fused.set_threads(1);
        let float = build(false).run(&xs).unwrap().remove(0);
        assert!(sqnr_db(&float, &fused.forward_inputs(&xs).unwrap().remove(0)) > 25.0);
        assert_attention_profile((&fused, &apart), &xs, (kt_batch, transpose_k, scale_k), [kt_batch, 3, 4, 9]);
    }
}

/// Float attention (the dynamic modes': products and softmax stay float) runs head by head in
/// one step (the first product names the softmax and the second product in the profile) and
/// gives the bits of its three ops run one after the other, which the same graph with the
/// softmax's output also a model output does (it does not fuse), on one thread or two; and
/// the float graph's own run, whose ops are the same. Keys shared by the batch (broadcast)
/// run the three ops in turn, alike. Keys given as `k` and transposed by a permutation of the
/// last two axes, then maybe scaled by a constant (ViT's export), are read as their
/// transpose: the permutation and the scaling run in the first product too.
#[test]
fn fused_float_attention_gives_the_bits_of_its_three_ops() {
    let build = attention_graph;
    for (kt_batch, transpose_k, scale_k) in
        [(2, false, false), (1, false, false), (2, true, false), (2, true, true), (1, true, true), (2, false, true)]
    {
        let k_shape = if transpose_k { [kt_batch, 3, 33, 40] } else { [kt_batch, 3, 40, 33] };
        let xs = [images(6, &[2, 3, 37, 40]), images(7, &k_shape), images(8, &[2, 3, 33, 20])];
        let build = |expose: bool| build(expose, transpose_k, scale_k);
        let converted = |expose: bool| {
            prepare(build(expose), &QConfigMapping::new(QConfig::dynamic_per_token())).unwrap().convert().unwrap()
        };
        let (mut fused, apart) = (converted(false), converted(true));
        let bits = |y: ndarray::ArrayD<f32>| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let want = bits(apart.forward_inputs(&xs).unwrap().remove(0));
        assert_eq!(bits(fused.forward_inputs(&xs).unwrap().remove(0)), want, "keys of batch {kt_batch}");
        fused.set_threads(2);
        assert_eq!(bits(fused.forward_inputs(&xs).unwrap().remove(0)), want, "keys of batch {kt_batch}, two threads");
        fused.set_threads(1);
        assert_eq!(bits(build(false).run(&xs).unwrap().remove(0)), want, "keys of batch {kt_batch}: the float graph");
        assert_attention_profile((&fused, &apart), &xs, (kt_batch, transpose_k, scale_k), [kt_batch, 3, 40, 33]);
    }
}

/// Slices of a float value that other nodes still read (attention's q, k and v taken from
/// one projection in the dynamic modes) compute from the value itself rather than from a copy
/// of it: the same values as slicing the projection's own output, in any order of readers.
#[test]
fn slices_of_a_shared_float_value_are_its_parts() {
    use qnn::layers::{Linear, Slice};
    let build = |sliced: bool| {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let y = g.layer("proj", Linear::new(8, 12), x).unwrap();
        if sliced {
            for (name, start) in [("k", 4), ("q", 0), ("v", 8)] {
                let part = g.layer(name, Slice::narrow(-1, start, 4), y).unwrap();
                g.output(part);
            }
        } else {
            g.output(y);
        }
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 13);
        prepare(graph, &QConfigMapping::new(QConfig::dynamic_per_token())).unwrap().convert().unwrap()
    };
    let x = [images(3, &[5, 8])];
    let whole = build(false).forward_inputs(&x).unwrap().remove(0);
    let parts = build(true).forward_inputs(&x).unwrap();
    for (part, start) in parts.iter().zip([4, 0, 8]) {
        assert_eq!(part, &whole.slice(ndarray::s![.., start..start + 4]).into_dyn(), "columns {start}..");
    }
}

/// Attention with a scaling of its scores (`MulScalar`) and an additive mask between the
/// first product and the softmax (BERT's), the mask `[n, 1, 1, keys]`, `[1, 1, rows, keys]`
/// or one value per key, on either side of the addition: it runs head by head in one step
/// (the profile names the first product for the scaling, the addition, the softmax and the
/// second product) and gives the bytes of its ops run one after the other, which the same
/// graph with the addition's output also a model output does (it does not fuse), on one
/// thread or two.
#[test]
fn fused_attention_with_a_scale_and_a_mask_gives_the_bytes_of_its_ops() {
    use qnn::layers::{MulScalar, Softmax};
    let build = |expose: bool, scale: bool, mask_first: bool| {
        let mut g = GraphBuilder::new();
        let (q, kt, v, mask) = (g.input("q"), g.input("kt"), g.input("v"), g.input("mask"));
        let mut s = g.matmul("scores", q, kt).unwrap();
        if scale {
            s = g.layer("scale", MulScalar { factor: 0.125 }, s).unwrap();
        }
        let masked = if mask_first { g.add("masked", mask, s) } else { g.add("masked", s, mask) }.unwrap();
        let p = g.layer("softmax", Softmax { dim: -1 }, masked).unwrap();
        let o = g.matmul("context", p, v).unwrap();
        g.output(o);
        if expose {
            g.output(masked);
        }
        g.build().unwrap()
    };
    // Masks of keys 6 and 8 (of 9) set far below the scores, as BERT's padding mask does.
    let mask = |shape: &[usize]| {
        let mut m = images(9, shape) * 0.5;
        let keys = shape.len() - 1;
        for ((i, v), _) in m.indexed_iter_mut().zip(0..) {
            if i[keys] == 6 || i[keys] == 8 {
                *v = -30.0;
            }
        }
        m
    };
    for (mask_shape, scale, mask_first) in
        [(vec![2, 1, 1, 9], true, false), (vec![1, 1, 7, 9], false, true), (vec![9], true, true)]
    {
        let xs = [images(6, &[2, 3, 7, 4]), images(7, &[2, 3, 4, 9]), images(8, &[2, 3, 9, 5]), mask(&mask_shape)];
        let quantized = |expose: bool| {
            let mut p = prepare(build(expose, scale, mask_first), &QConfigMapping::new(QConfig::default())).unwrap();
            p.calibrate_inputs(&xs).unwrap();
            p.convert().unwrap()
        };
        let (mut fused, apart) = (quantized(false), quantized(true));
        let case = format!("mask {mask_shape:?}, scale {scale}, mask first {mask_first}");
        let as_values = |q: &QuantizedModel| q.forward_values(&xs).unwrap().remove(0);
        let (Value::U8 { data: a, .. }, Value::U8 { data: b, .. }) = (as_values(&fused), as_values(&apart)) else {
            panic!("int8 outputs")
        };
        assert_eq!(a, b, "{case}");
        fused.set_threads(2);
        let Value::U8 { data: c, .. } = as_values(&fused) else { panic!("int8 outputs") };
        assert_eq!(c, b, "{case}, two threads");
        fused.set_threads(1);
        let float = build(false, scale, mask_first).run(&xs).unwrap().remove(0);
        let sqnr = sqnr_db(&float, &fused.forward_inputs(&xs).unwrap().remove(0));
        assert!(sqnr > 20.0, "{case}: int8 SQNR {sqnr:.1} dB");
        let prof = fused.profile(&xs, 1).unwrap();
        let runs_in = |n: &str| prof.iter().find(|t| t.name == n).map(|t| t.runs_in.clone());
        let inner: &[&str] =
            if scale { &["scale", "masked", "softmax", "context"] } else { &["masked", "softmax", "context"] };
        for n in inner {
            assert_eq!(runs_in(n), Some(Some("scores".to_string())), "{case}: {n}");
        }
        let prof = apart.profile(&xs, 1).unwrap();
        assert!(prof.iter().all(|t| t.runs_in.is_none()), "{case}");
        // A mask that does not broadcast to the scores is an error naming the addition and
        // both shapes.
        let mut bad = xs.clone();
        bad[3] = mask(&[2, 1, 1, 5]);
        let e = fused.forward_inputs(&bad).unwrap_err().to_string();
        assert!(e.contains("masked (add)") && e.contains("[2, 1, 1, 5]") && e.contains("[2, 3, 7, 9]"), "{case}: {e}");
    }
}

/// Products of 4-D values (heads), with a right operand broadcast over the batch: int8
/// images are stored channels-last, and the product reads them in their logical order.
#[test]
fn four_dimensional_products_broadcast_their_batch() {
    let build = || {
        let mut g = GraphBuilder::new();
        let (a, b) = (g.input("a"), g.input("b"));
        let y = g.matmul("heads", a, b).unwrap();
        g.output(y);
        g.build().unwrap()
    };
    let xs = [images(6, &[2, 3, 5, 4]), images(7, &[1, 3, 4, 6])];
    let float = build().run(&xs).unwrap().remove(0);
    assert_eq!(float.shape(), &[2, 3, 5, 6]);
    // The float product, batch by batch, against ndarray's.
    for (bi, hi) in [(0, 0), (1, 2)] {
        let a = xs[0].slice(ndarray::s![bi, hi, .., ..]).into_dimensionality::<ndarray::Ix2>().unwrap();
        let b = xs[1].slice(ndarray::s![0, hi, .., ..]).into_dimensionality::<ndarray::Ix2>().unwrap();
        let want = a.dot(&b);
        let got = float.slice(ndarray::s![bi, hi, .., ..]);
        assert!(want.iter().zip(got.iter()).all(|(w, g)| (w - g).abs() <= 1e-6 * (1.0 + w.abs())));
    }
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate_inputs(&xs).unwrap();
    let mut q = p.convert().unwrap();
    let int8 = q.forward_inputs(&xs).unwrap().remove(0);
    let sqnr = sqnr_db(&float, &int8);
    assert!(sqnr > 30.0, "int8 SQNR {sqnr:.1} dB");
    // Two threads share the batches out: the same output.
    q.set_threads(2);
    assert_eq!(q.forward_inputs(&xs).unwrap().remove(0), int8);
    let e = build().run(&[images(6, &[2, 3, 5, 4]), images(7, &[2, 3, 5, 6])]).unwrap_err().to_string();
    assert!(e.contains("heads") && e.contains("matmul") && e.contains("[2, 3, 5, 6]"), "{e}");
}

/// A product by a constant scalar (attention's `1 / sqrt(d)`, and a negative one) runs in
/// int8 as PyTorch's `quantized::mul_scalar`: the codes kept (or mirrored) and the scale
/// multiplied, nothing observed; the simulation scales its grid alike.
#[test]
fn scalar_products_change_parameters_not_codes() {
    use qnn::layers::{Linear, MulScalar};
    let build = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let y = g.layer("fc1", Linear::new(8, 8), x).unwrap();
        let y = g.layer("scale", MulScalar { factor: 0.25 }, y).unwrap();
        let y = g.layer("negate", MulScalar { factor: -1.5 }, y).unwrap();
        let y = g.layer("fc2", Linear::new(8, 4), y).unwrap();
        g.output(y);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 11);
        graph
    };
    let x = images(8, &[3, 5, 8]);
    let float = build().run(std::slice::from_ref(&x)).unwrap().remove(0);
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    for s in 0..3 {
        p.calibrate(&images(30 + s, &[3, 5, 8])).unwrap();
    }
    let simulated = p.simulate(&x).unwrap();
    let q = p.convert().unwrap();
    for name in ["scale", "negate"] {
        let e = q.plan().iter().find(|e| e.name == name).unwrap();
        assert_eq!((e.kind, &e.mode), ("MulScalar", &Mode::Int8SameParams), "{name}");
    }
    let int8 = q.forward(&x).unwrap();
    assert!(sqnr_db(&float, &int8) > 30.0, "{:.1} dB", sqnr_db(&float, &int8));
    // The simulation quantizes the scaled values on the scaled grid, as the int8 model does.
    assert!(sqnr_db(&int8, &simulated) > 60.0, "simulation {:.1} dB from int8", sqnr_db(&int8, &simulated));
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward(&x).unwrap(), int8);
}

/// A pre-norm block, `fc2(relu(fc1(ln(x))))`, whose norm has four outlier channels (gamma
/// 40 against 0.5-1.3), as trained transformers' norms have; with `residual`, the norm's
/// output also feeds an addition after `fc2` (a post-norm block's shape).
fn pre_norm_block(residual: bool) -> Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let mut ln = LayerNorm::new(32);
    for (j, w) in ln.weight.iter_mut().enumerate() {
        *w = if j % 8 == 3 { 40.0 } else { 0.5 + (j % 5) as f32 * 0.2 };
    }
    for (j, b) in ln.bias.iter_mut().enumerate() {
        *b = (j % 3) as f32 * 0.1 - 0.1;
    }
    let (mut fc1, mut fc2) = (Linear::new(32, 48), Linear::new(48, 32));
    zoo::randomize(&mut fc1, 5);
    zoo::randomize(&mut fc2, 6);
    let h = g.layer("ln", ln, x).unwrap();
    let a = g.layer("fc1", fc1, h).unwrap();
    let a = g.layer("act", ReLU, a).unwrap();
    let mut y = g.layer("fc2", fc2, a).unwrap();
    if residual {
        y = g.add("res", y, h).unwrap();
    }
    g.output(y);
    g.build().unwrap()
}

#[test]
fn smooth_quant_moves_outliers_into_the_weights_and_keeps_the_function() {
    let batches: Vec<Vec<ArrayD<f32>>> = (0..4).map(|s| vec![images(30 + s, &[2, 16, 32])]).collect();
    let x = vec![images(77, &[2, 16, 32])];
    let (plain, mut smoothed) = (pre_norm_block(false), pre_norm_block(false));
    let float = plain.run(&x).unwrap().swap_remove(0);
    let report = smooth_quant(&mut smoothed, &batches, 0.5).unwrap();
    assert!(report.skipped.is_empty(), "{report:?}");
    let [s] = &report.smoothed[..] else { panic!("one norm smoothed: {report:?}") };
    assert_eq!((s.norm.as_str(), s.linears.clone()), ("ln", vec!["fc1".to_string()]));
    assert!(s.outlier_ratio.0 > 10.0 && s.outlier_ratio.1 < s.outlier_ratio.0 / 3.0, "{s:?}");
    let after = smoothed.run(&x).unwrap().swap_remove(0);
    let scale = float.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = float.iter().zip(&after).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * scale, "the same function: max error {err} of {scale}");
    // Static int8, the default configuration, calibrated on the same batches.
    let int8 = |g: Graph| {
        let mut p = prepare(g, &QConfigMapping::new(QConfig::default())).unwrap();
        for b in &batches {
            p.calibrate_inputs(b).unwrap();
        }
        sqnr_db(&float, &p.convert().unwrap().forward_inputs(&x).unwrap()[0])
    };
    let (before, with) = (int8(plain), int8(smoothed));
    assert!(with > before + 3.0, "int8 SQNR {before:.1} dB, smoothed {with:.1} dB");

    // The norm's output also feeds an addition: left alone, and the report says why.
    let mut post = pre_norm_block(true);
    let report = smooth_quant(&mut post, &batches, 0.5).unwrap();
    assert!(report.smoothed.is_empty(), "{report:?}");
    assert!(
        report.skipped.len() == 1 && report.skipped[0].0 == "ln" && report.skipped[0].1.contains("res"),
        "{report:?}"
    );
    for (alpha, batches, what) in [(1.5, &batches[..], "alpha"), (0.5, &[][..], "no batches")] {
        let e = smooth_quant(&mut pre_norm_block(false), batches, alpha).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

/// Two pre-norm blocks after an addition of two inputs (ViT's position embedding's), `r0 =
/// x + x`, `r1 = r0 + fc1(ln1(r0))`, `r2 = r1 + fc2(ln2(r1))`, `ln3(r2)`, over tokens whose
/// first one (a class token) is 100x smaller than the others.
fn residual_stream() -> (Graph, Vec<ArrayD<f32>>, Vec<ArrayD<f32>>) {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let (mut fc1, mut fc2) = (Linear::new(32, 32), Linear::new(32, 32));
    zoo::randomize(&mut fc1, 5);
    zoo::randomize(&mut fc2, 6);
    let r0 = g.add("r0", x, x).unwrap();
    let h = g.layer("ln1", LayerNorm::new(32), r0).unwrap();
    let a = g.layer("fc1", fc1, h).unwrap();
    let r1 = g.add("r1", r0, a).unwrap();
    let h = g.layer("ln2", LayerNorm::new(32), r1).unwrap();
    let b = g.layer("fc2", fc2, h).unwrap();
    let r2 = g.add("r2", r1, b).unwrap();
    let y = g.layer("ln3", LayerNorm::new(32), r2).unwrap();
    g.output(y);
    let tokens = |seed: usize| {
        let mut x = images(seed, &[2, 8, 32]).mapv(|v| 20.0 * v);
        x.slice_mut(ndarray::s![.., 0, ..]).mapv_inplace(|v| v / 100.0);
        x
    };
    (g.build().unwrap(), (0..4).map(|s| tokens(40 + s)).collect(), vec![tokens(90)])
}

/// `ResidualStream::Float` keeps the additions that norms read, and those norms, in float
/// (the plan says why); the rest stays int8. The small first token, which an int8 stream
/// quantizes on the grid of the large ones and its norm then scales up, keeps its precision.
#[test]
fn a_float_residual_stream_keeps_a_small_token_precise() {
    let (_, batches, x) = residual_stream();
    let float = residual_stream().0.run(&x).unwrap().swap_remove(0);
    let token = |y: &ArrayD<f32>| y.slice(ndarray::s![.., 0, ..]).to_owned().into_dyn();
    let mut sqnr = Vec::new();
    for stream in [qnn::ResidualStream::Int8, qnn::ResidualStream::Float] {
        let mut p = prepare(residual_stream().0, &QConfigMapping::new(QConfig::default()).residual(stream)).unwrap();
        for b in &batches {
            p.calibrate(b).unwrap();
        }
        let q = p.convert().unwrap();
        let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
        for name in ["r0", "r1", "r2", "ln1", "ln2", "ln3"] {
            let want = match stream {
                qnn::ResidualStream::Int8 => Mode::Int8,
                qnn::ResidualStream::Float => Mode::Float(qnn::FloatReason::Residual),
            };
            assert_eq!(mode(name), want, "{name} with {stream:?}");
        }
        for name in ["fc1", "fc2"] {
            assert_eq!(mode(name), Mode::Int8, "{name} with {stream:?}");
        }
        let y = q.forward(&x[0]).unwrap();
        let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
        assert_eq!(back.forward(&x[0]).unwrap(), y, "saved and loaded, {stream:?}");
        sqnr.push((sqnr_db(&float, &y), sqnr_db(&token(&float), &token(&y))));
    }
    let [(all_int8, small_int8), (all_float, small_float)] = sqnr[..] else { unreachable!() };
    assert!(
        small_float > small_int8 + 10.0 && all_float >= all_int8,
        "first token {small_int8:.1} -> {small_float:.1} dB, all {all_int8:.1} -> {all_float:.1} dB"
    );
}

/// Concatenations along any dimension: image heights (dimension 2) in int8, each part
/// dequantized and the whole quantized once; a join of values whose ranges differ more than
/// 16x (a detector's box coordinates and class scores) runs in float, says why in the plan,
/// and keeps the small part's precision. Saved and loaded, the same bits.
#[test]
fn concatenations_along_any_dimension_and_of_far_apart_ranges() {
    let build = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let a = g.layer("a", Conv2d::new(2, 4, 3).padding(1), x).unwrap();
        let b = g.layer("b", Conv2d::new(2, 4, 1), x).unwrap();
        let rows = g.cat_dim("rows", &[a, b], 2).unwrap();
        let small = g.layer("shrink", qnn::layers::MulScalar { factor: 1e-3 }, b).unwrap();
        let far = g.cat("far", &[a, small]).unwrap();
        g.output(rows);
        g.output(far);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 4);
        graph
    };
    let x = images(6, &[2, 2, 6, 6]);
    let float = build().run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(float[0].shape(), &[2, 4, 12, 6]);
    assert_eq!(float[1].shape(), &[2, 8, 6, 6]);
    let mut p = prepare(build(), &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert_eq!(mode("rows"), Mode::Int8);
    let Mode::Float(why) = mode("far") else { panic!("far: {:?}", mode("far")) };
    let why = why.to_string();
    assert!(why.contains("differ") && why.contains("input 1") && why.contains("float"), "{why}");
    let out = q.forward_inputs(std::slice::from_ref(&x)).unwrap();
    assert_eq!(out[0].shape(), &[2, 4, 12, 6]);
    assert!(sqnr_db(&float[0], &out[0]) > 30.0, "rows: {:.1} dB", sqnr_db(&float[0], &out[0]));
    // The scaled part keeps its own int8 precision (one shared scale would round it to zero).
    let part = |y: &ArrayD<f32>| y.slice(ndarray::s![.., 4.., .., ..]).to_owned().into_dyn();
    let small_sqnr = sqnr_db(&part(&float[1]), &part(&out[1]));
    assert!(small_sqnr > 30.0, "the small part: {small_sqnr:.1} dB");
    let back = QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(back.forward_inputs(std::slice::from_ref(&x)).unwrap(), out);
    // Parts that differ beyond the joined dimension are an error naming the node and shapes.
    let mut g = GraphBuilder::new();
    let (a, b) = (g.input("a"), g.input("b"));
    let z = g.cat_dim("bad", &[a, b], 2).unwrap();
    g.output(z);
    let e = g.build().unwrap().run(&[images(0, &[1, 2, 3, 3]), images(0, &[1, 3, 3, 3])]).unwrap_err().to_string();
    assert!(e.contains("bad") && e.contains("[1, 3, 3, 3]") && e.contains("dimension 2"), "{e}");
}
