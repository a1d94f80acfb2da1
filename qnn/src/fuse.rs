//! Fusion: conv (or transposed conv) + batch-norm (+ ReLU), conv + ReLU, linear + batch-norm
//! (+ ReLU), linear + ReLU, batch-norm + ReLU, found automatically in every [`Sequential`] or
//! named explicitly. The batch-norm is folded into the convolution's weights and bias
//! ([`qfuse::fuse_conv_bn`], PyTorch's arithmetic); the ReLU becomes the layer's fused
//! activation; the absorbed modules become `Identity`, keeping their names. In a [`Graph`],
//! per-channel affine maps (a `MulScalar`, or the depthwise 1x1 convolution that `x * k + b`
//! with constants imports as) fold into the convolution before or after them too
//! ([`fuse_graph`]).

use crate::error::{NnError, Result};
use crate::graph::{readers, Graph, NodeOp, Tensor};
use crate::layers::{
    AddScalar, BatchNorm1d, BatchNorm2d, Conv2d, ConvTranspose2d, FusedAct, Identity, Linear, MulScalar, ReLU, ReLU6,
};
use crate::module::{join, walk, Concat, Module, Residual, Sequential};

/// One fusion that was done: the full names of the modules merged and the pattern. The
/// convolution or linear layer keeps the result (the first module, except for an affine map
/// folded into the convolution after it: `MulScalar+Conv2d`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fused {
    /// Full module names, first to last.
    pub modules: Vec<String>,
    /// E.g. `"Conv2d+BatchNorm2d+ReLU"`.
    pub pattern: String,
}

fn act_of(m: &dyn Module) -> Option<FusedAct> {
    if m.as_any().is::<ReLU>() {
        Some(FusedAct::Relu)
    } else if m.as_any().is::<ReLU6>() {
        Some(FusedAct::Relu6)
    } else {
        None
    }
}

/// How many modules starting at `i` form a fusable pattern (0 if none).
fn pattern_len(layers: &[(String, Box<dyn Module>)], i: usize) -> usize {
    let at = |j: usize| layers.get(j).map(|(_, m)| m.as_ref());
    let Some(first) = at(i) else { return 0 };
    let free_conv = first.as_any().downcast_ref::<Conv2d>().is_some_and(|c| c.activation == FusedAct::None)
        || first.as_any().downcast_ref::<ConvTranspose2d>().is_some_and(|c| c.activation == FusedAct::None);
    let free_linear = first.as_any().downcast_ref::<Linear>().is_some_and(|l| l.activation == FusedAct::None);
    // A batch-norm already fused with its ReLU brings the ReLU along; otherwise a ReLU may
    // follow it.
    if free_conv {
        let bn_act = at(i + 1).and_then(|m| m.as_any().downcast_ref::<BatchNorm2d>()).map(|b| b.activation);
        let bn = bn_act.is_some();
        let after = if bn { i + 2 } else { i + 1 };
        let act = bn_act.is_none_or(|a| a == FusedAct::None) && at(after).and_then(act_of).is_some();
        return match (bn, act) {
            (true, true) => 3,
            (true, false) | (false, true) => 2,
            (false, false) => 0,
        };
    }
    if free_linear {
        let bn_act = at(i + 1).and_then(|m| m.as_any().downcast_ref::<BatchNorm1d>()).map(|b| b.0.activation);
        let bn = bn_act.is_some();
        let after = if bn { i + 2 } else { i + 1 };
        let act = bn_act.is_none_or(|a| a == FusedAct::None) && at(after).and_then(act_of).is_some();
        return usize::from(bn) + usize::from(act) + usize::from(bn || act);
    }
    let free_bn = bn_of(first).is_some_and(|b| b.activation == FusedAct::None);
    if free_bn && at(i + 1).and_then(act_of).is_some() {
        return 2;
    }
    0
}

/// The batch-norm inside a `BatchNorm2d` or `BatchNorm1d`.
fn bn_of(m: &dyn Module) -> Option<&BatchNorm2d> {
    let a = m.as_any();
    a.downcast_ref::<BatchNorm2d>().or_else(|| a.downcast_ref::<BatchNorm1d>().map(|b| &b.0))
}

/// Fuses `layers[i..i + len]` (a pattern from [`pattern_len`]) in place.
fn fuse_at(layers: &mut [(String, Box<dyn Module>)], i: usize, len: usize, prefix: &str) -> Result<Fused> {
    let names: Vec<String> = layers[i..i + len].iter().map(|(n, _)| join(prefix, n)).collect();
    let kinds: Vec<&str> = layers[i..i + len].iter().map(|(_, m)| m.kind()).collect();
    let pattern = kinds.join("+");
    let bn = layers.get(i + 1).and_then(|(_, m)| bn_of(m.as_ref()).map(BatchNorm2d::to_fuse));
    let bn_act = layers.get(i + 1).and_then(|(_, m)| bn_of(m.as_ref())).map(|b| b.activation);
    let act = layers[i + 1..i + len]
        .iter()
        .find_map(|(_, m)| act_of(m.as_ref()))
        .or(bn_act.filter(|a| *a != FusedAct::None))
        .unwrap_or_default();
    let head = layers[i].1.as_any_mut();
    if let Some(conv) = head.downcast_mut::<Conv2d>() {
        if let Some(bn) = &bn {
            let bias: Option<Vec<f32>> = conv.bias.as_ref().map(|b| b.iter().copied().collect());
            let (w, b) = qfuse::fuse_conv_bn(conv.weight.view(), bias.as_deref(), bn)
                .map_err(|e| NnError::Fusion { modules: names.clone(), reason: e.to_string() })?;
            conv.weight = w;
            conv.bias = Some(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[b.len()]), b).expect("one per channel"));
        }
        conv.activation = act;
    } else if let Some(convt) = head.downcast_mut::<ConvTranspose2d>() {
        if let Some(bn) = &bn {
            let bias: Option<Vec<f32>> = convt.bias.as_ref().map(|b| b.iter().copied().collect());
            let (w, b) = qfuse::fuse_conv_transpose_bn(convt.weight.view(), bias.as_deref(), convt.groups, bn)
                .map_err(|e| NnError::Fusion { modules: names.clone(), reason: e.to_string() })?;
            convt.weight = w;
            convt.bias = Some(channel_vec(b));
        }
        convt.activation = act;
    } else if let Some(lin) = head.downcast_mut::<Linear>() {
        if let Some(bn) = &bn {
            let bias: Option<Vec<f32>> = lin.bias.as_ref().map(|b| b.iter().copied().collect());
            let (w, b) = qfuse::fuse_linear_bn(lin.weight.view(), bias.as_deref(), bn)
                .map_err(|e| NnError::Fusion { modules: names.clone(), reason: e.to_string() })?;
            lin.weight = w;
            lin.bias = Some(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[b.len()]), b).expect("one per feature"));
        }
        lin.activation = act;
    } else if let Some(bn) = head.downcast_mut::<BatchNorm2d>() {
        // Batch-norm + ReLU with no layer before it to fold into: one module (PyTorch's
        // `BNReLU2d`), which still runs in float after conversion.
        bn.activation = act;
    } else if let Some(bn) = head.downcast_mut::<BatchNorm1d>() {
        bn.0.activation = act;
    }
    for (_, m) in &mut layers[i + 1..i + len] {
        *m = Box::new(Identity);
    }
    Ok(Fused { modules: names, pattern })
}

/// Finds and fuses every conv + batch-norm (+ ReLU / ReLU6), conv + ReLU, linear +
/// batch-norm (+ ReLU), linear + ReLU and batch-norm + ReLU run of adjacent layers, in every `Sequential` of the model. Returns what it fused.
///
/// # Errors
/// A batch-norm whose statistics cannot be folded (wrong channel count, variance <= 0).
pub fn fuse(model: &mut Sequential) -> Result<Vec<Fused>> {
    let mut done = Vec::new();
    fuse_rec(model, "", &mut done)?;
    Ok(done)
}

fn fuse_rec(seq: &mut Sequential, prefix: &str, done: &mut Vec<Fused>) -> Result<()> {
    let mut i = 0;
    while i < seq.layers().len() {
        let len = pattern_len(seq.layers(), i);
        if len > 0 {
            done.push(fuse_at(seq.layers_mut(), i, len, prefix)?);
            i += len;
        } else {
            let name = join(prefix, &seq.layers()[i].0);
            let child = seq.layers_mut()[i].1.as_any_mut();
            if let Some(inner) = child.downcast_mut::<Sequential>() {
                fuse_rec(inner, &name, done)?;
            } else if let Some(cat) = child.downcast_mut::<Concat>() {
                for (bname, b) in &mut cat.branches {
                    fuse_rec(b, &join(&name, bname), done)?;
                }
            } else if let Some(res) = child.downcast_mut::<Residual>() {
                // The body's layers are named directly under the block.
                fuse_rec(&mut res.body, &name, done)?;
                if let Some((sname, s)) = &mut res.shortcut {
                    fuse_rec(s, &join(&name, sname), done)?;
                }
            }
            i += 1;
        }
    }
    Ok(())
}

/// Every module's full name (for messages).
pub fn module_names(model: &dyn Module) -> Vec<String> {
    let mut names = Vec::new();
    walk(model, "", &mut |p, _| {
        if !p.is_empty() {
            names.push(p.to_string());
        }
    });
    names
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The existing names closest to `name` (for "did you mean" messages).
pub(crate) fn nearest(name: &str, names: &[String]) -> Vec<String> {
    let items: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
    nearest_with_kinds(name, &items)
}

/// The (up to three, distinct) names nearest to `name` among `(name, kind)` items: first
/// those whose last path component is `name`'s (`conv1` for `layer1.0.conv1`), then those
/// whose kind `name` spells (`conv2d` for a `Conv2d`), then by edit distance, of the last
/// component and of the whole name.
pub(crate) fn nearest_with_kinds(name: &str, items: &[(&str, &str)]) -> Vec<String> {
    let last = |s: &str| s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase();
    let wanted = last(name);
    /// Other last component, other kind, distances of the last components and of the names.
    type Rank = (bool, bool, usize, usize);
    let mut scored: Vec<(Rank, &str)> = items
        .iter()
        .map(|&(n, kind)| {
            let key = (
                last(n) != wanted,
                !kind.eq_ignore_ascii_case(&wanted),
                edit_distance(&wanted, &last(n)),
                edit_distance(name, n),
            );
            (key, n)
        })
        .collect();
    scored.sort();
    let mut out: Vec<String> = Vec::new();
    for (_, n) in scored {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
        if out.len() == 3 {
            break;
        }
    }
    out
}

/// Fuses exactly the listed groups of modules (full names, adjacent in one `Sequential`), as
/// PyTorch's `fuse_modules(model, [["conv1", "bn1", "relu1"], ...])`.
///
/// # Errors
/// [`NnError::UnknownModule`] for a name the model lacks (with the nearest names);
/// [`NnError::Fusion`] for modules that are not adjacent in one container or do not form a
/// supported pattern.
pub fn fuse_modules(model: &mut Sequential, groups: &[&[&str]]) -> Result<Vec<Fused>> {
    let mut all: Vec<(String, &'static str)> = Vec::new();
    walk(model, "", &mut |p, m| {
        if !p.is_empty() {
            all.push((p.to_string(), m.kind()));
        }
    });
    for group in groups {
        for name in *group {
            if !all.iter().any(|(n, _)| n == name) {
                let items: Vec<(&str, &str)> = all.iter().map(|(n, k)| (n.as_str(), *k)).collect();
                return Err(NnError::UnknownModule {
                    name: name.to_string(),
                    suggestions: nearest_with_kinds(name, &items),
                });
            }
        }
    }
    let mut done = Vec::new();
    for group in groups {
        let names: Vec<String> = group.iter().map(|s| s.to_string()).collect();
        let (parent, first) = match names[0].rsplit_once('.') {
            Some((p, f)) => (p.to_string(), f.to_string()),
            None => (String::new(), names[0].clone()),
        };
        let seq = find_seq(model, &parent).ok_or_else(|| NnError::Fusion {
            modules: names.clone(),
            reason: format!("'{parent}' is not a Sequential container"),
        })?;
        let i = seq.layers().iter().position(|(n, _)| *n == first).expect("name checked above");
        let adjacent = names
            .iter()
            .enumerate()
            .all(|(k, n)| seq.layers().get(i + k).is_some_and(|(ln, _)| join(&parent, ln) == *n));
        if !adjacent {
            return Err(NnError::Fusion {
                modules: names,
                reason: "the modules must be adjacent, in order, in the same container".into(),
            });
        }
        let absorbed: Vec<&str> = seq.layers()[i + 1..i + names.len()]
            .iter()
            .zip(&names[1..])
            .filter(|((_, m), _)| m.as_any().is::<Identity>())
            .map(|(_, n)| n.as_str())
            .collect();
        if !absorbed.is_empty() {
            return Err(NnError::Fusion {
                modules: names.clone(),
                reason: format!(
                    "already fused: {} became Identity when an earlier fuse (or prepare, which fuses by \
                     default) folded it into {}; fuse each group once",
                    absorbed.join(", "),
                    names[0]
                ),
            });
        }
        if pattern_len(seq.layers(), i) != names.len() {
            let kinds: Vec<&str> = seq.layers()[i..i + names.len()].iter().map(|(_, m)| m.kind()).collect();
            return Err(NnError::Fusion {
                modules: names,
                reason: format!(
                    "{} is not a fusable pattern; supported: Conv2d|ConvTranspose2d+BatchNorm2d(+ReLU|ReLU6), \
                     Conv2d|ConvTranspose2d+ReLU|ReLU6, \
                     Linear+BatchNorm1d(+ReLU|ReLU6), Linear+ReLU|ReLU6, \
                     BatchNorm2d|BatchNorm1d+ReLU|ReLU6 (or call qnn::fuse to find them all)",
                    kinds.join("+")
                ),
            });
        }
        done.push(fuse_at(seq.layers_mut(), i, names.len(), &parent)?);
    }
    Ok(done)
}

fn find_seq<'a>(model: &'a mut Sequential, path: &str) -> Option<&'a mut Sequential> {
    if path.is_empty() {
        return Some(model);
    }
    let (head, rest) = path.split_once('.').unwrap_or((path, ""));
    let child = model.layers_mut().iter_mut().find(|(n, _)| n == head)?;
    let any = child.1.as_any_mut();
    if any.is::<Sequential>() {
        return find_seq(any.downcast_mut::<Sequential>().expect("checked"), rest);
    }
    if any.is::<Residual>() {
        let res = any.downcast_mut::<Residual>().expect("checked");
        // The body's layers are named directly under the block, the shortcut under its name.
        let next = rest.split_once('.').map_or(rest, |(h, _)| h);
        return match &mut res.shortcut {
            Some((sname, s)) if sname == next => find_seq(s, rest.split_once('.').map_or("", |(_, r)| r)),
            _ => find_seq(&mut res.body, rest),
        };
    }
    let cat = any.downcast_mut::<Concat>()?;
    let (branch, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let (_, b) = cat.branches.iter_mut().find(|(n, _)| n == branch)?;
    find_seq(b, rest)
}

/// [`fuse()`] for a [`Graph`]: every chain of conv or linear, batch-norm and ReLU (or ReLU6),
/// conv or linear and ReLU, or batch-norm and ReLU, in which each node is the only reader of
/// the one before it (and no graph output is taken in between), is folded into its first
/// node; the others become `Identity` and keep their names. Then per-channel affine maps
/// (`MulScalar`, `AddScalar`, or a depthwise 1x1 convolution of stride 1: ONNX's `x * k`, `x + k`,
/// `x - k`, `x / k` with constants) fold into the convolution before them (when it has no
/// activation; a transposed convolution too) or after them (when it has no padding, whose
/// border would read zeros of the mapped value), under the same conditions; a map before a
/// padded convolution stays. PP-LCNet (PaddleOCR's backbones) scales and shifts the output of
/// every convolution and activation that way.
///
/// # Errors
/// As [`fuse()`].
pub fn fuse_graph(g: &mut Graph) -> Result<Vec<Fused>> {
    g.touch();
    let mut done = Vec::new();
    fuse_chains(g, &mut done)?;
    fold_affines(g, &mut done)?;
    Ok(done)
}

/// The conv / linear + batch-norm + ReLU chains of [`fuse_graph`].
fn fuse_chains(g: &mut Graph, done: &mut Vec<Fused>) -> Result<()> {
    let mut i = 0;
    while i < g.nodes.len() {
        // The straight chain from node i: each next node the only reader of the previous.
        let uses = readers(g);
        let mut chain = vec![i];
        while chain.len() < 3 {
            let out = g.nodes[*chain.last().expect("non-empty")].output;
            if uses[out.0] != 1 {
                break;
            }
            match g.nodes.iter().position(|n| n.inputs == [out] && matches!(n.op, NodeOp::Layer(_))) {
                Some(j) => chain.push(j),
                None => break,
            }
        }
        if !chain.iter().all(|&k| matches!(g.nodes[k].op, NodeOp::Layer(_))) {
            i += 1;
            continue;
        }
        let mut layers: Vec<(String, Box<dyn Module>)> = chain
            .iter()
            .map(|&k| {
                let NodeOp::Layer(m) = std::mem::replace(&mut g.nodes[k].op, NodeOp::Layer(Box::new(Identity))) else {
                    unreachable!("checked: layers")
                };
                (g.nodes[k].name.clone(), m)
            })
            .collect();
        let len = pattern_len(&layers, 0);
        let fused = if len > 0 { Some(fuse_at(&mut layers, 0, len, "")) } else { None };
        for (&k, (_, m)) in chain.iter().zip(layers) {
            g.nodes[k].op = NodeOp::Layer(m);
        }
        if let Some(f) = fused {
            done.push(f?);
        }
        i += 1;
    }
    Ok(())
}

/// The per-channel affine map a layer computes, `y[c] = x[c] * scale[c] + shift[c]`, for
/// `c` channels: a [`MulScalar`] or an [`AddScalar`] (any channel count), or a depthwise 1x1 convolution of
/// stride 1 without padding (what an ONNX `x * k`, `x + k`, `x - k` or `x / k` with a
/// constant per channel imports as) of `c` channels. With its fused activation.
fn affine_of(m: &dyn Module, c: usize) -> Option<(Vec<f32>, Vec<f32>, FusedAct)> {
    if let Some(k) = m.as_any().downcast_ref::<MulScalar>() {
        return Some((vec![k.factor; c], vec![0.0; c], FusedAct::None));
    }
    if let Some(k) = m.as_any().downcast_ref::<AddScalar>() {
        return Some((vec![1.0; c], vec![k.value; c], FusedAct::None));
    }
    let conv = m.as_any().downcast_ref::<Conv2d>()?;
    let per_channel = conv.weight.shape() == [c, 1, 1, 1]
        && conv.geom.groups == c
        && conv.geom.stride == [1, 1]
        && conv.geom.padding == [0, 0];
    per_channel.then(|| {
        let shift = conv.bias.as_ref().map_or_else(|| vec![0.0; c], |b| b.iter().copied().collect());
        (conv.weight.iter().copied().collect(), shift, conv.activation)
    })
}

/// The node that alone reads `value`, through `Identity` layers that alone read it (the
/// layers earlier folds left), if it is a layer on that one input and no graph output is
/// taken along the way.
fn sole_layer_reader(g: &Graph, uses: &[usize], first_reader: &[Option<usize>], mut value: Tensor) -> Option<usize> {
    loop {
        if uses[value.0] != 1 {
            return None;
        }
        let j = first_reader[value.0]?;
        let node = &g.nodes[j];
        let NodeOp::Layer(m) = &node.op else { return None };
        if node.inputs.len() != 1 {
            return None;
        }
        if !m.as_any().is::<Identity>() {
            return Some(j);
        }
        value = node.output;
    }
}

fn conv_at(g: &Graph, i: usize) -> Option<&Conv2d> {
    match &g.nodes[i].op {
        NodeOp::Layer(m) => m.as_any().downcast_ref::<Conv2d>(),
        _ => None,
    }
}

/// The output channels of node `i` if it can absorb an affine map after it: a convolution
/// without an activation, or a transposed convolution.
fn folding_head(g: &Graph, i: usize) -> Option<usize> {
    let NodeOp::Layer(m) = &g.nodes[i].op else { return None };
    if let Some(conv) = m.as_any().downcast_ref::<Conv2d>() {
        return (conv.activation == FusedAct::None).then(|| conv.weight.shape()[0]);
    }
    let convt = m.as_any().downcast_ref::<ConvTranspose2d>().filter(|c| c.activation == FusedAct::None)?;
    convt.weight.shape().get(1).map(|&ocg| ocg * convt.groups)
}

fn channel_vec(b: Vec<f32>) -> ndarray::ArrayD<f32> {
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[b.len()]), b).expect("one per channel")
}

fn conv_at_mut(g: &mut Graph, i: usize) -> &mut Conv2d {
    match &mut g.nodes[i].op {
        NodeOp::Layer(m) => m.as_any_mut().downcast_mut::<Conv2d>().expect("checked: a Conv2d"),
        _ => unreachable!("checked: a layer"),
    }
}

/// Folds per-channel affine maps ([`affine_of`]: PP-LCNet's learnable scalar scale and
/// shift after every convolution and activation, ConvNeXt-style layer scales, input
/// normalization) into the convolutions beside them: one after a convolution without an
/// activation into that convolution (its activation, if any, moves onto the convolution),
/// one without an activation before a convolution without padding into that convolution.
/// Each map is the only reader of the value it maps, and its result the only reader's input;
/// the map becomes `Identity` and keeps its name. What is left (a map before a padded
/// convolution, whose border reads zeros of the mapped value) stays as it was.
fn fold_affines(g: &mut Graph, done: &mut Vec<Fused>) -> Result<()> {
    let uses = readers(g);
    let mut first_reader = vec![None; g.values];
    for (j, n) in g.nodes.iter().enumerate() {
        for t in &n.inputs {
            first_reader[t.0].get_or_insert(j);
        }
    }
    let fold_err = |modules: &[String; 2], e: qtensor::QError| NnError::Fusion {
        modules: modules.to_vec(),
        reason: e.to_string(),
    };
    // After a convolution (or a transposed one): each map in turn (a scale, then a shift)
    // until something else.
    for i in 0..g.nodes.len() {
        while let Some(oc) = folding_head(g, i) {
            let Some(j) = sole_layer_reader(g, &uses, &first_reader, g.nodes[i].output) else { break };
            let NodeOp::Layer(m) = &g.nodes[j].op else { break };
            let Some((scale, shift, act)) = affine_of(m.as_ref(), oc) else { break };
            let map_kind = m.kind();
            let names = [g.nodes[i].name.clone(), g.nodes[j].name.clone()];
            let NodeOp::Layer(head) = &mut g.nodes[i].op else { unreachable!("checked: a layer") };
            let pattern = format!("{}+{map_kind}", head.kind());
            let err = |e| fold_err(&names, e);
            if let Some(conv) = head.as_any_mut().downcast_mut::<Conv2d>() {
                let bias: Option<Vec<f32>> = conv.bias.as_ref().map(|b| b.iter().copied().collect());
                let (w, b) =
                    qfuse::fold_output_affine(conv.weight.view(), bias.as_deref(), &scale, &shift).map_err(err)?;
                conv.weight = w;
                conv.bias = Some(channel_vec(b));
                conv.activation = act;
            } else if let Some(convt) = head.as_any_mut().downcast_mut::<ConvTranspose2d>() {
                let bias: Option<Vec<f32>> = convt.bias.as_ref().map(|b| b.iter().copied().collect());
                let (w, b) = qfuse::fold_transposed_output_affine(
                    convt.weight.view(),
                    bias.as_deref(),
                    convt.groups,
                    &scale,
                    &shift,
                )
                .map_err(err)?;
                convt.weight = w;
                convt.bias = Some(channel_vec(b));
                convt.activation = act;
            }
            g.nodes[j].op = NodeOp::Layer(Box::new(Identity));
            done.push(Fused { modules: names.to_vec(), pattern });
        }
    }
    // Before a convolution without padding.
    for j in 0..g.nodes.len() {
        let Some(k) = sole_layer_reader(g, &uses, &first_reader, g.nodes[j].output) else { continue };
        let (NodeOp::Layer(m), Some(conv)) = (&g.nodes[j].op, conv_at(g, k)) else { continue };
        if conv.geom.padding != [0, 0] {
            continue;
        }
        let c = conv.weight.shape()[1] * conv.geom.groups;
        let Some((scale, shift, FusedAct::None)) = affine_of(m.as_ref(), c) else { continue };
        let bias: Option<Vec<f32>> = conv.bias.as_ref().map(|b| b.iter().copied().collect());
        let pattern = format!("{}+{}", m.kind(), conv.kind());
        let names = [g.nodes[j].name.clone(), g.nodes[k].name.clone()];
        let (w, b) = qfuse::fold_input_affine(conv.weight.view(), bias.as_deref(), conv.geom.groups, &scale, &shift)
            .map_err(|e| fold_err(&names, e))?;
        let conv = conv_at_mut(g, k);
        conv.weight = w;
        conv.bias = Some(channel_vec(b));
        g.nodes[j].op = NodeOp::Layer(Box::new(Identity));
        done.push(Fused { modules: names.to_vec(), pattern });
    }
    Ok(())
}
