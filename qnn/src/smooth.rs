//! SmoothQuant (Xiao et al., 2023): moves activation outliers into the weights before static
//! quantization, a float-to-float rewrite that leaves the model's function unchanged.
//!
//! A linear layer's input channels whose values reach far beyond the others' (a few
//! channels of a transformer's normalized activations do) force one activation scale that
//! leaves the other channels few codes. Dividing input channel `j` by `s_j` and multiplying
//! column `j` of the weights by it computes the same product; with
//! `s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)` the activation ranges even out, and the
//! weights, quantized per output channel, take part of the spread. The division is folded
//! into the `LayerNorm` that produces the input (its gamma and beta), so nothing is added to
//! the graph. That needs every reader of the `LayerNorm`'s output to be a linear layer:
//! pre-norm transformers (ViT, GPT) have that shape; a post-norm one (BERT), whose
//! normalized output also feeds the residual addition, does not, and its norms are skipped
//! and reported.

use ndarray::{ArrayD, Axis};

use crate::graph::NodeOp;
use crate::ops::layernorm::LayerNorm;
use crate::ops::linear::Linear;
use crate::ops::shape::{Flatten, Permute, Reshape};
use crate::{Graph, NnError, Result};

/// What [`smooth_quant`] did to one `LayerNorm` and the linear layers reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct Smoothed {
    /// The `LayerNorm`'s node.
    pub norm: String,
    /// The linear layers whose weight columns were scaled.
    pub linears: Vec<String>,
    /// The smallest and largest channel factor `s_j`.
    pub scale_range: (f32, f32),
    /// The ratio of the largest to the median channel's absolute maximum at the
    /// `LayerNorm`'s output, before and after (how much outliers stood out).
    pub outlier_ratio: (f32, f32),
}

/// What [`smooth_quant`] did to a graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SmoothReport {
    /// The norms smoothed.
    pub smoothed: Vec<Smoothed>,
    /// `LayerNorm`s left alone, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Applies SmoothQuant to `g` with migration strength `alpha` (0: nothing moves to the
/// weights, 1: all of each channel's range does; 0.5 is the paper's default), measuring the
/// activations on `batches` (each one array per graph input, as [`Graph::run`] takes them).
/// Run it on the float model before [`crate::prepare`]; calibrate on the same data.
///
/// # Errors
/// `alpha` outside `0..=1`, no batches, or a batch the graph cannot run (the message names
/// the node).
pub fn smooth_quant(g: &mut Graph, batches: &[Vec<ArrayD<f32>>], alpha: f32) -> Result<SmoothReport> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(NnError::Config {
            module: "smooth_quant".into(),
            reason: format!("alpha {alpha} is outside 0..=1; the paper's default is 0.5"),
        });
    }
    if batches.is_empty() {
        return Err(NnError::Config {
            module: "smooth_quant".into(),
            reason: "no batches to measure the activations on; pass the calibration data".into(),
        });
    }
    let mut report = SmoothReport::default();
    // (norm node, its channel count, the linear readers' nodes, the layout nodes between)
    let mut plans: Vec<(usize, usize, Vec<usize>, Vec<usize>)> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let NodeOp::Layer(m) = &n.op else { continue };
        let Some(norm) = m.as_any().downcast_ref::<LayerNorm>() else { continue };
        if norm.weight.ndim() != 1 || norm.bias.len() != norm.weight.len() {
            report.skipped.push((n.name.clone(), "it normalizes over more than the last axis".into()));
            continue;
        }
        let c = norm.weight.len();
        let (mut linears, mut layout) = (Vec::new(), Vec::new());
        match linear_readers(g, n.output, c, &mut linears, &mut layout) {
            Ok(()) if linears.is_empty() => report.skipped.push((n.name.clone(), "nothing reads it".into())),
            Ok(()) => plans.push((i, c, linears, layout)),
            Err(reason) => report.skipped.push((n.name.clone(), reason)),
        }
    }
    if plans.is_empty() {
        return Ok(report);
    }
    // Each norm's output: the largest magnitude per channel over every batch; the layout
    // nodes' output shapes, which must keep the channels on the last axis.
    let mut amax: Vec<Vec<f32>> = plans.iter().map(|p| vec![0.0f32; p.1]).collect();
    let mut last_dims: Vec<(usize, usize)> = Vec::new();
    let kernels = g.float_kernels()?;
    for batch in batches {
        g.run_f32(batch, Some((&kernels, 1)), |i, y| {
            if let Some(p) = plans.iter().position(|p| p.0 == i) {
                let last = Axis(y.ndim().saturating_sub(1));
                for lane in y.lanes(last) {
                    for (a, v) in amax[p].iter_mut().zip(lane) {
                        *a = a.max(v.abs());
                    }
                }
            }
            if plans.iter().any(|p| p.3.contains(&i)) {
                last_dims.push((i, y.shape().last().copied().unwrap_or(0)));
            }
            Ok(())
        })?;
    }
    let mut kept = Vec::new();
    for (plan, act) in plans.into_iter().zip(amax) {
        match last_dims.iter().find(|&&(k, d)| plan.3.contains(&k) && d != plan.1) {
            Some(&(k, d)) => report.skipped.push((
                g.nodes[plan.0].name.clone(),
                format!(
                    "{} moves its {} features off the last axis (to a last axis of {d}) before a linear layer",
                    g.nodes[k].name, plan.1
                ),
            )),
            None => kept.push((plan, act)),
        }
    }
    drop(kernels);
    g.touch();
    for ((i, c, linears, _), act) in kept {
        // The weights' largest magnitude per input column, over every reader.
        let mut wmax = vec![0.0f32; c];
        for &k in &linears {
            let NodeOp::Layer(m) = &g.nodes[k].op else { unreachable!("checked: linear readers") };
            let l = m.as_any().downcast_ref::<Linear>().expect("checked: linear readers");
            for row in l.weight.lanes(Axis(1)) {
                for (w, v) in wmax.iter_mut().zip(row) {
                    *w = w.max(v.abs());
                }
            }
        }
        let s: Vec<f32> = act
            .iter()
            .zip(&wmax)
            .map(|(&a, &w)| {
                if a > 0.0 && w > 0.0 && a.is_finite() && w.is_finite() {
                    (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
                } else {
                    1.0
                }
            })
            .collect();
        let NodeOp::Layer(m) = &mut g.nodes[i].op else { unreachable!("checked: a norm") };
        let norm = m.as_any_mut().downcast_mut::<LayerNorm>().expect("checked: a norm");
        for (gamma, sj) in norm.weight.iter_mut().zip(&s) {
            *gamma /= sj;
        }
        for (b, sj) in norm.bias.iter_mut().zip(&s) {
            *b /= sj;
        }
        let mut names = Vec::with_capacity(linears.len());
        for &k in &linears {
            names.push(g.nodes[k].name.clone());
            let NodeOp::Layer(m) = &mut g.nodes[k].op else { unreachable!("checked: linear readers") };
            let l = m.as_any_mut().downcast_mut::<Linear>().expect("checked: linear readers");
            for mut row in l.weight.lanes_mut(Axis(1)) {
                for (w, sj) in row.iter_mut().zip(&s) {
                    *w *= sj;
                }
            }
        }
        let after: Vec<f32> = act.iter().zip(&s).map(|(a, s)| a / s).collect();
        let lo = s.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = s.iter().copied().fold(0.0f32, f32::max);
        report.smoothed.push(Smoothed {
            norm: g.nodes[i].name.clone(),
            linears: names,
            scale_range: (lo, hi),
            outlier_ratio: (outlier_ratio(&act), outlier_ratio(&after)),
        });
    }
    Ok(report)
}

/// Collects into `linears` the linear layers that read value `t` (of `c` features on its last
/// axis), directly or through reshapes and permutations that keep the last axis last
/// (`layout`, whose output shapes the caller checks); any other reader, or a graph output
/// on the way, is the reason returned.
fn linear_readers(
    g: &Graph,
    t: crate::Tensor,
    c: usize,
    linears: &mut Vec<usize>,
    layout: &mut Vec<usize>,
) -> std::result::Result<(), String> {
    if g.outputs.contains(&t) {
        return Err("its output reaches a graph output".into());
    }
    for k in (0..g.nodes.len()).filter(|&k| g.nodes[k].inputs.contains(&t)) {
        let n = &g.nodes[k];
        let not_linear = || {
            format!("{} reads its output and is not a linear layer over its {c} features (only linear readers take the factors)", n.name)
        };
        let NodeOp::Layer(m) = &n.op else { return Err(not_linear()) };
        if n.inputs != [t] {
            return Err(not_linear());
        }
        let any = m.as_any();
        if let Some(l) = any.downcast_ref::<Linear>() {
            if l.weight.ndim() != 2 || l.weight.shape()[1] != c {
                return Err(not_linear());
            }
            linears.push(k);
        } else if any.is::<Reshape>()
            || any.is::<Flatten>()
            || any.downcast_ref::<Permute>().is_some_and(|p| p.dims.last().is_some_and(|&d| d + 1 == p.dims.len()))
        {
            layout.push(k);
            linear_readers(g, n.output, c, linears, layout)?;
        } else {
            return Err(not_linear());
        }
    }
    Ok(())
}

/// The largest of `v` over its median (1 when the median is 0).
fn outlier_ratio(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    let (med, max) = (s[s.len() / 2], s[s.len() - 1]);
    if med > 0.0 {
        max / med
    } else {
        1.0
    }
}
