//! The op registry: the shape ops, GELU and softmax in graphs (float and int8), models holding
//! layers of the application's own saved and loaded once their kinds are registered (and an
//! error naming the layer otherwise), and layers kept in float saved with their weights.

use std::any::Any;

use ndarray::{ArrayD, IxDyn};
use qkernels::QuantU8;
use qnn::layers::{ChannelShuffle, Conv2d, Flatten, Linear, Permute, ReLU, Reshape, Softmax, GELU};
use qnn::ops::{register_int8_layer, register_layer, OpReader, OpWriter};
use qnn::{prepare, sqnr_db, zoo, GraphBuilder, Mode, Module, NnError, QConfigMapping, QuantizedModel, Value};
use qobserve::QConfig;
use serde::{Deserialize, Serialize};

fn images(seed: usize, shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v = (0..n).map(|k| ((k * 7919 + seed * 104_729) % 41) as f32 / 20.0 - 1.0).collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

fn quantize(graph: qnn::Graph, shape: &[usize]) -> QuantizedModel {
    let mut p = prepare(graph, &QConfigMapping::new(QConfig::default())).unwrap();
    for s in 0..3 {
        p.calibrate(&images(20 + s, shape)).unwrap();
    }
    p.convert().unwrap()
}

fn reload(q: &QuantizedModel) -> QuantizedModel {
    QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap()
}

#[test]
fn channel_shuffle_moves_channels_as_pytorch_does() {
    // nn.ChannelShuffle(3) on 6 channels: x.view(n, 3, 2, h, w).transpose(1, 2).
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 6, 1, 1]), |i| i[1] as f32);
    let y = ChannelShuffle { groups: 3 }.forward(&x).unwrap();
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    let e = ChannelShuffle { groups: 4 }.forward(&x).unwrap_err().to_string();
    assert!(e.contains("ChannelShuffle") && e.contains("4 groups") && e.contains("[1, 6, 1, 1]"), "{e}");
}

#[test]
fn reshape_and_permute_check_their_shapes() {
    let x = images(1, &[2, 3, 4, 5]);
    let y = Reshape::batch_and(&[-1, 5]).forward(&x).unwrap();
    assert_eq!(y.shape(), &[2, 12, 5]);
    let y = Reshape { shape: vec![0, 0, 20], keep_batch: false }.forward(&x).unwrap();
    assert_eq!(y.shape(), &[2, 3, 20]);
    let e = Reshape { shape: vec![7, -1], keep_batch: false }.forward(&x).unwrap_err().to_string();
    assert!(e.contains("Reshape") && e.contains("120 values"), "{e}");
    let y = Permute { dims: vec![0, 2, 3, 1] }.forward(&x).unwrap();
    assert_eq!(y.shape(), &[2, 4, 5, 3]);
    assert_eq!(y[[1, 2, 3, 0]], x[[1, 0, 2, 3]]);
    let e = Permute { dims: vec![0, 1, 1, 2] }.forward(&x).unwrap_err().to_string();
    assert!(e.contains("Permute") && e.contains("permutation"), "{e}");
    // Consuming its input, a permutation gives what ndarray's does, whether values move or
    // only axes of size 1 do (then in the input's own buffer); a view of another layout too.
    let ones = images(2, &[1, 3, 1, 5]);
    for (x, dims) in
        [(&x, vec![0, 2, 3, 1]), (&x, vec![3, 1, 0, 2]), (&ones, vec![2, 1, 0, 3]), (&ones, vec![1, 0, 3, 2])]
    {
        let want = x.view().permuted_axes(ndarray::IxDyn(&dims)).to_owned();
        let p = Permute { dims };
        assert_eq!(p.forward_owned(x.clone()).unwrap(), want);
        assert_eq!(p.forward(&x.t().to_owned().t().to_owned()).unwrap(), want);
    }
}

/// conv -> shuffle -> conv -> reshape / permute / reshape back -> GELU -> softmax over the
/// channels -> flatten -> linear: every shape op in int8 keeps its input's parameters and
/// moves exactly the bytes the float op moves; the softmax runs on codes.
fn shapes_model() -> qnn::Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv1", Conv2d::new(3, 6, 3).padding(1), x).unwrap();
    let y = g.layer("relu1", ReLU, y).unwrap();
    let y = g.layer("shuffle", ChannelShuffle { groups: 2 }, y).unwrap();
    let y = g.layer("conv2", Conv2d::new(6, 6, 3).padding(1), y).unwrap();
    let y = g.layer("to_tokens", Reshape::batch_and(&[6, -1]), y).unwrap();
    let y = g.layer("swap", Permute { dims: vec![0, 2, 1] }, y).unwrap();
    let y = g.layer("swap_back", Permute { dims: vec![0, 2, 1] }, y).unwrap();
    let y = g.layer("to_image", Reshape::batch_and(&[6, 8, 8]), y).unwrap();
    let y = g.layer("gelu", GELU { tanh: false }, y).unwrap();
    let y = g.layer("softmax", Softmax { dim: 1 }, y).unwrap();
    let y = g.layer("flatten", Flatten, y).unwrap();
    let y = g.layer("fc", Linear::new(6 * 64, 5), y).unwrap();
    g.output(y);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 9);
    graph
}

#[test]
fn shape_ops_gelu_and_softmax_run_in_a_quantized_graph() {
    let x = images(3, &[2, 3, 8, 8]);
    let float = shapes_model().run(std::slice::from_ref(&x)).unwrap().remove(0);
    let q = quantize(shapes_model(), &[2, 3, 8, 8]);
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    for name in ["shuffle", "to_tokens", "swap", "swap_back", "to_image", "flatten"] {
        assert_eq!(mode(name), Mode::Int8SameParams, "{name}");
    }
    assert_eq!(mode("gelu"), Mode::Int8);
    // Softmax reads and writes codes, with output parameters of its own.
    assert_eq!(mode("softmax"), Mode::Int8);
    let got = q.forward(&x).unwrap();
    let db = sqnr_db(&float, &got);
    assert!(db > 25.0, "SQNR {db:.1} dB");
    // GELU keeps its input's parameters, as PyTorch's quantized gelu does.
    let outs = q.output_quants();
    let of = |n: &str| outs.iter().find(|(m, _)| *m == n).map(|x| x.1);
    assert_eq!(of("gelu"), of("conv2"));
    // Saved and loaded: the same bits.
    let again = reload(&q);
    assert_eq!(again.forward(&x).unwrap(), got);
    // The shape ops move bytes only: the int8 shuffle of conv1's int8 output, dequantized,
    // is the float shuffle of its dequantized output.
    let report = q.report_graph(&shapes_model_fused(), std::slice::from_ref(&x)).unwrap();
    assert_eq!(report.len(), q.plan().len());
}

fn shapes_model_fused() -> qnn::Graph {
    let mut g = shapes_model();
    qnn::fuse_graph(&mut g).unwrap();
    g
}

#[test]
fn int8_shape_ops_move_exactly_the_float_ops_bytes() {
    // A quantized value through each shape op equals the op applied to its dequantized form.
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv", Conv2d::new(4, 8, 1), x).unwrap();
    let a = g.layer("shuffle", ChannelShuffle { groups: 4 }, y).unwrap();
    let b = g.layer("permute", Permute { dims: vec![0, 3, 1, 2] }, y).unwrap();
    let c = g.layer("reshape", Reshape { shape: vec![-1, 2, 5, 3], keep_batch: false }, y).unwrap();
    for t in [y, a, b, c] {
        g.output(t);
    }
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 4);
    let mut p = prepare(graph, &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&images(1, &[3, 4, 5, 2])).unwrap();
    let q = p.convert().unwrap();
    let outs = q.forward_values(&[images(2, &[3, 4, 5, 2])]).unwrap();
    let conv = outs[0].to_f32();
    let want = [
        ChannelShuffle { groups: 4 }.forward(&conv).unwrap(),
        Permute { dims: vec![0, 3, 1, 2] }.forward(&conv).unwrap(),
        Reshape { shape: vec![-1, 2, 5, 3], keep_batch: false }.forward(&conv).unwrap(),
    ];
    for (v, w) in outs[1..].iter().zip(&want) {
        assert!(matches!(v, Value::U8 { .. }), "int8 out");
        assert_eq!(&v.to_f32(), w);
    }
}

/// A float layer of the application's own: `y = x * factor`, saved with its factor.
#[derive(Debug, Serialize, Deserialize)]
struct Gain {
    factor: f32,
}

impl Module for Gain {
    fn kind(&self) -> &'static str {
        "Gain"
    }
    fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
        Ok(x * self.factor)
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Option<qnn::Result<serde_json::Value>> {
        Some(Ok(serde_json::to_value(self).unwrap()))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn load_gain(j: &serde_json::Value, _: &OpReader<'_>) -> qnn::Result<Box<dyn Module>> {
    let g: Gain =
        serde_json::from_value(j.clone()).map_err(|e| NnError::File { file: String::new(), reason: e.to_string() })?;
    Ok(Box::new(g))
}

/// An int8 layer of the application's own: a per-byte table, saved as a tensor.
#[derive(Debug)]
struct Table(Vec<u8>);

impl qnn::Int8Layer for Table {
    fn forward_u8(&self, x: &[u8], shape: &[usize], _threads: usize) -> qnn::Result<(Vec<u8>, Vec<usize>)> {
        Ok((x.iter().map(|&b| self.0[b as usize]).collect(), shape.to_vec()))
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<qnn::Result<serde_json::Value>> {
        Some(Ok(serde_json::json!({ "table": w.u8s(format!("{node}.table"), vec![256], &self.0) })))
    }
}

/// `y = |x|`, with an int8 form.
#[derive(Debug)]
struct Abs;

impl Module for Abs {
    fn kind(&self) -> &'static str {
        "Abs"
    }
    fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
        Ok(x.mapv(f32::abs))
    }
    fn has_int8(&self) -> bool {
        true
    }
    fn int8(&self, cx: &qnn::ops::LowerCx<'_>) -> qnn::Result<Box<dyn qnn::Int8Layer>> {
        let t = qkernels::Lut::from_fn(cx.in_q, cx.out_q(), f32::abs);
        Ok(Box::new(Table(t.table().to_vec())))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn load_table(j: &serde_json::Value, r: &OpReader<'_>) -> qnn::Result<Box<dyn qnn::Int8Layer>> {
    let key = j["table"].as_str().unwrap_or_default();
    let (_, t) = r.u8s(key)?;
    Ok(Box::new(Table(t.to_vec())))
}

fn custom_model() -> qnn::Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv", Conv2d::new(3, 4, 3).padding(1), x).unwrap();
    let y = g.layer("gain", Gain { factor: 0.5 }, y).unwrap();
    let y = g.layer("abs", Abs, y).unwrap();
    let y = g.layer("flatten", Flatten, y).unwrap();
    let y = g.layer("fc", Linear::new(4 * 36, 3), y).unwrap();
    g.output(y);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 2);
    graph
}

#[test]
fn layers_of_your_own_save_and_load_once_registered() {
    let x = images(5, &[2, 3, 6, 6]);
    let q = quantize(custom_model(), &[2, 3, 6, 6]);
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert!(matches!(mode("gain"), Mode::Float(_)));
    assert_eq!(mode("abs"), Mode::Int8);
    let bytes = q.to_bytes().unwrap();
    // Unregistered, loading names the layer, the node and the call to make. (This test binary
    // registers them only below; the two checks run in this one test so no other test
    // registers them first.)
    let e = QuantizedModel::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("'Gain'") && e.contains("gain") && e.contains("register_layer"), "{e}");
    register_layer("Gain", load_gain).unwrap();
    let e = QuantizedModel::from_bytes(&bytes).unwrap_err().to_string();
    assert!(e.contains("'Abs'") && e.contains("register_int8_layer"), "{e}");
    register_int8_layer("Abs", load_table).unwrap();
    let loaded = QuantizedModel::from_bytes(&bytes).unwrap();
    assert_eq!(loaded.forward(&x).unwrap(), q.forward(&x).unwrap());
    assert_eq!(loaded.plan(), q.plan());
    // A built-in kind cannot be taken.
    let e = register_layer("Conv2d", load_gain).unwrap_err().to_string();
    assert!(e.contains("built-in"), "{e}");
}

#[test]
fn a_layer_without_save_is_refused_by_save_naming_it() {
    #[derive(Debug)]
    struct Opaque;
    impl Module for Opaque {
        fn kind(&self) -> &'static str {
            "Opaque"
        }
        fn forward(&self, x: &ArrayD<f32>) -> qnn::Result<ArrayD<f32>> {
            Ok(x.clone())
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv", Conv2d::new(3, 4, 1), x).unwrap();
    let y = g.layer("mystery", Opaque, y).unwrap();
    g.output(y);
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 1);
    let q = quantize(graph, &[1, 3, 4, 4]);
    let e = q.to_bytes().unwrap_err().to_string();
    assert!(e.contains("mystery") && e.contains("Opaque") && e.contains("Module::save"), "{e}");
}

#[test]
fn layers_kept_in_float_are_saved_with_their_weights() {
    let x = images(7, &[2, 3, 8, 8]);
    let mapping = QConfigMapping::new(QConfig::default()).skip_kind("Conv2d").skip_name("fc");
    let mut p = prepare(shapes_model(), &mapping).unwrap();
    p.calibrate(&images(8, &[2, 3, 8, 8])).unwrap();
    let q = p.convert().unwrap();
    assert!(matches!(&q.plan()[0].mode, Mode::Float(_)));
    let again = reload(&q);
    assert_eq!(again.forward(&x).unwrap(), q.forward(&x).unwrap());
}

fn golden() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/ops_golden.safetensors")).unwrap()
}

fn tensor_f32(st: &safetensors::SafeTensors<'_>, key: &str) -> ArrayD<f32> {
    let t = st.tensor(key).unwrap();
    let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

/// Every op of the golden file, after a quantize with the input's parameters, gives PyTorch's
/// quantized bytes (and keeps the parameters); in float, PyTorch's float values.
#[test]
fn resampling_padding_and_clamps_match_pytorch() {
    use qnn::layers::{Hardtanh, Pad2d, PadMode, Upsample, UpsampleMode};
    let bytes = golden();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let x = tensor_f32(&st, "input");
    let scale = tensor_f32(&st, "scale")[[0]];
    let zp = i64::from_le_bytes(st.tensor("zero_point").unwrap().data().try_into().unwrap()) as i32;
    let bilinear = |size: Option<[usize; 2]>, factor: Option<f64>, align_corners| Upsample {
        size,
        scale_factor: factor.map(|f| [f; 2]),
        mode: UpsampleMode::Bilinear { align_corners },
    };
    let cases: Vec<(&str, Box<dyn Module>)> = vec![
        ("nearest2", Box::new(Upsample::nearest(2))),
        ("nearest_size", Box::new(Upsample { size: Some([9, 11]), scale_factor: None, mode: UpsampleMode::Nearest })),
        ("bilinear2", Box::new(bilinear(None, Some(2.0), false))),
        ("bilinear_size_ac", Box::new(bilinear(Some([7, 10]), None, true))),
        ("bilinear_down", Box::new(bilinear(Some([3, 4]), None, false))),
        ("pad_zero", Box::new(Pad2d { pads: [1, 2, 0, 1], mode: PadMode::Constant(0.0) })),
        ("pad_reflect", Box::new(Pad2d { pads: [2, 1, 1, 2], mode: PadMode::Reflect })),
        ("pad_replicate", Box::new(Pad2d { pads: [1, 3, 2, 0], mode: PadMode::Replicate })),
        ("hardtanh", Box::new(Hardtanh { min_val: -0.5, max_val: 0.7 })),
        ("shuffle3", Box::new(ChannelShuffle { groups: 3 })),
        ("gelu", Box::new(GELU { tanh: false })),
    ];
    let fixed = QConfig::new(qobserve::ObserverSpec::FixedQParams { scale, zero_point: zp }, QConfig::default().weight);
    for (name, op) in cases {
        let want_f = tensor_f32(&st, &format!("{name}.f32"));
        let got_f = op.forward(&x).unwrap();
        assert_eq!(got_f.shape(), want_f.shape(), "{name}");
        let worst = got_f.iter().zip(want_f.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{name}: float differs from PyTorch's by {worst}");

        let mut g = GraphBuilder::new();
        let input = g.input("x");
        // Ops that keep their input's parameters take a float input as it is: quantize first.
        let input = g.layer("quant", qnn::layers::QuantStub, input).unwrap();
        let y = g.boxed(name, op, input).unwrap();
        g.output(y);
        let mut p = prepare(g.build().unwrap(), &QConfigMapping::new(fixed.clone())).unwrap();
        p.calibrate(&x).unwrap();
        let q = p.convert().unwrap();
        let Value::U8 { data, shape, q: out_q } = q.forward_value(&x).unwrap() else { panic!("{name}: int8 out") };
        assert_eq!(out_q, QuantU8 { scale, zero_point: zp }, "{name} keeps its input's parameters");
        let want = st.tensor(&format!("{name}.int8")).unwrap();
        assert_eq!(shape.as_slice(), want.shape(), "{name}");
        let [n, c, h, w] = shape[..] else { panic!() };
        let mut same = 0;
        for b in 0..n {
            for ch in 0..c {
                for yy in 0..h {
                    for xx in 0..w {
                        let ours = data[((b * h + yy) * w + xx) * c + ch];
                        same += usize::from(ours == want.data()[((b * c + ch) * h + yy) * w + xx]);
                    }
                }
            }
        }
        assert_eq!(same, data.len(), "{name}: {same} of {} bytes equal PyTorch's", data.len());
    }
}

#[test]
fn chunk_and_split_write_one_slice_per_piece() {
    let x = images(4, &[2, 6, 3, 3]);
    let mut g = GraphBuilder::new();
    let input = g.input("x");
    let y = g.layer("conv", Conv2d::new(6, 6, 1), input).unwrap();
    let parts = g.chunk("halves", y, 2, 1).unwrap();
    let thirds = g.split("thirds", y, &[1, 2, 3], 1).unwrap();
    let back = g.cat("joined", &[parts[1], parts[0]]).unwrap();
    for t in [back, thirds[2]] {
        g.output(t);
    }
    let mut graph = g.build().unwrap();
    zoo::randomize(&mut graph, 6);
    let float = graph.run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(float[0].shape(), &[2, 6, 3, 3]);
    assert_eq!(float[1].shape(), &[2, 3, 3, 3]);
    let names = graph.node_names().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(names.contains(&"halves.1".to_string()) && names.contains(&"thirds.2".to_string()), "{names:?}");
    let mut p = prepare(graph, &QConfigMapping::new(QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let outs = q.forward_inputs(std::slice::from_ref(&x)).unwrap();
    assert!(sqnr_db(&float[0], &outs[0]) > 30.0 && sqnr_db(&float[1], &outs[1]) > 30.0);
    // A piece past the axis is an error naming the node.
    let mut g = GraphBuilder::new();
    let input = g.input("x");
    let parts = g.split("bad", input, &[4, 4], 1).unwrap();
    g.output(parts[1]);
    let e = g.build().unwrap().run(&[images(1, &[1, 6, 2, 2])]).unwrap_err().to_string();
    assert!(e.contains("bad.1") && e.contains("Slice"), "{e}");
}

/// Shape inference (each op's `output_shape`) against execution: the float graph's inferred
/// shapes equal, value by value, what the int8 model computes; every value has a name, an
/// element type and a layout.
#[test]
fn values_have_names_shapes_types_and_layouts() {
    use qnn::{ElemType, Layout};
    let input: &[usize] = &[2, 3, 8, 8];
    let graph = shapes_model();
    let info = graph.value_info(&[input]).unwrap();
    assert_eq!(info.len(), graph.node_names().len() + 1);
    assert_eq!((info[0].name.as_str(), info[0].layout), ("x", Layout::Nchw));
    let find = |v: &[qnn::ValueInfo], n: &str| v.iter().find(|i| i.name == n).unwrap().clone();
    assert_eq!(find(&info, "to_tokens").shape, [2, 6, 64]);
    assert_eq!(find(&info, "to_tokens").layout, Layout::RowMajor);
    assert_eq!(find(&info, "fc").shape, [2, 5]);
    let q = quantize(shapes_model_fused(), input);
    let qinfo = q.value_info(&[input]).unwrap();
    let finfo = shapes_model_fused().value_info(&[input]).unwrap();
    assert_eq!(qinfo.len(), finfo.len());
    for (a, b) in qinfo.iter().zip(&finfo) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape), "inferred and computed shapes differ");
    }
    let conv = find(&qinfo, "conv1");
    assert!(matches!(conv.dtype, ElemType::U8(_)) && conv.layout == Layout::Nhwc, "{conv:?}");
    let tokens = find(&qinfo, "to_tokens");
    assert!(matches!(tokens.dtype, ElemType::U8(_)) && tokens.layout == Layout::RowMajor, "{tokens:?}");
    assert!(matches!(find(&qinfo, "softmax").dtype, ElemType::U8(_)));
    // A shape a node cannot take: the error names it, before anything runs.
    let e = graph.value_info(&[&[2, 4, 8, 8]]).unwrap_err().to_string();
    assert!(e.contains("conv1") && e.contains("Conv2d") && e.contains("[2, 4, 8, 8]"), "{e}");
    // The zoo's graphs infer what they compute.
    let mbv3 = zoo::mobilenet_v3_large_width(10, 0.25);
    let last = mbv3.value_info(&[&[1, 3, 64, 64]]).unwrap().pop().unwrap();
    assert_eq!(last.shape, [1, 10]);
}

#[test]
fn a_per_channel_operand_broadcasts_in_additions() {
    // x + conv(pool(x)): a [n, c, 1, 1] term added to every pixel, either operand order.
    let build = || {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let y = g.layer("conv", Conv2d::new(3, 4, 3).padding(1), x).unwrap();
        let s = g.layer("pool", qnn::layers::AdaptiveAvgPool2d(1, 1), y).unwrap();
        let s = g.layer("fc", Conv2d::new(4, 4, 1), s).unwrap();
        let a = g.add("shift", y, s).unwrap();
        let b = g.add("shift_swapped", s, y).unwrap();
        g.output(a);
        g.output(b);
        let mut graph = g.build().unwrap();
        zoo::randomize(&mut graph, 8);
        graph
    };
    let x = images(9, &[2, 3, 5, 5]);
    let float = build().run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(float[0].shape(), &[2, 4, 5, 5]);
    assert_eq!(float[0], float[1]);
    let q = quantize(build(), &[2, 3, 5, 5]);
    let got = q.forward_inputs(std::slice::from_ref(&x)).unwrap();
    for (f, g) in float.iter().zip(&got) {
        assert!(sqnr_db(f, g) > 30.0, "{}", sqnr_db(f, g));
    }
    assert_eq!(got[0], got[1], "the operand order does not change the int8 sum");
    let e = build().value_info(&[&[2, 3, 5, 5]]).unwrap();
    assert_eq!(e.last().unwrap().shape, [2, 4, 5, 5]);
}

/// An upsampling transposed convolution (kernel 2, stride 2) runs in int8: its bytes are the
/// int8 1x1 convolution of every tap's output (calibrated on the same images: the same values,
/// rearranged), each tap moved to its pixel; saved and loaded, the same bits. One whose taps
/// overlap (kernel 3, stride 2) stays in float and says why.
#[test]
fn an_upsampling_transposed_convolution_runs_in_int8() {
    use qnn::layers::ConvTranspose2d;
    let (ic, oc, k) = (6, 5, 2);
    let up = {
        let mut m = ConvTranspose2d { stride: [k, k], ..ConvTranspose2d::new(ic, oc, k) };
        zoo::randomize(&mut m, 31);
        m
    };
    let stem = {
        let mut c = Conv2d::new(3, ic, 3).padding(1);
        zoo::randomize(&mut c, 7);
        c
    };
    let model = |m: Box<dyn Module>| {
        let mut g = GraphBuilder::new();
        let x = g.input("x");
        let y = g.layer("conv", stem.clone(), x).unwrap();
        let y = g.boxed("up", m, y).unwrap();
        g.output(y);
        g.build().unwrap()
    };
    // The same computation as a 1x1 convolution: output channel (ky * 2 + kx) * oc + o.
    let mut pw = Conv2d::new(ic, k * k * oc, 1);
    for ci in 0..ic {
        for o in 0..oc {
            for t in 0..k * k {
                pw.weight[[t * oc + o, ci, 0, 0]] = up.weight[[ci, o, t / k, t % k]];
                pw.bias.as_mut().unwrap()[t * oc + o] = up.bias.as_ref().unwrap()[o];
            }
        }
    }
    let twin = model(Box::new(pw));
    let graph = model(Box::new(up));
    let x = images(4, &[2, 3, 5, 4]);
    let float = graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    let q = quantize(graph, &[2, 3, 5, 4]);
    let qt = quantize(twin, &[2, 3, 5, 4]);
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    assert_eq!(mode("up"), Mode::Int8);
    let Value::U8 { data: got, shape, .. } = q.forward_values(std::slice::from_ref(&x)).unwrap().remove(0) else {
        panic!("int8 output")
    };
    assert_eq!(shape, [2, oc, 10, 8]);
    let Value::U8 { data: taps, .. } = qt.forward_values(std::slice::from_ref(&x)).unwrap().remove(0) else {
        panic!("int8 output")
    };
    // NHWC bytes: input pixel (b, y, x)'s tap (ky, kx) is output pixel (b, 2y + ky, 2x + kx).
    for b in 0..2 {
        for (yy, xx) in (0..5).flat_map(|y| (0..4).map(move |x| (y, x))) {
            for t in 0..k * k {
                let (oy, ox) = (yy * k + t / k, xx * k + t % k);
                let at = ((b * 10 + oy) * 8 + ox) * oc;
                let from = ((b * 5 + yy) * 4 + xx) * k * k * oc + t * oc;
                assert_eq!(got[at..at + oc], taps[from..from + oc], "image {b}, pixel ({yy}, {xx}), tap {t}");
            }
        }
    }
    let db = sqnr_db(&float, &q.forward(&x).unwrap());
    assert!(db > 30.0, "int8 SQNR {db:.1} dB");
    assert_eq!(reload(&q).forward(&x).unwrap(), q.forward(&x).unwrap());
    // Overlapping taps: float, with the reason in the plan.
    let overlap = ConvTranspose2d { stride: [2, 2], ..ConvTranspose2d::new(ic, oc, 3) };
    let q = quantize(model(Box::new(overlap)), &[2, 3, 5, 4]);
    let Mode::Float(why) = q.plan().iter().find(|e| e.name == "up").unwrap().mode.clone() else {
        panic!("overlapping taps run in float")
    };
    let why = why.to_string();
    assert!(why.contains("float") && why.contains("stride"), "{why}");
}

/// A depthwise 1x1 convolution whose channels share one weight and one bias (`x * k + b`
/// with scalar constants, as ONNX imports it) runs as one table: each output code is the map
/// of its input code's value, rounded once (no weight quantized); saved and loaded, the same.
#[test]
fn a_scalar_affine_map_runs_as_one_table() {
    use qnn::layers::FusedAct;
    let c = 6;
    let mut stem = Conv2d::new(3, c, 3).padding(1);
    zoo::randomize(&mut stem, 5);
    let mut map = Conv2d { activation: FusedAct::Relu, ..Conv2d::new(c, c, 1).groups(c) };
    map.weight.fill(0.633);
    map.bias.as_mut().unwrap().fill(-0.547);
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("stem", stem, x).unwrap();
    let z = g.layer("map", map, y).unwrap();
    g.output(y);
    g.output(z);
    let q = quantize(g.build().unwrap(), &[2, 3, 5, 4]);
    let x = images(9, &[2, 3, 5, 4]);
    let outs = q.forward_values(std::slice::from_ref(&x)).unwrap();
    let (Value::U8 { data: a, q: qa, .. }, Value::U8 { data: b, q: qb, .. }) = (&outs[0], &outs[1]) else {
        panic!("int8 outputs")
    };
    for (&i, &o) in a.iter().zip(b) {
        let v = 0.633f32.mul_add(qa.scale * (i as i32 - qa.zero_point) as f32, -0.547).max(0.0);
        let want = (v / qb.scale).round_ties_even() as i32 + qb.zero_point;
        assert_eq!(o as i32, want.clamp(0, 255), "code {i}");
    }
    assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 20, "a spread of input codes");
    // A table, not a convolution's kernel.
    assert!(!q.kernels().iter().any(|(n, _)| *n == "map"), "{:?}", q.kernels());
    let back = reload(&q).forward_values(std::slice::from_ref(&x)).unwrap();
    assert_eq!(back[1].to_f32(), outs[1].to_f32());
    // Channels of their own weights stay a convolution (after a ReLU, which keeps the map
    // from folding into the convolution before it).
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let mut per_channel = Conv2d::new(c, c, 1).groups(c);
    zoo::randomize(&mut per_channel, 3);
    let y = g.layer("stem", Conv2d::new(3, c, 1), x).unwrap();
    let y = g.layer("relu", ReLU, y).unwrap();
    let z = g.layer("map", per_channel, y).unwrap();
    g.output(z);
    let q = quantize(g.build().unwrap(), &[2, 3, 5, 4]);
    assert!(q.kernels().iter().any(|(n, k)| *n == "map" && k.contains("depthwise")), "{:?}", q.kernels());
}
