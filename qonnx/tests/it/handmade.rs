//! Models built node by node with the proto structs: what each op's attributes do, the
//! folding of shape arithmetic, and the errors.

use ndarray::{ArrayD, IxDyn};
use prost::Message;
use qonnx::proto::{
    data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, TypeTensor, ValueInfoProto,
};
use qonnx::ImportOptions;

fn value(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Some(v) => Dimension { dim_value: Some(*v), ..Default::default() },
            None => Dimension { dim_param: Some("batch".into()), ..Default::default() },
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeTensor { elem_type: Some(data_type::FLOAT), shape: Some(TensorShapeProto { dim }) }),
            denotation: None,
        }),
        doc_string: None,
    }
}

fn floats(name: &str, dims: &[i64], v: Vec<f32>) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(data_type::FLOAT),
        float_data: v,
        name: Some(name.into()),
        ..Default::default()
    }
}

fn int64s(name: &str, v: Vec<i64>) -> TensorProto {
    TensorProto {
        dims: vec![v.len() as i64],
        data_type: Some(data_type::INT64),
        int64_data: v,
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A 0-d INT64 initializer.
fn scalar(name: &str, v: i64) -> TensorProto {
    TensorProto {
        dims: vec![],
        data_type: Some(data_type::INT64),
        int64_data: vec![v],
        name: Some(name.into()),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), ints: v.to_vec(), ..Default::default() }
}

fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto { name: Some(name.into()), s: Some(v.as_bytes().to_vec()), ..Default::default() }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), i: Some(v), ..Default::default() }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: Some(name.into()),
        op_type: Some(op.into()),
        attribute,
        ..Default::default()
    }
}

fn model(opset: i64, input: ValueInfoProto, nodes: Vec<NodeProto>, inits: Vec<TensorProto>, out: &str) -> Vec<u8> {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        producer_name: Some("qonnx tests".into()),
        graph: Some(GraphProto {
            node: nodes,
            name: Some("g".into()),
            initializer: inits,
            input: vec![input],
            output: vec![value(out, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn ramp(shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|k| ((k * 7) % 11) as f32 * 0.25 - 1.0).collect()).unwrap()
}

/// A convolution with asymmetric padding and a bias, then a ReLU, at batch 1 and 3: the
/// padding becomes a `Pad2d` before the convolution, and values match a direct computation.
#[test]
fn conv_with_asymmetric_pads() {
    let w: Vec<f32> = (0..2 * 3 * 2 * 2).map(|k| (k as f32 - 10.0) * 0.1).collect();
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(4), Some(5)]),
        vec![
            node(
                "Conv",
                "conv",
                &["x", "w", "b"],
                &["y"],
                vec![ints("pads", &[0, 1, 1, 0]), ints("kernel_shape", &[2, 2])],
            ),
            node("Relu", "relu", &["y"], &["z"], vec![]),
        ],
        vec![floats("w", &[2, 3, 2, 2], w.clone()), floats("b", &[2], vec![0.5, -0.25])],
        "z",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    assert_eq!(m.graph.node_names(), ["conv:pad", "conv", "relu"]);
    assert!(m.inputs[0].dynamic_batch);
    for n in [1, 3] {
        let x = ramp(&[n, 3, 4, 5]);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        // Padded by one row at the bottom and one column on the left: out 4x5.
        assert_eq!(y.shape(), &[n, 2, 4, 5]);
        for b in 0..n {
            for o in 0..2 {
                for i in 0..4 {
                    for j in 0..5 {
                        let mut acc = [0.5f32, -0.25][o];
                        for c in 0..3 {
                            for ki in 0..2 {
                                for kj in 0..2 {
                                    let (yy, xx) = (i + ki, (j + kj) as isize - 1);
                                    if yy < 4 && (0..5).contains(&xx) {
                                        acc += w[((o * 3 + c) * 2 + ki) * 2 + kj] * x[[b, c, yy, xx as usize]];
                                    }
                                }
                            }
                        }
                        let got = y[[b, o, i, j]];
                        assert!((got - acc.max(0.0)).abs() < 1e-5, "{got} vs {}", acc.max(0.0));
                    }
                }
            }
        }
    }
}

/// `x.view(x.size(0), -1)` as the TorchScript exporter writes it (Shape, Gather, Unsqueeze,
/// Concat, Reshape), then MatMul + Add: folded at import into a reshape that keeps any batch
/// size, and one linear layer with a bias.
#[test]
fn shape_arithmetic_folds_and_keeps_the_batch() {
    let w: Vec<f32> = (0..12 * 2).map(|k| k as f32 * 0.05 - 0.5).collect();
    let bytes = model(
        13,
        value("x", &[None, Some(3), Some(2), Some(2)]),
        vec![
            node("Shape", "shape", &["x"], &["s"], vec![]),
            node("Gather", "gather", &["s", "zero"], &["n"], vec![int("axis", 0)]),
            node("Unsqueeze", "unsq", &["n", "axes0"], &["n1"], vec![]),
            node("Concat", "cat", &["n1", "minus1"], &["target"], vec![int("axis", 0)]),
            node("Reshape", "flatten", &["x", "target"], &["f"], vec![]),
            node("MatMul", "fc", &["f", "w"], &["mm"], vec![]),
            node("Add", "fc_bias", &["mm", "b"], &["y"], vec![]),
        ],
        vec![
            TensorProto {
                dims: vec![],
                data_type: Some(data_type::INT64),
                int64_data: vec![0],
                name: Some("zero".into()),
                ..Default::default()
            },
            int64s("axes0", vec![0]),
            int64s("minus1", vec![-1]),
            floats("w", &[12, 2], w.clone()),
            floats("b", &[2], vec![1.0, -1.0]),
        ],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    assert_eq!(m.graph.node_names(), ["flatten", "fc"], "shape arithmetic folded, the bias absorbed");
    let x = ramp(&[4, 3, 2, 2]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert_eq!(y.shape(), &[4, 2]);
    for b in 0..4 {
        for o in 0..2 {
            let flat: Vec<f32> = x.index_axis(ndarray::Axis(0), b).iter().copied().collect();
            let want: f32 = [1.0, -1.0][o] + (0..12).map(|k| flat[k] * w[k * 2 + o]).sum::<f32>();
            assert!((y[[b, o]] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn unsupported_ops_name_the_node_and_list_what_is() {
    let bytes = model(
        17,
        value("x", &[Some(1), Some(3), Some(4), Some(4)]),
        vec![node("LRN", "/features/norm1/LRN", &["x"], &["y"], vec![int("size", 3)])],
        vec![],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    for part in ["/features/norm1/LRN", "op LRN", "opset 17", "supported ops", "Conv", "BatchNormalization"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    let mut custom = node("Relu", "mine", &["x"], &["y"], vec![]);
    custom.domain = Some("com.example".into());
    let bytes = model(17, value("x", &[Some(1), Some(3)]), vec![custom], vec![], "y");
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'mine'") && e.contains("com.example"), "{e}");
}

#[test]
fn opsets_outside_the_range_are_refused() {
    let relu = || vec![node("Relu", "r", &["x"], &["y"], vec![])];
    for opset in [5, 22] {
        let bytes = model(opset, value("x", &[Some(1), Some(3)]), relu(), vec![], "y");
        let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
        assert!(e.contains(&format!("opset {opset}")) && e.contains("6-21"), "{e}");
    }
    for opset in [6, 9, 21] {
        let bytes = model(opset, value("x", &[Some(1), Some(3)]), relu(), vec![], "y");
        qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    }
}

#[test]
fn settings_we_cannot_honour_are_errors() {
    let x4 = || value("x", &[Some(1), Some(2), Some(4), Some(4)]);
    let w = || floats("w", &[2, 2, 1, 1], vec![1.0, 0.0, 0.0, 1.0]);
    let cases: Vec<(Vec<NodeProto>, Vec<TensorProto>, &[&str])> = vec![
        (
            vec![node("Conv", "c", &["x", "w", "b"], &["y"], vec![])],
            vec![w(), floats("b", &[3], vec![0.0; 3])],
            &["'c'", "bias of shape [3] for 2 output channels"],
        ),
        (
            vec![node("Conv", "c", &["x", "w"], &["y"], vec![ints("kernel_shape", &[3, 3])])],
            vec![w()],
            &["kernel_shape [3, 3] disagrees"],
        ),
        (
            vec![node("Conv", "empty", &["x", "w0"], &["y"], vec![attr_s("auto_pad", "SAME_UPPER")])],
            vec![floats("w0", &[2, 2, 0, 1], vec![])],
            &["'empty'", "every dimension must be at least 1"],
        ),
        (
            vec![node(
                "HardSigmoid",
                "hs",
                &["x"],
                &["y"],
                vec![AttributeProto { name: Some("beta".into()), f: Some(0.25), ..Default::default() }],
            )],
            vec![],
            &["'hs'", "beta 0.25", "alpha * x + 0.5"],
        ),
        (
            vec![node(
                "MaxPool",
                "p",
                &["x"],
                &["y"],
                vec![ints("kernel_shape", &[2, 2]), ints("pads", &[0, 0, 1, 1])],
            )],
            vec![],
            &["not symmetric"],
        ),
        (
            // Three values do not broadcast against [2, 4, 4] (four along the width would).
            vec![node("Mul", "scale", &["x", "k"], &["y"], vec![])],
            vec![floats("k", &[3], vec![2.0; 3])],
            &["'scale'", "one value, or one per channel"],
        ),
        (vec![node("Concat", "cat", &["x", "x"], &["y"], vec![int("axis", 0)])], vec![], &["'cat'", "axis 0", "batch"]),
    ];
    for (nodes, inits, parts) in cases {
        let bytes = model(17, x4(), nodes, inits, "y");
        let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
        for p in parts {
            assert!(e.contains(p), "{p:?} missing from: {e}");
        }
    }
}

#[test]
fn symbolic_sizes_beyond_the_batch_need_a_shape() {
    let relu = || vec![node("Relu", "r", &["x"], &["y"], vec![])];
    let bytes = model(17, value("x", &[None, Some(3), None, None]), relu(), vec![], "y");
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("dimension 2 is symbolic") && e.contains("input_shapes"), "{e}");
    let mut opts = ImportOptions::default();
    opts.input_shapes.insert("x".into(), vec![2, 3, 8, 8]);
    let m = qonnx::from_bytes(&bytes, &opts).unwrap();
    assert_eq!(m.inputs[0].shape, [2, 3, 8, 8]);
}

/// Damaged files: every truncation and many random byte changes of a valid model import
/// or fail with an error, and whatever imports runs a small input or refuses it; never a
/// panic.
#[test]
fn damaged_files_are_errors_not_panics() {
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(4), Some(5)]),
        vec![
            node("Conv", "conv", &["x", "w", "b"], &["y"], vec![ints("pads", &[1, 1, 1, 1]), int("group", 1)]),
            node("GlobalAveragePool", "gap", &["y"], &["z"], vec![]),
            node("Flatten", "flat", &["z"], &["f"], vec![]),
        ],
        vec![floats("w", &[2, 3, 3, 3], vec![0.1; 54]), floats("b", &[2], vec![0.5, -0.25])],
        "f",
    );
    qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    for cut in 0..bytes.len() {
        qonnx::fuzzing::onnx_model(&bytes[..cut]);
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        qonnx::fuzzing::onnx_model(&b);
    }
    // Inputs the fuzzer once failed on.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/load_onnx");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            qonnx::fuzzing::onnx_model(&std::fs::read(e.unwrap().path()).unwrap());
        }
    }
}

#[test]
fn external_data_is_read_beside_the_model() {
    let dir = std::env::temp_dir().join(format!("qonnx-external-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w: Vec<f32> = vec![2.0, -1.0, 0.5, 3.0];
    let raw: Vec<u8> = [vec![0u8; 16], w.iter().flat_map(|v| v.to_le_bytes()).collect()].concat();
    std::fs::write(dir.join("weights.bin"), &raw).unwrap();
    let entry = |k: &str, v: &str| qonnx::proto::StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
    let t = TensorProto {
        dims: vec![2, 2],
        data_type: Some(data_type::FLOAT),
        name: Some("w".into()),
        data_location: Some(1),
        external_data: vec![entry("location", "weights.bin"), entry("offset", "16"), entry("length", "16")],
        ..Default::default()
    };
    let bytes = model(
        17,
        value("x", &[None, Some(2)]),
        vec![node("Gemm", "fc", &["x", "w"], &["y"], vec![int("transB", 1)])],
        vec![t],
        "y",
    );
    std::fs::write(dir.join("m.onnx"), &bytes).unwrap();
    let m = qonnx::load(dir.join("m.onnx"), &ImportOptions::default()).unwrap();
    let y = m.graph.run(&[ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![1.0, 2.0]).unwrap()]).unwrap().remove(0);
    assert_eq!(y.as_slice().unwrap(), &[0.0, 6.5]);
    // From bytes alone the file cannot be found, and the error says what to do.
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("weights.bin") && e.contains("qonnx::load"), "{e}");
    // A length past the end of the file is an error, not a read of whatever is there.
    std::fs::write(dir.join("weights.bin"), &raw[..20]).unwrap();
    let e = qonnx::load(dir.join("m.onnx"), &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("reach past the end"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A computed value with a constant per channel (or one for all): multiplied, added and
/// subtracted either way as a depthwise 1x1 convolution; divided by a scalar as a
/// `MulScalar` (by its reciprocal).
#[test]
fn constants_per_channel_are_depthwise_scales() {
    let k = floats("k", &[2, 1, 1], vec![2.0, -0.5]);
    let one = floats("one", &[], vec![4.0]);
    let bytes = model(
        17,
        value("x", &[None, Some(2), Some(3), Some(3)]),
        vec![
            node("Mul", "mul", &["x", "k"], &["a"], vec![]),
            node("Add", "add", &["one", "a"], &["b"], vec![]),
            node("Sub", "sub", &["k", "b"], &["c"], vec![]),
            node("Div", "div", &["c", "one"], &["d"], vec![]),
        ],
        vec![k, one],
        "d",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    assert_eq!(
        m.graph.node_kinds().iter().map(|(_, k)| *k).collect::<Vec<_>>(),
        ["Conv2d", "Conv2d", "Conv2d", "MulScalar"]
    );
    let x = ramp(&[2, 2, 3, 3]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    for (i, (&got, &v)) in y.iter().zip(x.iter()).enumerate() {
        let kc = [2.0f32, -0.5][(i / 9) % 2];
        let want = (kc - (4.0 + v * kc)) / 4.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

/// Sizes a file merely declares (an input of 2^32 elements) allocate nothing at import: the
/// graph is built and its shapes inferred; only running it would need the memory.
#[test]
fn declared_sizes_allocate_nothing_at_import() {
    let big = 1i64 << 28;
    let bytes = model(
        13,
        value("x", &[Some(1), Some(4), Some(big), Some(4)]),
        vec![
            node("Slice", "cut", &["x", "s", "e", "ax"], &["a"], vec![]),
            node("Mul", "scale", &["a", "k"], &["b"], vec![]),
            node("GlobalMaxPool", "gmp", &["b"], &["y"], vec![]),
        ],
        vec![int64s("s", vec![0]), int64s("e", vec![2]), int64s("ax", vec![3]), floats("k", &[], vec![2.0])],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    let shapes: Vec<&[usize]> = m.inputs.iter().map(|i| i.shape.as_slice()).collect();
    let info = m.graph.value_info(&shapes).unwrap();
    assert_eq!(info.last().unwrap().shape, [1, 4, 1, 1]);
}

/// ViT's class token and positional embedding as the TorchScript exporter writes them (the
/// token expanded to the batch through `Equal` / `Where` / `Expand` on the shape, `Concat`
/// with the patches, `Add` of the embedding), then the batch moved off axis 0 and merged
/// with another axis as `nn.MultiheadAttention` does (`Transpose`, `Reshape` to
/// `[tokens, batch * features]` from shape arithmetic, `Unsqueeze` / `Squeeze`, and back),
/// then one token taken by `Gather` at an index folded from `Mod` (Python's sign). It runs
/// at any batch size, in float and in int8.
#[test]
fn class_token_and_a_batch_moved_off_axis_0() {
    let cls = vec![0.5f32, -1.0, 0.25];
    let pos: Vec<f32> = (0..9).map(|k| k as f32 * 0.1 - 0.3).collect();
    let one = TensorProto {
        dims: vec![1],
        data_type: Some(data_type::INT64),
        int64_data: vec![1],
        name: Some("value".into()),
        ..Default::default()
    };
    let fill = AttributeProto { name: Some("value".into()), t: Some(one), ..Default::default() };
    let bytes = model(
        17,
        value("x", &[None, Some(2), Some(3)]),
        vec![
            node("Shape", "shape", &["x"], &["s"], vec![]),
            node("Gather", "n", &["s", "zero"], &["n"], vec![int("axis", 0)]),
            node("Unsqueeze", "n1", &["n", "axes0"], &["n1"], vec![]),
            node("Concat", "target", &["n1", "minus1", "minus1"], &["target"], vec![int("axis", 0)]),
            node("ConstantOfShape", "ones", &["three"], &["ones"], vec![fill]),
            node("Mul", "m1", &["ones", "minus1"], &["m1"], vec![]),
            node("Equal", "eq", &["target", "m1"], &["eq"], vec![]),
            node("Where", "where", &["eq", "ones", "target"], &["shp"], vec![]),
            node("Expand", "expand", &["cls", "shp"], &["cls_b"], vec![]),
            node("Concat", "tokens", &["cls_b", "x"], &["t"], vec![int("axis", 1)]),
            node("Add", "pos", &["t", "pos"], &["u"], vec![]),
            node("Transpose", "to_tokens_first", &["u"], &["v"], vec![ints("perm", &[1, 0, 2])]),
            node("Shape", "vshape", &["v"], &["vs"], vec![]),
            node("Gather", "vn", &["vs", "one"], &["vn"], vec![int("axis", 0)]),
            node("Mul", "vn3", &["vn", "three_s"], &["vn3"], vec![]),
            node("Unsqueeze", "vn3u", &["vn3", "axes0"], &["vn3u"], vec![]),
            node("Concat", "merged", &["three", "vn3u"], &["merged"], vec![int("axis", 0)]),
            node("Reshape", "merge", &["v", "merged"], &["w"], vec![]),
            node("Unsqueeze", "unsq", &["w", "axes0"], &["w1"], vec![]),
            node("Squeeze", "sq", &["w1", "axes0"], &["w2"], vec![]),
            node("Unsqueeze", "vnu", &["vn", "axes0"], &["vnu"], vec![]),
            node("Concat", "split", &["three", "vnu", "three"], &["split"], vec![int("axis", 0)]),
            node("Reshape", "unmerge", &["w2", "split"], &["w3"], vec![]),
            node("Transpose", "to_batch_first", &["w3"], &["z"], vec![ints("perm", &[1, 0, 2])]),
            node("Mod", "index", &["minus5", "two"], &["k"], vec![]),
            node("Gather", "take", &["z", "k"], &["y"], vec![int("axis", 1)]),
        ],
        vec![
            scalar("zero", 0),
            scalar("one", 1),
            scalar("three_s", 3),
            scalar("minus5", -5),
            scalar("two", 2),
            int64s("axes0", vec![0]),
            int64s("minus1", vec![-1]),
            int64s("three", vec![3]),
            floats("cls", &[1, 1, 3], cls.clone()),
            floats("pos", &[1, 3, 3], pos.clone()),
        ],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    // Token 1 (-5 mod 2 with the divisor's sign; C's fmod would give -1, the last token).
    let want =
        |x: &ArrayD<f32>| ArrayD::from_shape_fn(IxDyn(&[x.shape()[0], 3]), |i| x[[i[0], 0, i[1]]] + pos[3 + i[1]]);
    for n in [1, 3] {
        let x = ramp(&[n, 2, 3]);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("batch {n}: {e}")).remove(0);
        assert_eq!(y, want(&x), "batch {n}");
    }
    // The class token joins too: token 0 is it plus its embedding (same graph up to `z`).
    let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    p.calibrate(&ramp(&[4, 2, 3])).unwrap();
    let q = p.convert().unwrap();
    let x = ramp(&[3, 2, 3]);
    let y = q.forward(&x).unwrap();
    let w = want(&x);
    assert_eq!(y.shape(), w.shape());
    for (a, b) in y.iter().zip(&w) {
        assert!((a - b).abs() < 0.03, "int8 {a} vs float {b}");
    }
    let saved = qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(saved.forward(&x).unwrap(), y, "the same after save and load");
}

/// A constant concatenated with computed values must be one image of theirs, and `Gather`
/// of a computed value takes one index: anything else names the node.
#[test]
fn constants_beside_computed_values_are_checked() {
    let bytes = model(
        17,
        value("x", &[None, Some(2), Some(3)]),
        vec![node("Concat", "cat", &["k", "x"], &["y"], vec![int("axis", 1)])],
        vec![floats("k", &[2, 1, 3], vec![0.0; 6])],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'cat'") && e.contains("[2, 1, 3]") && e.contains("[1, ...]"), "{e}");
    let bytes = model(
        17,
        value("x", &[None, Some(2), Some(3)]),
        vec![node("Gather", "take", &["x", "idx"], &["y"], vec![int("axis", 1)])],
        vec![int64s("idx", vec![0, 1])],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'take'") && e.contains("one constant index"), "{e}");
}

/// `Where(IsNaN(x), 0, x)` imports as one `NanToZero`: NaNs become 0, other values stay; an
/// `IsNaN` read by anything else is an error naming the node.
#[test]
fn nan_to_zero_imports_as_one_op() {
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(4)]),
        vec![
            node("Softmax", "p", &["x"], &["p"], vec![int("axis", -1)]),
            node("IsNaN", "isnan", &["p"], &["n"], vec![]),
            node("Where", "clean", &["n", "zero", "p"], &["y"], vec![]),
        ],
        vec![floats("zero", &[], vec![0.0])],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
    assert_eq!(kinds, ["Softmax", "NanToZero"]);
    let mut x = ramp(&[2, 3, 4]);
    x[[1, 2, 0]] = f32::NAN;
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    for ((idx, &v), row) in y.indexed_iter().zip(0..) {
        if idx[0] == 1 && idx[1] == 2 {
            assert_eq!(v, 0.0, "{idx:?}: the row holding a NaN");
        } else {
            assert!(v.is_finite() && v > 0.0, "{idx:?} ({row}): {v}");
        }
    }
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(4)]),
        vec![node("IsNaN", "isnan", &["x"], &["n"], vec![]), node("Cast", "c", &["n"], &["y"], vec![int("to", 1)])],
        vec![],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'isnan'") && e.contains("Where(IsNaN(x), 0, x)"), "{e}");
}

/// A constant causal mask `[1, 1, s, s]` added to attention scores `[n, heads, s, s]` (as
/// GPT-2's export writes it) broadcasts over the batch and the heads, in float and in int8;
/// a constant of one value per channel still scales channels (a depthwise 1x1 convolution).
#[test]
fn a_constant_mask_broadcasts_over_heads() {
    let (heads, s) = (3usize, 5usize);
    let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { -1e4 } else { 0.0 }).collect();
    let bytes = model(
        17,
        value("x", &[None, Some(heads as i64), Some(s as i64), Some(s as i64)]),
        vec![node("Add", "masked", &["x", "mask"], &["y"], vec![])],
        vec![floats("mask", &[1, 1, s as i64, s as i64], mask.clone())],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
    assert!(!kinds.contains(&"Conv2d"), "{kinds:?}");
    let x = ramp(&[2, heads, s, s]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    for ((idx, &g), &v) in y.indexed_iter().zip(x.iter()) {
        let want = v + mask[idx[2] * s + idx[3]];
        assert!((g - want).abs() <= 1e-6 * want.abs().max(1.0), "{idx:?}: {g} against {want}");
    }
    let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap().forward(&x).unwrap();
    assert!(crate::sqnr_db(&q, &y) > 30.0, "{}", crate::sqnr_db(&q, &y));
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(4), Some(4)]),
        vec![node("Add", "shift", &["x", "k"], &["y"], vec![])],
        vec![floats("k", &[1, 3, 1, 1], vec![0.5, -1.0, 2.0])],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
    assert_eq!(kinds, ["Conv2d"]);
}

/// A float scalar added to, subtracted from, or minus a value that is not NCHW (tokens `[n,
/// t, d]`) imports as `AddScalar` (after a `MulScalar` of -1 for `k - x`): the formula in
/// float; in int8 a table that keeps the SQNR of the input's own quantization, and survives
/// saving and loading; a scalar that is not finite is an error naming the node.
#[test]
fn scalars_add_to_values_of_any_rank() {
    for (op, const_first, k, f) in [
        ("Add", false, 1.5f32, (|x: f32| x + 1.5) as fn(f32) -> f32),
        ("Add", true, -0.75, |x| x - 0.75),
        ("Sub", false, 2.0, |x| x - 2.0),
        ("Sub", true, 0.5, |x| 0.5 - x),
    ] {
        let inputs = if const_first { ["k", "x"] } else { ["x", "k"] };
        let bytes = model(
            17,
            value("x", &[None, Some(4), Some(6)]),
            vec![node(op, "shift", &inputs, &["y"], vec![])],
            vec![floats("k", &[], vec![k])],
            "y",
        );
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
        let want_kinds: &[&str] = if op == "Sub" && const_first { &["MulScalar", "AddScalar"] } else { &["AddScalar"] };
        assert_eq!(kinds, want_kinds, "{op} const_first={const_first}");
        let x = ramp(&[2, 4, 6]);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        assert_eq!(y.shape(), x.shape());
        for (&g, &v) in y.iter().zip(x.iter()) {
            assert!((g - f(v)).abs() <= 1e-6, "{op} const_first={const_first}: {g} against {}", f(v));
        }
        let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
        p.calibrate(&x).unwrap();
        let q = p.convert().unwrap();
        let yq = q.forward(&x).unwrap();
        // The ramp takes 11 values, each within half a step of the 8-bit grids.
        assert!(crate::sqnr_db(&yq, &y) > 35.0, "{op}: {}", crate::sqnr_db(&yq, &y));
        let path = std::env::temp_dir()
            .join(format!("qonnx_add_scalar_{op}_{const_first}_{}.safetensors", std::process::id()));
        q.save(&path).unwrap();
        let back = qnn::QuantizedModel::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(back.forward(&x).unwrap(), yq, "{op}: after loading");
        // The QDQ export writes the table's map, or the float layer, as an `Add` of the
        // constant.
        let adds = |q: &qnn::QuantizedModel| {
            let onnx = qonnx::export_qdq(q, &[vec![2, 4, 6]]).unwrap();
            let g = onnx.graph.unwrap();
            let consts: Vec<f32> =
                g.initializer.iter().filter(|t| t.dims.is_empty()).flat_map(|t| t.float_data.clone()).collect();
            let n = g.node.iter().filter(|n| n.op_type.as_deref() == Some("Add")).count();
            (n, consts)
        };
        let (n, consts) = adds(&q);
        assert!(n == 1 && consts.contains(&(if op == "Sub" && !const_first { -k } else { k })), "{op}: {n} {consts:?}");
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let mut mapping = qnn::QConfigMapping::new(qobserve::QConfig::default()).skip_kind("AddScalar");
        if kinds.contains(&"MulScalar") {
            mapping = mapping.skip_kind("MulScalar");
        }
        let mut p = qnn::prepare(m.graph, &mapping).unwrap();
        p.calibrate(&x).unwrap();
        let fq = p.convert().unwrap();
        assert_eq!(fq.forward(&x).unwrap(), y, "{op}: the layers left in float");
        assert_eq!(adds(&fq).0, 1, "{op}: float export");
    }
    let bytes = model(
        17,
        value("x", &[None, Some(4), Some(6)]),
        vec![node("Add", "shift", &["x", "k"], &["y"], vec![])],
        vec![floats("k", &[], vec![f32::INFINITY])],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'shift'") && e.contains("not finite"), "{e}");
}

/// Boolean constants fold through `And`, `Or`, `Xor` and `Not` (GPT-2's dynamo export builds
/// its causal mask so): each result, cast to float and added to the input, is the truth table;
/// a logical op on float constants is an error naming the node.
#[test]
fn boolean_constants_fold() {
    let bools = |name: &str, v: [u8; 4]| TensorProto {
        dims: vec![4],
        data_type: Some(data_type::BOOL),
        raw_data: Some(v.to_vec()),
        name: Some(name.into()),
        ..Default::default()
    };
    for (op, want) in [
        ("And", [1.0, 0.0, 0.0, 0.0]),
        ("Or", [1.0, 1.0, 1.0, 0.0]),
        ("Xor", [0.0, 1.0, 1.0, 0.0]),
        ("Not", [0.0, 0.0, 1.0, 1.0]),
    ] {
        let inputs: &[&str] = if op == "Not" { &["a"] } else { &["a", "b"] };
        let bytes = model(
            17,
            value("x", &[None, Some(4)]),
            vec![
                node(op, "logic", inputs, &["m"], vec![]),
                node("Cast", "cast", &["m"], &["f"], vec![int("to", i64::from(data_type::FLOAT))]),
                node("Add", "add", &["x", "f"], &["y"], vec![]),
            ],
            vec![bools("a", [1, 1, 0, 0]), bools("b", [1, 0, 1, 0])],
            "y",
        );
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let x = ArrayD::zeros(IxDyn(&[2, 4]));
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        for row in y.outer_iter() {
            assert_eq!(row.iter().copied().collect::<Vec<f32>>(), want, "{op}");
        }
    }
    let bytes = model(
        17,
        value("x", &[None, Some(4)]),
        vec![node("And", "logic", &["a", "b"], &["m"], vec![]), node("Add", "add", &["x", "m"], &["y"], vec![])],
        vec![floats("a", &[4], vec![1.0; 4]), floats("b", &[4], vec![0.0; 4])],
        "y",
    );
    let e = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'logic'") && e.contains("booleans"), "{e}");
}

/// Token ids (an INT64 input, given as f32 values) pick rows of an embedding table (`Gather`
/// of a constant by computed indices), and an additive mask `[n, 1, 1, d]` is broadcast over
/// `[n, 1, t, d]` (`Add` of two computed values whose shapes broadcast), at batch 1 and 2; a
/// mask that does not broadcast, or a token id that is not a whole number of the table's
/// rows, is an error naming the node (and the shapes).
#[test]
fn token_ids_embed_and_masks_broadcast() {
    let typed = |name: &str, elem: i32, dims: &[Option<i64>]| {
        let mut v = value(name, dims);
        v.r#type.as_mut().unwrap().tensor_type.as_mut().unwrap().elem_type = Some(elem);
        v
    };
    let table: Vec<f32> = (0..10).map(|k| k as f32 * 0.5 - 1.0).collect();
    let bytes = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(GraphProto {
            node: vec![
                node("Gather", "embed", &["table", "ids"], &["e"], vec![int("axis", 0)]),
                node("Unsqueeze", "heads", &["e", "axes1"], &["e4"], vec![]),
                node("Add", "masked", &["e4", "mask"], &["y"], vec![]),
            ],
            name: Some("g".into()),
            initializer: vec![floats("table", &[5, 2], table.clone()), int64s("axes1", vec![1])],
            input: vec![
                typed("ids", data_type::INT64, &[None, Some(3)]),
                typed("mask", data_type::FLOAT, &[None, Some(1), Some(1), Some(2)]),
            ],
            output: vec![value("y", &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    for n in [1usize, 2] {
        let ids = ArrayD::from_shape_fn(IxDyn(&[n, 3]), |i| ((i[0] * 3 + i[1] * 2) % 5) as f32);
        let mask = ArrayD::from_shape_fn(IxDyn(&[n, 1, 1, 2]), |i| if i[0] == 1 && i[3] == 1 { -100.0 } else { 0.0 });
        let y = m.graph.run(&[ids.clone(), mask.clone()]).unwrap().remove(0);
        assert_eq!(y.shape(), &[n, 1, 3, 2]);
        for ((b, _, t, d), v) in y.indexed_iter().map(|(i, v)| ((i[0], i[1], i[2], i[3]), *v)) {
            let row = ids[[b, t]] as usize;
            assert_eq!(v, table[row * 2 + d] + mask[[b, 0, 0, d]], "batch {b}, token {t}, feature {d}");
        }
    }
    // A mask of the wrong shape names the node and both shapes.
    let ids = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![0.0, 1.0, 2.0]).unwrap();
    let e = m.graph.run(&[ids, ArrayD::zeros(IxDyn(&[1, 1, 1, 3]))]).unwrap_err().to_string();
    assert!(e.contains("masked") && e.contains("[1, 1, 3, 2]") && e.contains("[1, 1, 1, 3]"), "{e}");
    for bad in [5.0f32, 1.5] {
        let ids = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![0.0, bad, 1.0]).unwrap();
        let e = m.graph.run(&[ids, ArrayD::zeros(IxDyn(&[1, 1, 1, 2]))]).unwrap_err().to_string();
        assert!(e.contains("embed") && e.contains(&bad.to_string()) && e.contains("5 rows"), "{e}");
    }
}

/// `Range` folds at import as ONNX defines it: `max(ceil((limit - start) / delta), 0)`
/// values `start + i * delta`, for floats, integers and a negative step (the integer ones
/// cast to float here), and each joins the graph as a constant; a zero step is an error
/// that names the node.
#[test]
fn range_folds_at_import() {
    let f = |name: &str, v: f32| floats(name, &[], vec![v]);
    let i = scalar;
    let graph = |delta: f32| {
        model(
            17,
            value("x", &[None, Some(4)]),
            vec![
                node("Range", "rf", &["f0", "f1", "fd"], &["rf"], vec![]),
                node("Range", "ri", &["i1", "i9", "i2"], &["ri"], vec![]),
                node("Range", "rn", &["i7", "im1", "im2"], &["rn"], vec![]),
                node("Cast", "cri", &["ri"], &["rif"], vec![int("to", data_type::FLOAT as i64)]),
                node("Cast", "crn", &["rn"], &["rnf"], vec![int("to", data_type::FLOAT as i64)]),
                node("Add", "a1", &["x", "rf"], &["y1"], vec![]),
                node("Add", "a2", &["y1", "rif"], &["y2"], vec![]),
                node("Add", "a3", &["y2", "rnf"], &["y"], vec![]),
            ],
            vec![
                f("f0", 0.0),
                f("f1", 0.9),
                f("fd", delta),
                i("i1", 1),
                i("i9", 9),
                i("i2", 2),
                i("i7", 7),
                i("im1", -1),
                i("im2", -2),
            ],
            "y",
        )
    };
    let m = qonnx::from_bytes(&graph(0.25), &ImportOptions::default()).unwrap();
    let x = ramp(&[3, 4]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    // [0, 0.25, 0.5, 0.75] (0.9 is not reached by a fifth step), [1, 3, 5, 7], [7, 5, 3, 1].
    let add = [0.0f32 + 1.0 + 7.0, 0.25 + 3.0 + 5.0, 0.5 + 5.0 + 3.0, 0.75 + 7.0 + 1.0];
    let want = ArrayD::from_shape_fn(IxDyn(&[3, 4]), |ix| x[[ix[0], ix[1]]] + add[ix[1]]);
    assert_eq!(y, want);
    let err = qonnx::from_bytes(&graph(0.0), &ImportOptions::default()).unwrap_err().to_string();
    assert!(err.contains("rf") && err.contains("delta 0"), "{err}");
}

/// The arithmetic of YOLOv8's detection head on 3-D values: a product with a constant that
/// broadcasts against one item (`[1, 3]` against `[batch, 2, 3]`), a constant minus a computed
/// value, the difference of two computed values, and a concatenation along the last axis
/// (`axis = -1`), at batch 2; a concatenation along the batch is an error naming the node.
#[test]
fn head_arithmetic_on_three_dimensional_values() {
    let graph = |axis: i64| {
        model(
            17,
            value("x", &[None, Some(2), Some(3)]),
            vec![
                node("Mul", "scale", &["x", "k"], &["a"], vec![]),
                node("Sub", "flip", &["k2", "x"], &["b"], vec![]),
                node("Sub", "diff", &["a", "b"], &["c"], vec![]),
                node("Concat", "join", &["a", "c"], &["y"], vec![int("axis", axis)]),
            ],
            vec![floats("k", &[1, 3], vec![0.5, 2.0, -1.0]), floats("k2", &[2, 1], vec![10.0, 20.0])],
            "y",
        )
    };
    let m = qonnx::from_bytes(&graph(-1), &ImportOptions::default()).unwrap();
    let x = ramp(&[2, 2, 3]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert_eq!(y.shape(), &[2, 2, 6]);
    let (k, k2) = ([0.5f32, 2.0, -1.0], [10.0f32, 20.0]);
    let want = ArrayD::from_shape_fn(IxDyn(&[2, 2, 6]), |ix| {
        let (n, i, j) = (ix[0], ix[1], ix[2] % 3);
        let a = x[[n, i, j]] * k[j];
        if ix[2] < 3 {
            a
        } else {
            a - (k2[i] - x[[n, i, j]])
        }
    });
    assert_eq!(y, want);
    let err = qonnx::from_bytes(&graph(0), &ImportOptions::default()).unwrap_err().to_string();
    assert!(err.contains("join") && err.contains("batch"), "{err}");
}

/// `HardSigmoid` with ONNX's default slope (0.2, Paddle's) as well as PyTorch's (1/6):
/// `max(0, min(1, alpha * x + 0.5))`.
#[test]
fn hard_sigmoid_takes_any_slope() {
    for alpha in [None, Some(1.0f32 / 6.0), Some(0.5)] {
        let attrs = alpha.map(|a| AttributeProto { name: Some("alpha".into()), f: Some(a), ..Default::default() });
        let bytes = model(
            17,
            value("x", &[None, Some(4)]),
            vec![node("HardSigmoid", "hs", &["x"], &["y"], attrs.into_iter().collect())],
            vec![],
            "y",
        );
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let x = ramp(&[3, 4]).mapv(|v| v * 4.0);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let a = alpha.unwrap_or(0.2);
        for (got, v) in y.iter().zip(x.iter()) {
            let want = (a * v + 0.5).clamp(0.0, 1.0);
            assert!((got - want).abs() < 1e-6, "alpha {a}, x {v}: {got} against {want}");
        }
    }
}

/// `ReduceMean` over spatial axes: both of NCHW, one of them (with and without `keepdims`),
/// and the last axis of `[n, c, length]` (the squeeze-and-excitation of sequence models), at
/// batch 2, against the mean computed here.
#[test]
fn reduce_mean_over_spatial_axes() {
    // (input shape, axes, keepdims, output shape)
    type Case<'a> = (&'a [i64], &'a [i64], i64, &'a [usize]);
    let cases: [Case<'_>; 5] = [
        (&[2, 3, 4, 5], &[2, 3], 1, &[2, 3, 1, 1]),
        (&[2, 3, 4, 5], &[3], 0, &[2, 3, 4]),
        (&[2, 3, 4, 5], &[-2], 1, &[2, 3, 1, 5]),
        (&[2, 3, 6], &[-1], 1, &[2, 3, 1]),
        (&[2, 3, 6], &[2], 0, &[2, 3]),
    ];
    for (shape, axes, keep, out) in cases {
        let dims: Vec<Option<i64>> = std::iter::once(None).chain(shape[1..].iter().map(|&d| Some(d))).collect();
        let bytes = model(
            17,
            value("x", &dims),
            vec![node("ReduceMean", "m", &["x"], &["y"], vec![ints("axes", axes), int("keepdims", keep)])],
            vec![],
            "y",
        );
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let ushape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let x = ramp(&ushape);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let mut want = x.clone();
        let rank = shape.len() as i64;
        let mut norm: Vec<usize> = axes.iter().map(|&a| (if a < 0 { a + rank } else { a }) as usize).collect();
        norm.sort_unstable();
        for &a in norm.iter().rev() {
            want = want.mean_axis(ndarray::Axis(a)).unwrap();
            if keep == 1 {
                want = want.insert_axis(ndarray::Axis(a));
            }
        }
        assert_eq!(y.shape(), out, "axes {axes:?} of {shape:?}");
        for (g, w) in y.iter().zip(want.iter()) {
            assert!((g - w).abs() < 1e-6, "axes {axes:?} of {shape:?}: {g} against {w}");
        }
    }
}

/// Hardswish as exporters write it without a `HardSwish` op imports as one `Hardswish` (one
/// table in int8): `x * clip(x + 3, 0, 6) / 6` (paddle2onnx), with `3 + x` and `* (1 / 6)`
/// too, and `x * HardSigmoid(x)` (PyTorch before opset 14); a chain that is not hardswish (a
/// clip at 5) stays as written. Values match the formula.
#[test]
fn hardswish_chains_import_as_one_op() {
    let f = |name: &str, v: f32| floats(name, &[], vec![v]);
    let graphs: Vec<(Vec<NodeProto>, Vec<TensorProto>, bool)> = vec![
        (
            vec![
                node("Add", "add", &["x", "three"], &["a"], vec![]),
                node("Clip", "clip", &["a", "zero", "six"], &["c"], vec![]),
                node("Mul", "mul", &["x", "c"], &["m"], vec![]),
                node("Div", "div", &["m", "six"], &["y"], vec![]),
            ],
            vec![f("three", 3.0), f("zero", 0.0), f("six", 6.0)],
            true,
        ),
        (
            vec![
                node("Add", "add", &["three", "x"], &["a"], vec![]),
                node("Clip", "clip", &["a", "zero", "six"], &["c"], vec![]),
                node("Mul", "mul", &["c", "x"], &["m"], vec![]),
                node("Mul", "sixth", &["m", "k"], &["y"], vec![]),
            ],
            vec![f("three", 3.0), f("zero", 0.0), f("six", 6.0), f("k", 1.0 / 6.0)],
            true,
        ),
        (
            vec![
                node(
                    "HardSigmoid",
                    "hs",
                    &["x"],
                    &["h"],
                    vec![AttributeProto { name: Some("alpha".into()), f: Some(1.0 / 6.0), ..Default::default() }],
                ),
                node("Mul", "mul", &["x", "h"], &["y"], vec![]),
            ],
            vec![],
            true,
        ),
        (
            vec![
                node("Add", "add", &["x", "three"], &["a"], vec![]),
                node("Clip", "clip", &["a", "zero", "five"], &["c"], vec![]),
                node("Mul", "mul", &["x", "c"], &["m"], vec![]),
                node("Div", "div", &["m", "six"], &["y"], vec![]),
            ],
            vec![f("three", 3.0), f("zero", 0.0), f("five", 5.0), f("six", 6.0)],
            false,
        ),
    ];
    // The first chain again with its clip also a graph output: nothing is fused away.
    let (nodes0, inits0, _) = graphs[0].clone();
    let bytes = model(17, value("x", &[None, Some(2), Some(3), Some(3)]), nodes0, inits0, "y");
    let mut two = ModelProto::decode(&bytes[..]).unwrap();
    two.graph.as_mut().unwrap().output.push(value("c", &[]));
    let m = qonnx::from_bytes(&two.encode_to_vec(), &ImportOptions::default()).unwrap();
    assert!(m.graph.node_kinds().iter().all(|(_, k)| *k != "Hardswish"), "{:?}", m.graph.node_kinds());
    let x = ramp(&[2, 2, 3, 3]).mapv(|v| v * 5.0);
    let ys = m.graph.run(std::slice::from_ref(&x)).unwrap();
    for ((y, c), v) in ys[0].iter().zip(ys[1].iter()).zip(x.iter()) {
        assert!((c - (v + 3.0).clamp(0.0, 6.0)).abs() < 1e-5 && (y - v * c / 6.0).abs() < 1e-5, "x {v}: {y}, {c}");
    }
    for (i, (nodes, inits, fused)) in graphs.into_iter().enumerate() {
        let bytes = model(17, value("x", &[None, Some(2), Some(3), Some(3)]), nodes, inits, "y");
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
        assert_eq!(kinds == ["Hardswish"], fused, "graph {i}: {kinds:?}");
        let x = ramp(&[2, 2, 3, 3]).mapv(|v| v * 5.0);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let top = if fused { 6.0 } else { 5.0 };
        for (g, v) in y.iter().zip(x.iter()) {
            let want = v * (v + 3.0).clamp(0.0, top) / 6.0;
            assert!((g - want).abs() < 1e-5, "graph {i}, x {v}: {g} against {want}");
        }
    }
}

/// The tanh form of GELU written out imports as one `GELU`: as PyTorch exports
/// `nn.GELU(approximate="tanh")` before opset 20 (`x * (x * x)`, the half last, constants
/// first or second) and as Hugging Face's `gelu_new` (`Pow(x, 3)`, `0.5 * x` first); with
/// another coefficient, or with a step also read elsewhere, the chain stays as written.
/// Values match the formula.
#[test]
fn tanh_gelu_chains_import_as_one_op() {
    let f = |name: &str, v: f32| floats(name, &[], vec![v]);
    let consts = |kappa: f32| {
        vec![f("beta", (2.0 / std::f32::consts::PI).sqrt()), f("kappa", kappa), f("one", 1.0), f("half", 0.5)]
    };
    let torch = vec![
        node("Mul", "sq", &["x", "x"], &["sq"], vec![]),
        node("Mul", "cube", &["x", "sq"], &["cube"], vec![]),
        node("Mul", "k", &["kappa", "cube"], &["k"], vec![]),
        node("Add", "s", &["x", "k"], &["s"], vec![]),
        node("Mul", "inner", &["beta", "s"], &["inner"], vec![]),
        node("Tanh", "tanh", &["inner"], &["t"], vec![]),
        node("Add", "plus", &["one", "t"], &["p"], vec![]),
        node("Mul", "xp", &["x", "p"], &["xp"], vec![]),
        node("Mul", "y", &["half", "xp"], &["y"], vec![]),
    ];
    let mut pow_inits = consts(0.044715);
    pow_inits.push(f("three", 3.0));
    let hf = vec![
        node("Mul", "hx", &["x", "half"], &["hx"], vec![]),
        node("Pow", "cube", &["x", "three"], &["cube"], vec![]),
        node("Mul", "k", &["cube", "kappa"], &["k"], vec![]),
        node("Add", "s", &["k", "x"], &["s"], vec![]),
        node("Mul", "inner", &["s", "beta"], &["inner"], vec![]),
        node("Tanh", "tanh", &["inner"], &["t"], vec![]),
        node("Add", "plus", &["t", "one"], &["p"], vec![]),
        node("Mul", "y", &["hx", "p"], &["y"], vec![]),
    ];
    let gelu =
        |v: f32, kappa: f32| 0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + kappa * v * v * v)).tanh());
    let cases = [
        (torch.clone(), consts(0.044715), 0.044715, true, None),
        (hf, pow_inits, 0.044715, true, None),
        (torch.clone(), consts(0.05), 0.05, false, None),
        (torch, consts(0.044715), 0.044715, false, Some("t")),
    ];
    for (i, (nodes, inits, kappa, fused, also_out)) in cases.into_iter().enumerate() {
        let bytes = model(17, value("x", &[None, Some(2), Some(3), Some(4)]), nodes, inits, "y");
        let mut m = ModelProto::decode(&bytes[..]).unwrap();
        if let Some(o) = also_out {
            m.graph.as_mut().unwrap().output.push(value(o, &[]));
        }
        let q = qonnx::from_bytes(&m.encode_to_vec(), &ImportOptions::default()).unwrap();
        let kinds: Vec<&str> = q.graph.node_kinds().iter().map(|(_, k)| *k).collect();
        assert_eq!(kinds == ["GELU"], fused, "graph {i}: {kinds:?}");
        let x = ramp(&[2, 2, 3, 4]).mapv(|v| v * 3.0);
        let y = q.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        for (g, &v) in y.iter().zip(x.iter()) {
            let want = gelu(v, kappa);
            assert!((g - want).abs() <= 2e-6 * want.abs().max(1.0), "graph {i}, x {v}: {g} against {want}");
        }
    }
}

/// `ConvTranspose` (stride 2, asymmetric pads, output padding, two groups, a bias) against
/// the definition; `auto_pad` is refused by name.
#[test]
fn conv_transpose_scatters_as_defined() {
    let (c, ocg, k) = (4usize, 3usize, 3usize);
    let w: Vec<f32> = (0..c * ocg * k * k).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
    let b: Vec<f32> = (0..2 * ocg).map(|i| i as f32 * 0.25).collect();
    let graph = |extra: Vec<AttributeProto>| {
        let mut attrs = vec![
            ints("strides", &[2, 2]),
            ints("pads", &[1, 0, 0, 1]),
            ints("output_padding", &[1, 0]),
            int("group", 2),
        ];
        attrs.extend(extra);
        model(
            17,
            value("x", &[None, Some(c as i64), Some(4), Some(5)]),
            vec![node("ConvTranspose", "up", &["x", "w", "b"], &["y"], attrs)],
            vec![floats("w", &[c as i64, ocg as i64, k as i64, k as i64], w.clone()), floats("b", &[6], b.clone())],
            "y",
        )
    };
    let m = qonnx::from_bytes(&graph(vec![]), &ImportOptions::default()).unwrap();
    let x = ramp(&[2, c, 4, 5]);
    let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    // (4 - 1) * 2 + 3 + 1 - 1 = 9 rows, (5 - 1) * 2 + 3 - 1 = 10 columns.
    assert_eq!(y.shape(), &[2, 6, 9, 10]);
    let mut want = ArrayD::from_shape_fn(IxDyn(&[2, 6, 9, 10]), |i| b[i[1]]);
    for n in 0..2 {
        for ci in 0..c {
            let gi = ci / 2;
            for o in 0..ocg {
                for (iy, ix, ky, kx) in (0..4).flat_map(|iy| {
                    (0..5).flat_map(move |ix| (0..k).flat_map(move |ky| (0..k).map(move |kx| (iy, ix, ky, kx))))
                }) {
                    let (oy, ox) = ((iy * 2 + ky) as isize - 1, (ix * 2 + kx) as isize);
                    if (0..9).contains(&oy) && (0..10).contains(&ox) {
                        want[[n, gi * ocg + o, oy as usize, ox as usize]] +=
                            x[[n, ci, iy, ix]] * w[((ci * ocg + o) * k + ky) * k + kx];
                    }
                }
            }
        }
    }
    for (g, v) in y.iter().zip(want.iter()) {
        assert!((g - v).abs() < 1e-4, "{g} against {v}");
    }
    let e = qonnx::from_bytes(&graph(vec![attr_s("auto_pad", "SAME_UPPER")]), &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("'up'") && e.contains("auto_pad"), "{e}");
}

/// LayerNorm as PyTorch exports it before opset 17 (and paddle2onnx at any): `ReduceMean`,
/// `Sub`, `Pow` 2, `ReduceMean`, `Add` eps, `Sqrt`, `Div`, then `Mul` gamma and `Add` beta
/// (or neither) imports as one `LayerNorm`, with the formula's values.
#[test]
fn layernorm_chains_import_as_one_op() {
    for affine in [true, false] {
        let mut nodes = vec![
            node("ReduceMean", "mean", &["x"], &["m"], vec![ints("axes", &[-1])]),
            node("Sub", "sub", &["x", "m"], &["d"], vec![]),
            node("Pow", "pow", &["d", "two"], &["p"], vec![]),
            node("ReduceMean", "var", &["p"], &["v"], vec![ints("axes", &[-1])]),
            node("Add", "eps", &["v", "e"], &["ve"], vec![]),
            node("Sqrt", "sqrt", &["ve"], &["s"], vec![]),
            node("Div", "div", &["d", "s"], &[if affine { "n" } else { "y" }], vec![]),
        ];
        let mut inits = vec![floats("two", &[], vec![2.0]), floats("e", &[], vec![1e-5])];
        let (gamma, beta) = ([0.5f32, 2.0, -1.0, 1.5], [0.1f32, -0.2, 0.0, 3.0]);
        if affine {
            nodes.push(node("Mul", "gamma", &["n", "g"], &["ng"], vec![]));
            nodes.push(node("Add", "beta", &["ng", "b"], &["y"], vec![]));
            inits.push(floats("g", &[4], gamma.to_vec()));
            inits.push(floats("b", &[4], beta.to_vec()));
        }
        let bytes = model(14, value("x", &[None, Some(3), Some(4)]), nodes, inits, "y");
        let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
        let kinds: Vec<&str> = m.graph.node_kinds().iter().map(|(_, k)| *k).collect();
        assert_eq!(kinds, ["LayerNorm"], "affine {affine}");
        let x = ramp(&[2, 3, 4]).mapv(|v| v * 3.0);
        let y = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
        for (row_x, row_y) in x.rows().into_iter().zip(y.rows()) {
            let mean = row_x.sum() / 4.0;
            let var = row_x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            for (j, (v, got)) in row_x.iter().zip(row_y.iter()).enumerate() {
                let n = (v - mean) / (var + 1e-5).sqrt();
                let want = if affine { n * gamma[j] + beta[j] } else { n };
                assert!((got - want).abs() < 1e-4, "affine {affine}: {got} against {want}");
            }
        }
    }
}

/// PP-LCNet's learnable scale and shift after each convolution and activation, and a
/// transposed convolution with a bias added by a constant then a ReLU: the maps fold into the
/// convolutions when the model is prepared, the int8 model follows the float one, and its QDQ
/// export writes the transposed convolution (its folded bias, its padding) and the ReLU.
#[test]
fn scalar_maps_fold_and_a_transposed_convolution_exports() {
    let w1: Vec<f32> = (0..4 * 3).map(|i| ((i * 5) % 7) as f32 * 0.2 - 0.6).collect();
    let w2: Vec<f32> = (0..4 * 4).map(|i| ((i * 3) % 5) as f32 * 0.25 - 0.5).collect();
    let wt: Vec<f32> = (0..4 * 2 * 2 * 2).map(|i| ((i * 7) % 9) as f32 * 0.1 - 0.4).collect();
    let bytes = model(
        17,
        value("x", &[None, Some(3), Some(6), Some(6)]),
        vec![
            node("Conv", "conv1", &["x", "w1"], &["a"], vec![]),
            node("Mul", "scale1", &["a", "s1"], &["b"], vec![]),
            node("Add", "shift1", &["b", "t1"], &["c"], vec![]),
            node("Relu", "relu1", &["c"], &["d"], vec![]),
            node("Mul", "scale2", &["d", "s2"], &["e"], vec![]),
            node("Add", "shift2", &["e", "t2"], &["f"], vec![]),
            node("Conv", "conv2", &["f", "w2"], &["g"], vec![]),
            node(
                "ConvTranspose",
                "up",
                &["g", "wt"],
                &["h"],
                vec![ints("strides", &[2, 2]), ints("pads", &[0, 1, 0, 1])],
            ),
            node("Add", "up_bias", &["h", "bt"], &["i"], vec![]),
            node("Relu", "relu2", &["i"], &["y"], vec![]),
        ],
        vec![
            floats("w1", &[4, 3, 1, 1], w1),
            floats("s1", &[], vec![0.9]),
            floats("t1", &[], vec![0.25]),
            floats("s2", &[], vec![0.5]),
            floats("t2", &[], vec![-0.125]),
            floats("w2", &[4, 4, 1, 1], w2),
            floats("wt", &[4, 2, 2, 2], wt),
            floats("bt", &[2, 1, 1], vec![0.5, -0.25]),
        ],
        "y",
    );
    let m = qonnx::from_bytes(&bytes, &ImportOptions::default()).unwrap();
    let x = ramp(&[2, 3, 6, 6]);
    let float = m.graph.run(std::slice::from_ref(&x)).unwrap().remove(0);
    assert_eq!(float.shape(), &[2, 2, 12, 10]);
    let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qnn::qobserve::QConfig::default())).unwrap();
    p.calibrate(&x).unwrap();
    let q = p.convert().unwrap();
    let mode = |name: &str| q.plan().iter().find(|e| e.name == name).unwrap().mode.clone();
    for name in ["scale1", "shift1", "scale2", "shift2", "up_bias", "relu2"] {
        assert_eq!(mode(name), qnn::Mode::Passthrough, "{name}");
    }
    assert_eq!(mode("conv1"), qnn::Mode::Int8);
    let db = crate::sqnr_db(&q.forward(&x).unwrap(), &float);
    assert!(db > 25.0, "int8 SQNR {db:.1} dB");
    let onnx = qonnx::export_qdq(&q, &[vec![2, 3, 6, 6]]).unwrap();
    let nodes = &onnx.graph.as_ref().unwrap().node;
    let up = nodes.iter().position(|n| n.op_type.as_deref() == Some("ConvTranspose")).expect("a ConvTranspose");
    let attr =
        |n: &NodeProto, a: &str| n.attribute.iter().find(|x| x.name.as_deref() == Some(a)).map(|x| x.ints.clone());
    assert_eq!(attr(&nodes[up], "pads"), Some(vec![0, 1, 0, 1]));
    assert_eq!(attr(&nodes[up], "strides"), Some(vec![2, 2]));
    assert_eq!(nodes[up].input.len(), 3, "the folded bias");
    assert_eq!(nodes[up + 1].op_type.as_deref(), Some("Relu"));
}

/// A model whose batch is written into its reshapes (as PyTorch's dynamo exporter writes
/// it) takes that batch alone: more items run in chunks of it, in float and in int8, at one
/// and two threads, and the saved model keeps it; a count that is no multiple of it is an
/// error that says so. A fixed batch that the graph does not depend on is not recorded.
#[test]
fn a_fixed_batch_runs_in_chunks() {
    let fixed = |dims: &[Option<i64>], to: Vec<i64>| {
        model(
            17,
            value("x", dims),
            vec![
                node("Reshape", "split", &["x", "to3"], &["r"], vec![]),
                node("MatMul", "mix", &["r", "w"], &["z"], vec![]),
                node("Relu", "relu", &["z"], &["y"], vec![]),
            ],
            vec![int64s("to3", to), floats("w", &[2, 2], vec![1.0, 0.5, -0.25, 1.0])],
            "y",
        )
    };
    let m = qonnx::from_bytes(&fixed(&[Some(2), Some(6)], vec![2, 3, 2]), &ImportOptions::default()).unwrap();
    assert_eq!(m.graph.fixed_batch(), Some(2));
    let x = ramp(&[6, 6]);
    // relu(x as [6, 3, 2] times w), row by row.
    let float = |x: &ArrayD<f32>| {
        ArrayD::from_shape_fn(IxDyn(&[x.shape()[0], 3, 2]), |i| {
            let (a, b) = (x[[i[0], 2 * i[1]]], x[[i[0], 2 * i[1] + 1]]);
            let v = if i[2] == 0 { a - 0.25 * b } else { 0.5 * a + b };
            v.max(0.0)
        })
    };
    let want = float(&x);
    assert_eq!(m.graph.run(std::slice::from_ref(&x)).unwrap()[0], want);
    let e = m.graph.run(&[ramp(&[3, 6])]).unwrap_err().to_string();
    assert!(e.contains("multiple of 2") && e.contains("fixed at 2"), "{e}");

    let mut p = qnn::prepare(m.graph, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap();
    p.calibrate(&ramp(&[2, 6])).unwrap();
    let mut q = p.convert().unwrap();
    assert_eq!(q.fixed_batch(), Some(2));
    let parts: Vec<ArrayD<f32>> = (0..3)
        .map(|k| q.forward(&x.slice_axis(ndarray::Axis(0), (2 * k..2 * k + 2).into()).to_owned()).unwrap())
        .collect();
    let views: Vec<_> = parts.iter().map(ArrayD::view).collect();
    let joined = ndarray::concatenate(ndarray::Axis(0), &views).unwrap();
    assert_eq!(q.forward(&x).unwrap(), joined);
    for (a, b) in joined.iter().zip(&want) {
        assert!((a - b).abs() < 0.03, "int8 {a} vs float {b}");
    }
    q.set_threads(2);
    assert_eq!(q.forward(&x).unwrap(), joined, "two threads");
    let e = q.forward(&ramp(&[5, 6])).unwrap_err().to_string();
    assert!(e.contains("multiple of 2"), "{e}");
    let e = q.profile(std::slice::from_ref(&x), 1).unwrap_err().to_string();
    assert!(e.contains("one batch of 2"), "{e}");
    // The layer report compares all six items, two at a time.
    let mut twin = qonnx::from_bytes(&fixed(&[Some(2), Some(6)], vec![2, 3, 2]), &ImportOptions::default()).unwrap();
    qnn::fuse_graph(&mut twin.graph).unwrap();
    let off_grid = x.mapv(|v| v * 0.37 + 0.011);
    let report = q.report_graph(&twin.graph, std::slice::from_ref(&off_grid)).unwrap();
    // The product runs the ReLU: its output is the model's.
    let relu = report.iter().find(|r| r.name == "mix").unwrap().sqnr_db.unwrap();
    let whole = qnn::sqnr_db(&float(&off_grid), &q.forward(&off_grid).unwrap());
    assert!(whole.is_finite() && (relu - whole).abs() < 1e-9, "report {relu} dB, whole output {whole} dB");
    // Calibration takes a multiple of the batch too, as that many batches: the same model as
    // calibrated chunk by chunk, or with the batches given at once.
    let prepared = || {
        let m = qonnx::from_bytes(&fixed(&[Some(2), Some(6)], vec![2, 3, 2]), &ImportOptions::default()).unwrap();
        qnn::prepare(m.graph, &qnn::QConfigMapping::new(qobserve::QConfig::default())).unwrap()
    };
    let (mut whole, mut apart, mut listed) = (prepared(), prepared(), prepared());
    whole.calibrate(&off_grid).unwrap();
    for k in 0..3 {
        apart.calibrate(&off_grid.slice_axis(ndarray::Axis(0), (2 * k..2 * k + 2).into()).to_owned()).unwrap();
    }
    listed.calibrate_batches(&[off_grid.clone(), x.clone()], 2).unwrap();
    assert_eq!(whole.batches_seen(), 3);
    assert_eq!(listed.batches_seen(), 6);
    let (whole, apart) = (whole.convert().unwrap(), apart.convert().unwrap());
    assert_eq!(whole.to_bytes().unwrap(), apart.to_bytes().unwrap());
    assert!(listed.convert().is_ok());
    let saved = qnn::QuantizedModel::from_bytes(&q.to_bytes().unwrap()).unwrap();
    assert_eq!(saved.fixed_batch(), Some(2));
    assert_eq!(saved.forward(&x).unwrap(), joined, "the same after save and load");

    // A symbolic batch, or a fixed one that nothing depends on, takes any batch.
    let m = qonnx::from_bytes(&fixed(&[None, Some(6)], vec![-1, 3, 2]), &ImportOptions::default()).unwrap();
    assert_eq!(m.graph.fixed_batch(), None);
    let relu =
        model(17, value("x", &[Some(1), Some(6)]), vec![node("Relu", "relu", &["x"], &["y"], vec![])], vec![], "y");
    let m = qonnx::from_bytes(&relu, &ImportOptions::default()).unwrap();
    assert_eq!(m.graph.fixed_batch(), None);
    assert_eq!(m.graph.run(&[ramp(&[3, 6])]).unwrap()[0].shape(), &[3, 6]);
}
