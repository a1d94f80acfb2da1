//! Models with torchvision's (or the bundled scripts') module names and shapes, so their
//! PyTorch `state_dict`s load unchanged.

use crate::error::Result;
use crate::graph::{Graph, GraphBuilder, Tensor};
use crate::layers::{
    AdaptiveAvgPool2d, BatchConst, BatchNorm2d, Conv2d, Dropout, Flatten, HardSigmoid, Hardswish, Identity, LayerNorm,
    Linear, MaxPool2d, MulScalar, Permute, ReLU, ReLU6, Reshape, SiLU, Sigmoid, Slice, Softmax, GELU,
};
use crate::module::{Module, Residual, Sequential};

/// The bundled digits classifier (`scripts/models/digits.py`): 1x8x8 images of handwritten
/// digits (scikit-learn's), 10 classes. Weights: `qnn/data/digits_model.safetensors`.
pub fn digits() -> Sequential {
    Sequential::new()
        .add("conv1", Conv2d::new(1, 16, 3).padding(1))
        .add("bn1", BatchNorm2d::new(16))
        .add("relu1", ReLU)
        .add("conv2", Conv2d::new(16, 32, 3).stride(2).padding(1))
        .add("bn2", BatchNorm2d::new(32))
        .add("relu2", ReLU)
        .add("pool", AdaptiveAvgPool2d(2, 2))
        .add("flatten", Flatten)
        .add("fc1", Linear::new(32 * 2 * 2, 64))
        .add("relu3", ReLU)
        .add("fc2", Linear::new(64, 10))
}

fn conv_bn(
    name_conv: &str,
    name_bn: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
) -> Sequential {
    Sequential::new()
        .add(name_conv, Conv2d::new(cin, cout, k).stride(stride).padding(k / 2).groups(groups).no_bias())
        .add(name_bn, BatchNorm2d::new(cout))
}

/// torchvision's `BasicBlock`: conv3x3-bn-relu, conv3x3-bn, + shortcut, relu.
fn basic_block(cin: usize, planes: usize, stride: usize) -> Residual {
    let mut body = conv_bn("conv1", "bn1", cin, planes, 3, stride, 1);
    body.push("relu", Box::new(ReLU));
    for (n, m) in conv_bn("conv2", "bn2", planes, planes, 3, 1, 1).into_layers() {
        body.push(n, m);
    }
    let shortcut = (stride != 1 || cin != planes)
        .then(|| ("downsample".to_string(), conv_bn("0", "1", cin, planes, 1, stride, 1)));
    Residual { body, shortcut, add_name: "add".into(), relu: Some("relu".into()) }
}

/// torchvision's `Bottleneck` (v1.5: the stride on the 3x3): 1x1-bn-relu, 3x3-bn-relu,
/// 1x1-bn, + shortcut, relu; 4x expansion.
fn bottleneck(cin: usize, planes: usize, stride: usize) -> Residual {
    let out = planes * 4;
    let mut body = Sequential::new();
    for (i, (cn, bn, a, b, k, s)) in [
        ("conv1", "bn1", cin, planes, 1, 1),
        ("conv2", "bn2", planes, planes, 3, stride),
        ("conv3", "bn3", planes, out, 1, 1),
    ]
    .into_iter()
    .enumerate()
    {
        for (n, m) in conv_bn(cn, bn, a, b, k, s, 1).into_layers() {
            body.push(n, m);
        }
        if i < 2 {
            body.push("relu", Box::new(ReLU));
        }
    }
    let shortcut =
        (stride != 1 || cin != out).then(|| ("downsample".to_string(), conv_bn("0", "1", cin, out, 1, stride, 1)));
    Residual { body, shortcut, add_name: "add".into(), relu: Some("relu".into()) }
}

fn resnet(blocks: [usize; 4], bottlenecks: bool, classes: usize) -> Sequential {
    let mut m = Sequential::new()
        .add("conv1", Conv2d::new(3, 64, 7).stride(2).padding(3).no_bias())
        .add("bn1", BatchNorm2d::new(64))
        .add("relu", ReLU)
        .add("maxpool", MaxPool2d::new(3, 2, 1));
    let expansion = if bottlenecks { 4 } else { 1 };
    let mut cin = 64;
    for (li, (&n, planes)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
        let mut layer = Sequential::new();
        for b in 0..n {
            let stride = if b == 0 && li > 0 { 2 } else { 1 };
            let block = if bottlenecks { bottleneck(cin, planes, stride) } else { basic_block(cin, planes, stride) };
            layer.push(b.to_string(), Box::new(block));
            cin = planes * expansion;
        }
        m.push(format!("layer{}", li + 1), Box::new(layer));
    }
    m.add("avgpool", AdaptiveAvgPool2d(1, 1)).add("flatten", Flatten).add("fc", Linear::new(512 * expansion, classes))
}

/// torchvision's ResNet-18 (`torchvision.models.resnet18`), state-dict compatible.
pub fn resnet18(classes: usize) -> Sequential {
    resnet([2, 2, 2, 2], false, classes)
}

/// torchvision's ResNet-50 (`torchvision.models.resnet50`), state-dict compatible.
pub fn resnet50(classes: usize) -> Sequential {
    resnet([3, 4, 6, 3], true, classes)
}

/// torchvision's `Conv2dNormActivation` with ReLU6: conv (no bias), bn, relu6, named 0, 1, 2.
fn cna(cin: usize, cout: usize, k: usize, stride: usize, groups: usize) -> Sequential {
    let mut s = conv_bn("0", "1", cin, cout, k, stride, groups);
    s.push("2", Box::new(ReLU6));
    s
}

/// torchvision's MobileNetV2 (`torchvision.models.mobilenet_v2`), state-dict compatible.
pub fn mobilenet_v2(classes: usize) -> Sequential {
    let mut features = Sequential::new().add("0", cna(3, 32, 3, 2, 1));
    let mut cin = 32;
    let mut idx = 1;
    for (t, c, n, s) in
        [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let hidden = cin * t;
            let mut conv = Sequential::new();
            let mut k = 0;
            if t != 1 {
                conv.push(k.to_string(), Box::new(cna(cin, hidden, 1, 1, 1)));
                k += 1;
            }
            conv.push(k.to_string(), Box::new(cna(hidden, hidden, 3, stride, hidden)));
            conv.push((k + 1).to_string(), Box::new(Conv2d::new(hidden, c, 1).no_bias()));
            conv.push((k + 2).to_string(), Box::new(BatchNorm2d::new(c)));
            let body = Sequential::new().add("conv", conv);
            if stride == 1 && cin == c {
                features.push(
                    idx.to_string(),
                    Box::new(Residual { body, shortcut: None, add_name: "add".into(), relu: None }),
                );
            } else {
                features.push(idx.to_string(), Box::new(body));
            }
            cin = c;
            idx += 1;
        }
    }
    features.push(idx.to_string(), Box::new(cna(cin, 1280, 1, 1, 1)));
    Sequential::new()
        .add("features", features)
        .add("avgpool", AdaptiveAvgPool2d(1, 1))
        .add("flatten", Flatten)
        .add("classifier", Sequential::new().add("0", Identity).add("1", Linear::new(1280, classes)))
}

/// torchvision's `_make_divisible(v, 8)`: the nearest multiple of 8, at least 8 and at least
/// 90% of `v`.
fn make_divisible(v: f64) -> usize {
    let d = 8.0;
    let mut new_v = ((v + d / 2.0) / d).floor() * d;
    new_v = new_v.max(d);
    if new_v < 0.9 * v {
        new_v += d;
    }
    new_v as usize
}

/// torchvision's `Conv2dNormActivation`: conv (no bias) `0`, batch-norm `1` (with `eps`), and
/// the activation `2` if any.
fn conv_norm_act(
    (cin, cout, k, stride, groups): (usize, usize, usize, usize, usize),
    eps: f32,
    act: Option<Box<dyn Module>>,
) -> Sequential {
    let mut bn = BatchNorm2d::new(cout);
    bn.eps = eps;
    let mut s = Sequential::new()
        .add("0", Conv2d::new(cin, cout, k).stride(stride).padding(k / 2).groups(groups).no_bias())
        .add("1", bn);
    if let Some(a) = act {
        s.push("2", a);
    }
    s
}

/// torchvision's `SqueezeExcitation` on `x` (`c` channels), named under `name`:
/// `x * gate(fc2(act(fc1(avgpool(x)))))`; the product is `skip_mul`, as in torchvision's
/// quantizable models.
#[allow(clippy::too_many_arguments)]
fn squeeze_excitation(
    g: &mut GraphBuilder,
    name: &str,
    x: Tensor,
    c: usize,
    squeeze: usize,
    act: Box<dyn Module>,
    gate: Box<dyn Module>,
) -> Result<Tensor> {
    let s = g.layer(&format!("{name}.avgpool"), AdaptiveAvgPool2d(1, 1), x)?;
    let s = g.layer(&format!("{name}.fc1"), Conv2d::new(c, squeeze, 1), s)?;
    let s = g.boxed(&format!("{name}.activation"), act, s)?;
    let s = g.layer(&format!("{name}.fc2"), Conv2d::new(squeeze, c, 1), s)?;
    let s = g.boxed(&format!("{name}.scale_activation"), gate, s)?;
    g.mul(&format!("{name}.skip_mul"), s, x)
}

/// A squeeze-and-excitation: squeezed channels, the activation between the two 1x1
/// convolutions, the gate.
struct Se(usize, Box<dyn Module>, Box<dyn Module>);

/// One inverted-residual block of MobileNetV3 or EfficientNet, named `name.block.<i>`:
/// expansion 1x1 (when `exp != cin`), depthwise `k`x`k`, squeeze-and-excitation (when
/// `squeeze` is given), projection 1x1 without activation; `+ x` (`name.skip_add`) when the
/// stride is 1 and the channels match.
#[allow(clippy::too_many_arguments)]
fn inverted_residual(
    g: &mut GraphBuilder,
    name: &str,
    x: Tensor,
    (cin, exp, cout, k, stride): (usize, usize, usize, usize, usize),
    eps: f32,
    act: &dyn Fn() -> Box<dyn Module>,
    se: Option<Se>,
) -> Result<Tensor> {
    let mut i = 0;
    let mut y = x;
    if exp != cin {
        y = g.sequential(&format!("{name}.block.{i}"), conv_norm_act((cin, exp, 1, 1, 1), eps, Some(act())), y)?;
        i += 1;
    }
    y = g.sequential(&format!("{name}.block.{i}"), conv_norm_act((exp, exp, k, stride, exp), eps, Some(act())), y)?;
    i += 1;
    if let Some(Se(squeeze, se_act, gate)) = se {
        y = squeeze_excitation(g, &format!("{name}.block.{i}"), y, exp, squeeze, se_act, gate)?;
        i += 1;
    }
    y = g.sequential(&format!("{name}.block.{i}"), conv_norm_act((exp, cout, 1, 1, 1), eps, None), y)?;
    if stride == 1 && cin == cout {
        y = g.add(&format!("{name}.skip_add"), y, x)?;
    }
    Ok(y)
}

/// torchvision's MobileNetV3-Large (`torchvision.models.mobilenet_v3_large`), state-dict
/// compatible: hardswish, and squeeze-and-excitation with a hardsigmoid gate.
pub fn mobilenet_v3_large(classes: usize) -> Graph {
    mobilenet_v3_large_width(classes, 1.0)
}

/// MobileNetV3-Large with every channel count scaled by `width_mult` (torchvision's
/// `mobilenet_v3_large(width_mult=...)`: each count `_make_divisible(c * width_mult, 8)`).
pub fn mobilenet_v3_large_width(classes: usize, width_mult: f64) -> Graph {
    build_mobilenet_v3_large(classes, width_mult).expect("the architecture's names are unique")
}

fn build_mobilenet_v3_large(classes: usize, width_mult: f64) -> Result<Graph> {
    const EPS: f32 = 1e-3;
    let hs = || Box::new(Hardswish) as Box<dyn Module>;
    let re = || Box::new(ReLU) as Box<dyn Module>;
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let adjust = |c: usize| make_divisible(c as f64 * width_mult);
    let mut y = g.sequential("features.0", conv_norm_act((3, adjust(16), 3, 2, 1), EPS, Some(hs())), x)?;
    // (in, kernel, expanded, out, squeeze-and-excitation, hardswish, stride)
    let blocks = [
        (16, 3, 16, 16, false, false, 1),
        (16, 3, 64, 24, false, false, 2),
        (24, 3, 72, 24, false, false, 1),
        (24, 5, 72, 40, true, false, 2),
        (40, 5, 120, 40, true, false, 1),
        (40, 5, 120, 40, true, false, 1),
        (40, 3, 240, 80, false, true, 2),
        (80, 3, 200, 80, false, true, 1),
        (80, 3, 184, 80, false, true, 1),
        (80, 3, 184, 80, false, true, 1),
        (80, 3, 480, 112, true, true, 1),
        (112, 3, 672, 112, true, true, 1),
        (112, 5, 672, 160, true, true, 2),
        (160, 5, 960, 160, true, true, 1),
        (160, 5, 960, 160, true, true, 1),
    ];
    for (i, &(cin, k, exp, cout, se, use_hs, stride)) in blocks.iter().enumerate() {
        let (cin, exp, cout) = (adjust(cin), adjust(exp), adjust(cout));
        let act: &dyn Fn() -> Box<dyn Module> = if use_hs { &hs } else { &re };
        let se = se.then(|| Se(make_divisible((exp / 4) as f64), re(), Box::new(HardSigmoid)));
        y = inverted_residual(&mut g, &format!("features.{}", i + 1), y, (cin, exp, cout, k, stride), EPS, act, se)?;
    }
    let (last_in, last) = (adjust(160), adjust(1280));
    y = g.sequential("features.16", conv_norm_act((last_in, 6 * last_in, 1, 1, 1), EPS, Some(hs())), y)?;
    y = g.layer("avgpool", AdaptiveAvgPool2d(1, 1), y)?;
    y = g.layer("flatten", Flatten, y)?;
    y = g.layer("classifier.0", Linear::new(6 * last_in, last), y)?;
    y = g.layer("classifier.1", Hardswish, y)?;
    y = g.layer("classifier.2", Dropout(0.2), y)?;
    y = g.layer("classifier.3", Linear::new(last, classes), y)?;
    g.output(y);
    g.build()
}

/// torchvision's EfficientNet-B0 (`torchvision.models.efficientnet_b0`), state-dict
/// compatible: SiLU, and squeeze-and-excitation with a sigmoid gate (stochastic depth is the
/// identity at inference and has no node).
pub fn efficientnet_b0(classes: usize) -> Graph {
    build_efficientnet_b0(classes).expect("the architecture's names are unique")
}

fn build_efficientnet_b0(classes: usize) -> Result<Graph> {
    const EPS: f32 = 1e-5;
    let silu = || Box::new(SiLU) as Box<dyn Module>;
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let mut y = g.sequential("features.0", conv_norm_act((3, 32, 3, 2, 1), EPS, Some(silu())), x)?;
    // (expand ratio, kernel, stride, in, out, layers)
    let stages = [
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    ];
    for (s, &(ratio, k, stride, cin, cout, layers)) in stages.iter().enumerate() {
        for i in 0..layers {
            let (cin, stride) = if i == 0 { (cin, stride) } else { (cout, 1) };
            let exp = make_divisible((cin * ratio) as f64);
            let se = Some(Se((cin / 4).max(1), silu(), Box::new(Sigmoid)));
            let name = format!("features.{}.{i}", s + 1);
            y = inverted_residual(&mut g, &name, y, (cin, exp, cout, k, stride), EPS, &silu, se)?;
        }
    }
    y = g.sequential("features.8", conv_norm_act((320, 1280, 1, 1, 1), EPS, Some(silu())), y)?;
    y = g.layer("avgpool", AdaptiveAvgPool2d(1, 1), y)?;
    y = g.layer("flatten", Flatten, y)?;
    y = g.layer("classifier.0", Dropout(0.2), y)?;
    y = g.layer("classifier.1", Linear::new(1280, classes), y)?;
    g.output(y);
    g.build()
}

/// The sizes of a vision transformer (torchvision's `VisionTransformer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VitConfig {
    /// Height and width of the (square) input images.
    pub image_size: usize,
    /// Height and width of a patch.
    pub patch_size: usize,
    /// Channels of the input images.
    pub in_channels: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads per layer.
    pub heads: usize,
    /// Width of the token features.
    pub hidden: usize,
    /// Width of each layer's MLP.
    pub mlp: usize,
    /// Classes of the head.
    pub classes: usize,
}

impl VitConfig {
    /// ViT-B/16: 224x224 RGB images, patches of 16, 12 layers of 12 heads, width 768, MLP
    /// 3072.
    pub fn b16(classes: usize) -> Self {
        VitConfig {
            image_size: 224,
            patch_size: 16,
            in_channels: 3,
            layers: 12,
            heads: 12,
            hidden: 768,
            mlp: 3072,
            classes,
        }
    }

    /// The bundled digits ViT (`scripts/models/digits_vit.py`): 1x8x8 images, patches of 2,
    /// 2 layers of 4 heads, width 64, MLP 128, 10 classes.
    pub fn digits() -> Self {
        VitConfig {
            image_size: 8,
            patch_size: 2,
            in_channels: 1,
            layers: 2,
            heads: 4,
            hidden: 64,
            mlp: 128,
            classes: 10,
        }
    }
}

/// torchvision's ViT-B/16 ([`vit`] of [`VitConfig::b16`]).
pub fn vit_b_16(classes: usize) -> Graph {
    vit(&VitConfig::b16(classes)).expect("ViT-B/16's sizes are consistent")
}

/// A vision transformer as torchvision's `VisionTransformer` computes it: patch embedding
/// (`conv_proj`), the class token in front, the positional embedding added, `layers` encoder
/// blocks (pre-norm multi-head self-attention and MLP, each in a residual), a final norm, and
/// the head on the class token. LayerNorms take torchvision's `eps` of 1e-6.
///
/// Parameter names are torchvision's `state_dict` keys but three, which are parameters of
/// modules there and layers of their own here: `class_token` is `class_token.value`,
/// `encoder.pos_embedding` is `encoder.pos_embedding.value`, and each attention's
/// `in_proj_weight` / `in_proj_bias` are `in_proj.weight` / `in_proj.bias` (of
/// `encoder.layers.encoder_layer_<i>.self_attention`).
///
/// # Errors
/// Sizes that do not fit: an image not a whole number of patches, a width not a whole number
/// of heads, or a zero size.
pub fn vit(c: &VitConfig) -> Result<Graph> {
    let sizes = [c.image_size, c.patch_size, c.in_channels, c.layers, c.heads, c.hidden, c.mlp, c.classes];
    if sizes.contains(&0) || !c.image_size.is_multiple_of(c.patch_size) || !c.hidden.is_multiple_of(c.heads) {
        return Err(crate::NnError::Config {
            module: "vit".into(),
            reason: format!(
                "{c:?}: the image must be a whole number of patches, the width a whole number of heads, and no size 0"
            ),
        });
    }
    let (d, heads, hd) = (c.hidden, c.heads, c.hidden / c.heads);
    let tokens = (c.image_size / c.patch_size).pow(2) + 1;
    let ln = |width: usize| LayerNorm { eps: 1e-6, ..LayerNorm::new(width) };
    let mut g = GraphBuilder::new();
    let x = g.input("x");
    let y = g.layer("conv_proj", Conv2d::new(c.in_channels, d, c.patch_size).stride(c.patch_size), x)?;
    // [n, d, h, w] -> [n, patches, d]
    let y = g.layer("patches", Reshape { shape: vec![d as i64, -1], keep_batch: true }, y)?;
    let y = g.layer("patches_t", Permute { dims: vec![0, 2, 1] }, y)?;
    let zeros = |shape: &[usize]| ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(shape));
    let cls = g.layer("class_token", BatchConst::new(zeros(&[1, 1, d]))?, y)?;
    let y = g.cat("tokens", &[cls, y])?;
    let pos = g.layer("encoder.pos_embedding", BatchConst::new(zeros(&[1, tokens, d]))?, y)?;
    let mut y = g.add("encoder.add_pos", y, pos)?;
    // [n, s, d] -> [n, heads, s, hd]
    let split_heads = |g: &mut GraphBuilder, name: &str, t: Tensor, last: [usize; 2]| -> Result<Tensor> {
        let t = g.layer(
            &format!("{name}.heads"),
            Reshape { shape: vec![-1, heads as i64, hd as i64], keep_batch: true },
            t,
        )?;
        g.layer(&format!("{name}.t"), Permute { dims: vec![0, 2, last[0], last[1]] }, t)
    };
    for i in 0..c.layers {
        let p = format!("encoder.layers.encoder_layer_{i}");
        let a = format!("{p}.self_attention");
        let h = g.layer(&format!("{p}.ln_1"), ln(d), y)?;
        let qkv = g.layer(&format!("{a}.in_proj"), Linear::new(d, 3 * d), h)?;
        let parts = g.chunk(&format!("{a}.qkv"), qkv, 3, -1)?;
        let q = split_heads(&mut g, &format!("{a}.q"), parts[0], [1, 3])?;
        let q = g.layer(&format!("{a}.scale"), MulScalar { factor: 1.0 / (hd as f32).sqrt() }, q)?;
        let kt = split_heads(&mut g, &format!("{a}.k"), parts[1], [3, 1])?;
        let v = split_heads(&mut g, &format!("{a}.v"), parts[2], [1, 3])?;
        let scores = g.matmul(&format!("{a}.scores"), q, kt)?;
        let probs = g.layer(&format!("{a}.softmax"), Softmax { dim: -1 }, scores)?;
        let ctx = g.matmul(&format!("{a}.context"), probs, v)?;
        let ctx = g.layer(&format!("{a}.context_t"), Permute { dims: vec![0, 2, 1, 3] }, ctx)?;
        let ctx = g.layer(&format!("{a}.merge"), Reshape { shape: vec![-1, d as i64], keep_batch: true }, ctx)?;
        let o = g.layer(&format!("{a}.out_proj"), Linear::new(d, d), ctx)?;
        y = g.add(&format!("{p}.add_1"), o, y)?;
        let h = g.layer(&format!("{p}.ln_2"), ln(d), y)?;
        let h = g.layer(&format!("{p}.mlp.0"), Linear::new(d, c.mlp), h)?;
        let h = g.layer(&format!("{p}.mlp.1"), GELU::default(), h)?;
        let h = g.layer(&format!("{p}.mlp.3"), Linear::new(c.mlp, d), h)?;
        y = g.add(&format!("{p}.add_2"), h, y)?;
    }
    let y = g.layer("encoder.ln", ln(d), y)?;
    let y = g.layer("class_out", Slice::narrow(1, 0, 1), y)?;
    let y = g.layer("class_flat", Reshape { shape: vec![d as i64], keep_batch: true }, y)?;
    let y = g.layer("heads.head", Linear::new(d, c.classes), y)?;
    g.output(y);
    g.build()
}

/// Fills every parameter of `model` with deterministic pseudo-random values of a trained
/// network's magnitude (weights uniform in +-sqrt(3 / fan_in), batch-norm statistics near
/// 1 and 0), for benchmarks and tests without downloaded weights.
pub fn randomize(model: &mut dyn crate::Module, seed: u64) {
    randomize_with(model, seed, WeightInit::Uniform);
}

/// How [`randomize_with`] draws weights (biases and batch-norm statistics are drawn alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightInit {
    /// Uniform in +-sqrt(3 / fan_in): variance 1 / fan_in, no outliers, so that every
    /// output channel's codes spread evenly over the int8 range.
    Uniform,
    /// Normal with variance 1 / fan_in (torchvision's ResNet and MobileNet draw their initial
    /// convolution weights from a normal law too): bell-shaped like a trained layer's, most
    /// of a channel's int8 codes small beside its largest.
    Normal,
}

/// [`randomize`] with weights drawn by `init`.
pub fn randomize_with(model: &mut dyn crate::Module, seed: u64, init: WeightInit) {
    fn uniform(s: &mut u64) -> f32 {
        *s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn rec(m: &mut dyn crate::Module, state: &mut u64, init: WeightInit) {
        let is_bn = m.kind().starts_with("BatchNorm");
        for (name, t) in m.tensors_mut() {
            let fan_in: usize = t.shape().iter().skip(1).product::<usize>().max(1);
            let bound = (3.0 / fan_in as f32).sqrt();
            t.mapv_inplace(|_| {
                let u = uniform(state);
                match (is_bn, name) {
                    (true, "weight") => 1.0 + 0.2 * u,
                    (true, "running_var") => 1.0 + 0.5 * u,
                    (true, _) => 0.1 * u,
                    (false, "bias") => 0.05 * u,
                    (false, _) if init == WeightInit::Uniform => bound * u,
                    (false, _) => {
                        // Box-Muller on two uniforms in (0, 1].
                        let u1 = 0.5 * (u + 1.0) + f32::EPSILON;
                        let u2 = 0.5 * (uniform(state) + 1.0);
                        let z = (-2.0 * u1.min(1.0).ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                        z / (fan_in as f32).sqrt()
                    }
                }
            });
        }
        for (_, c) in m.children_mut() {
            rec(c, state, init);
        }
    }
    let mut state = seed | 1;
    rec(model, &mut state, init);
}
