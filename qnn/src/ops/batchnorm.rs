//! Batch normalization in inference mode: `BatchNorm2d` and `BatchNorm1d`. Fusion folds it
//! into the convolution or linear layer before it (`qfuse`); one left unfused runs in float,
//! and the plan says so.

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::{attrs, bad, parse, OpReader, OpWriter};
use crate::error::Result;
use crate::layers::{nchw, shape_err, FusedAct};
use crate::module::Module;
use crate::quant::Mode;

/// The saved form of a float batch-norm (its statistics are tensors).
#[derive(Serialize, Deserialize)]
struct BnAttrs {
    eps: u32,
    activation: FusedAct,
    weight: String,
    bias: String,
    mean: String,
    var: String,
}

fn not_fused(kind: &str) -> Mode {
    Mode::Float(crate::FloatReason::Unfused { kind: kind.to_string() })
}

fn save_bn(bn: &BatchNorm2d, node: &str, w: &mut OpWriter) -> J {
    let mut t = |name: &str, a: &ArrayD<f32>| {
        w.f32s(format!("{node}.bn_{name}"), vec![a.len()], &a.iter().copied().collect::<Vec<_>>())
    };
    let (weight, bias, mean, var) =
        (t("weight", &bn.weight), t("bias", &bn.bias), t("mean", &bn.running_mean), t("var", &bn.running_var));
    attrs(&BnAttrs { eps: bn.eps.to_bits(), activation: bn.activation, weight, bias, mean, var })
}

fn load_bn(j: &J, r: &OpReader<'_>) -> Result<BatchNorm2d> {
    let a: BnAttrs = parse(j, "batch-norm", "BatchNorm")?;
    let arr = |k: &str| -> Result<ArrayD<f32>> {
        let (_, v) = r.f32s(k)?;
        Ok(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).expect("1-D"))
    };
    let bn = BatchNorm2d {
        weight: arr(&a.weight)?,
        bias: arr(&a.bias)?,
        running_mean: arr(&a.mean)?,
        running_var: arr(&a.var)?,
        eps: f32::from_bits(a.eps),
        activation: a.activation,
    };
    let c = bn.running_mean.len();
    if [&bn.weight, &bn.bias, &bn.running_var].iter().any(|t| t.len() != c) {
        return Err(bad("batch-norm statistics of different lengths".into()));
    }
    Ok(bn)
}

/// The input shape a batch-norm over `c` channels takes: `[n, c, h, w]` (2d) or `[n, c]` (1d).
fn bn_shape(kind: &'static str, s: &[usize], c: usize) -> Result<Vec<usize>> {
    let ok = match kind {
        "BatchNorm1d" => s.len() == 2 && s[1] == c,
        _ => s.len() == 4 && s[1] == c,
    };
    if ok {
        Ok(s.to_vec())
    } else {
        Err(crate::layers::shape_error(
            kind,
            format!(
                "{} with {c} channels",
                if kind == "BatchNorm1d" { "[batch, features]" } else { "[batch, channels, height, width]" }
            ),
            s,
        ))
    }
}

/// The float layers of this file a saved model's float fallbacks can hold.
pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[
    ("BatchNorm2d", |j, r| Ok(Box::new(load_bn(j, r)?))),
    ("BatchNorm1d", |j, r| Ok(Box::new(BatchNorm1d(load_bn(j, r)?)))),
];

/// `nn.BatchNorm2d` in inference mode (running statistics).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// Gamma.
    pub weight: ArrayD<f32>,
    /// Beta.
    pub bias: ArrayD<f32>,
    /// Running mean.
    pub running_mean: ArrayD<f32>,
    /// Running variance.
    pub running_var: ArrayD<f32>,
    /// Added to the variance (PyTorch: 1e-5).
    pub eps: f32,
    /// A ReLU / ReLU6 fused after it by [`crate::fuse()`] (PyTorch's `BNReLU2d`).
    pub activation: FusedAct,
}

impl BatchNorm2d {
    fn features(&self) -> usize {
        self.running_mean.len()
    }

    /// The identity normalization over `c` channels (weight 1, bias 0, mean 0, var 1).
    pub fn new(c: usize) -> Self {
        BatchNorm2d {
            weight: ArrayD::ones(IxDyn(&[c])),
            bias: ArrayD::zeros(IxDyn(&[c])),
            running_mean: ArrayD::zeros(IxDyn(&[c])),
            running_var: ArrayD::ones(IxDyn(&[c])),
            eps: 1e-5,
            activation: FusedAct::None,
        }
    }

    /// The statistics as `qfuse` takes them.
    pub fn to_fuse(&self) -> qfuse::BatchNorm {
        let v = |a: &ArrayD<f32>| a.iter().copied().collect::<Vec<_>>();
        qfuse::BatchNorm {
            weight: Some(v(&self.weight)),
            bias: Some(v(&self.bias)),
            running_mean: v(&self.running_mean),
            running_var: v(&self.running_var),
            eps: self.eps,
        }
    }
}

impl Module for BatchNorm2d {
    fn kind(&self) -> &'static str {
        "BatchNorm2d"
    }

    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(bn_shape(self.kind(), input, self.features()))
    }

    fn lowering(&self) -> Mode {
        not_fused(self.kind())
    }

    fn computes_images_apart(&self) -> bool {
        true
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(save_bn(self, node, w)))
    }

    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [_, c, _, _] = nchw("BatchNorm2d", x, "[batch, channels, height, width]")?;
        if c != self.running_mean.len() {
            return Err(shape_err("BatchNorm2d", format!("{} channels", self.running_mean.len()), x));
        }
        let coef = |ch: usize| {
            let inv = 1.0 / (self.running_var[ch] + self.eps).sqrt();
            let alpha = self.weight[ch] * inv;
            (alpha, self.bias[ch] - self.running_mean[ch] * alpha)
        };
        if let (Some(data), &[n, _, h, w]) = (crate::layers::nhwc_data(x), x.shape()) {
            // The same formula, a pixel's channels at a time, keeping the NHWC layout.
            let (alpha, beta): (Vec<f32>, Vec<f32>) = (0..c).map(coef).unzip();
            let mut out = crate::scratch::take_f32(data.len());
            for (o, xs) in out.chunks_exact_mut(c.max(1)).zip(data.chunks_exact(c.max(1))) {
                for (((o, &v), &a), &b) in o.iter_mut().zip(xs).zip(&alpha).zip(&beta) {
                    *o = v * a + b;
                }
            }
            let mut y = crate::layers::from_nhwc(out, [n, h, w, c]);
            self.activation.apply(&mut y);
            return Ok(y);
        }
        let mut y = x.clone();
        for (ch, mut plane) in y.axis_iter_mut(ndarray::Axis(1)).enumerate() {
            let (alpha, beta) = coef(ch);
            plane.mapv_inplace(|v| v * alpha + beta);
        }
        self.activation.apply(&mut y);
        Ok(y)
    }

    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ]
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![
            ("weight", &mut self.weight),
            ("bias", &mut self.bias),
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
        ]
    }

    fn ignored_tensors(&self) -> &'static [&'static str] {
        &["num_batches_tracked"]
    }

    any_methods!();
}

/// `nn.BatchNorm1d` in inference mode on `[batch, features]` input (after a linear layer,
/// where [`crate::fuse()`] folds it).
#[derive(Debug, Clone)]
pub struct BatchNorm1d(pub BatchNorm2d);

impl BatchNorm1d {
    fn features(&self) -> usize {
        self.0.running_mean.len()
    }

    /// The identity normalization over `c` features.
    pub fn new(c: usize) -> Self {
        BatchNorm1d(BatchNorm2d::new(c))
    }
}

impl Module for BatchNorm1d {
    fn kind(&self) -> &'static str {
        "BatchNorm1d"
    }

    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(bn_shape(self.kind(), input, self.features()))
    }

    fn lowering(&self) -> Mode {
        not_fused(self.kind())
    }

    fn computes_images_apart(&self) -> bool {
        true
    }

    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(save_bn(&self.0, node, w)))
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let [_, c] = *x.shape() else {
            return Err(shape_err("BatchNorm1d", "a 2-D [batch, features] input".into(), x));
        };
        let bn = &self.0;
        if c != bn.running_mean.len() {
            return Err(shape_err("BatchNorm1d", format!("{} features", bn.running_mean.len()), x));
        }
        let mut y = x.clone();
        for (f, mut col) in y.axis_iter_mut(ndarray::Axis(1)).enumerate() {
            let inv = 1.0 / (bn.running_var[f] + bn.eps).sqrt();
            let alpha = bn.weight[f] * inv;
            let beta = bn.bias[f] - bn.running_mean[f] * alpha;
            col.mapv_inplace(|v| v * alpha + beta);
        }
        bn.activation.apply(&mut y);
        Ok(y)
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        self.0.tensors()
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        self.0.tensors_mut()
    }
    fn ignored_tensors(&self) -> &'static [&'static str] {
        &["num_batches_tracked"]
    }
    any_methods!();
}
