//! Quantizers: how a tensor's float values map to integers and back.
//!
//! An [`Observer`](crate::Observer) watches data and proposes affine parameters; a
//! [`Quantizer`] decides the mapping itself from that proposal (and, for weights, from the
//! values): it is fitted once per tensor ([`Quantizer::fit`]) into a [`Fitted`] quantizer,
//! which fake-quantizes (float -> integer -> float, for simulation) and says which affine
//! integers it is, if any, for int8 kernels ([`Fitted::affine`]).
//!
//! | quantizer | mapping | int8 kernels |
//! |---|---|---|
//! | [`Affine`] | the observer's scale and zero point (the default) | yes |
//! | [`SymmetricUnclipped`] | weights: symmetric, the smallest scale that clips neither extreme | yes |
//! | [`SymmetricMse`] | weights: symmetric, the scale of least squared error (0.9 to 1 of the unclipped one, or PyTorch's) | yes |
//! | [`PowerOfTwo`] | the scale rounded up to a power of two, zero point refitted | yes |
//! | [`Bits`] | 2- to 8-bit integer range over the observed range | yes, outputs clamped to the range |
//! | [`PerGroup`] | weights: a symmetric scale per output channel and group of input channels | no: simulated (weights stored dequantized) |
//! | [`Log2`] | sign and a power of two of the tensor's largest magnitude | no: simulated |
//! | [`Codebook`] | the nearest of your values, times the largest magnitude | no: simulated |
//!
//! Write your own by implementing both traits.

use std::fmt::Debug;

use ndarray::{ArrayD, ArrayViewD, Axis};
use qtensor::{fake_quantize, DType, QParams, QScheme, QuantRange};

use crate::error::{ObserveError, Result};
use crate::observer::QuantSpec;

/// What a quantizer is fitted to: the affine parameters the tensor's observer chose, their
/// target, and the tensor's values where they are known before calibration (weights).
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The observer's parameters (per tensor, or per channel along an axis).
    pub qparams: &'a QParams,
    /// Their dtype, scheme and integer range.
    pub spec: QuantSpec,
    /// The tensor itself: weights; `None` for activations.
    pub values: Option<ArrayViewD<'a, f32>>,
}

impl Observed<'_> {
    /// The real range `[lo, hi]` the observer's parameters cover, per channel (one entry for
    /// per-tensor parameters).
    pub fn ranges(&self) -> Vec<(f32, f32)> {
        let (qmin, qmax) = (self.spec.range.qmin(), self.spec.range.qmax());
        (0..channels(self.qparams))
            .map(|c| {
                let (s, z) = (self.qparams.scale(c), self.qparams.zero_point(c));
                ((qmin - z) as f32 * s, (qmax - z) as f32 * s)
            })
            .collect()
    }

    /// The largest magnitude the observer's parameters cover, per channel.
    pub fn amax(&self) -> Vec<f32> {
        self.ranges().into_iter().map(|(lo, hi)| lo.abs().max(hi.abs())).collect()
    }
}

fn channels(q: &QParams) -> usize {
    match q {
        QParams::PerTensor { .. } => 1,
        QParams::PerChannel(pc) => pc.len(),
    }
}

/// A quantization method: fitted once per tensor it is configured on.
pub trait Quantizer: Send + Sync + Debug {
    /// A short description for plans and messages (`"power-of-two scale"`).
    fn name(&self) -> String;

    /// Whether its fitted forms are affine integers that int8 kernels run (`Ok`), or why not
    /// (then a model can only simulate it).
    ///
    /// # Errors
    /// The reason, e.g. "a non-uniform log2 grid is not affine".
    fn int8(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Fits to one tensor.
    ///
    /// # Errors
    /// A tensor this method cannot take (e.g. per-group quantization of an activation).
    fn fit(&self, observed: &Observed<'_>) -> Result<Box<dyn Fitted>>;
}

/// A quantizer fitted to one tensor.
pub trait Fitted: Send + Sync + Debug {
    /// Quantizes and dequantizes `x` (a tensor of the shape it was fitted to; activations:
    /// any batch size).
    ///
    /// # Errors
    /// A tensor of another shape.
    fn fake_quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>>;

    /// The affine integers this mapping is (parameters and target, its integer range
    /// included), for int8 kernels; `None` when it is not affine.
    fn affine(&self) -> Option<(QParams, QuantSpec)>;
}

/// Fake quantization with affine parameters, in the spec's dtype and range.
fn fake_affine(x: &ArrayD<f32>, q: &QParams, spec: &QuantSpec) -> Result<ArrayD<f32>> {
    Ok(match spec.dtype {
        DType::U8 => fake_quantize::<u8, _, _>(x, q, spec.range)?,
        DType::I8 => fake_quantize::<i8, _, _>(x, q, spec.range)?,
        DType::I32 => fake_quantize::<i32, _, _>(x, q, spec.range)?,
        other => return Err(ObserveError::Config { reason: format!("no fake quantization for {other:?} targets") }),
    })
}

/// Affine parameters as a [`Fitted`] quantizer.
#[derive(Clone, Debug)]
struct FittedAffine {
    q: QParams,
    spec: QuantSpec,
}

impl Fitted for FittedAffine {
    fn fake_quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        fake_affine(x, &self.q, &self.spec)
    }
    fn affine(&self) -> Option<(QParams, QuantSpec)> {
        Some((self.q.clone(), self.spec))
    }
}

/// The observer's parameters as they are: today's behaviour, and the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Affine;

impl Quantizer for Affine {
    fn name(&self) -> String {
        "affine".into()
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(FittedAffine { q: o.qparams.clone(), spec: o.spec }))
    }
}

/// Symmetric weights without clipping: per channel (or per tensor, as the observer chose),
/// the smallest scale that puts both of the tensor's extremes on codes of the integer range,
/// `max(min / qmin, max / qmax)`, with zero point 0. On `[-128, 127]` a channel whose largest
/// magnitude is negative gets the finer scale `|min| / 128`, and one whose largest magnitude
/// is positive gets `max / 127`. PyTorch's symmetric scale, `max|w| / 127.5`, puts a positive
/// extreme at 127.5 steps, where it is clamped to 127: the same-signed error in every such
/// channel. The restricted range `[-127, 127]` (ONNX Runtime's) avoids the clamp but gives
/// every channel the coarser `max|w| / 127`. Weights only (it reads the values).
#[derive(Clone, Copy, Debug, Default)]
pub struct SymmetricUnclipped;

impl Quantizer for SymmetricUnclipped {
    fn name(&self) -> String {
        "symmetric without clipping".into()
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        fit_symmetric_weights(o, "unclipped", |w, qmin, qmax| {
            let (lo, hi) = w.iter().fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
            (lo / qmin).max(hi / qmax)
        })
    }
}

/// A symmetric weight quantizer's fit: the checks (values given, a symmetric `i8` target
/// around 0, finite weights), then `scale(channel, qmin, qmax)` per channel (one for
/// per-tensor parameters, as the observer chose), at least `f32::EPSILON`, zero point 0.
/// `who` names the quantizer in errors.
fn fit_symmetric_weights(
    o: &Observed<'_>,
    who: &str,
    scale: impl Fn(&[f32], f32, f32) -> f32,
) -> Result<Box<dyn Fitted>> {
    let Some(w) = &o.values else {
        return Err(ObserveError::Config {
            reason: format!(
                "the {who} symmetric quantizer reads the tensor's values, so it fits weights only; configure it as \
                 a weight quantizer"
            ),
        });
    };
    let (qmin, qmax) = (o.spec.range.qmin(), o.spec.range.qmax());
    if o.spec.scheme != QScheme::Symmetric || o.spec.dtype != DType::I8 || qmin >= 0 || qmax <= 0 {
        return Err(ObserveError::Config {
            reason: format!(
                "the {who} symmetric quantizer needs a symmetric i8 weight observer with a range around 0, got {:?} \
                 {:?} over [{qmin}, {qmax}]",
                o.spec.scheme, o.spec.dtype
            ),
        });
    }
    let channels: Vec<Vec<f32>> = match o.qparams.axis() {
        None => vec![w.iter().copied().collect()],
        Some(axis) => w.axis_iter(Axis(axis)).map(|ch| ch.iter().copied().collect()).collect(),
    };
    if channels.iter().flatten().any(|v| !v.is_finite()) {
        return Err(ObserveError::Config { reason: "the weights hold NaN or infinite values".into() });
    }
    let scales: Vec<f32> = channels.iter().map(|v| scale(v, qmin as f32, qmax as f32).max(f32::EPSILON)).collect();
    let q = match o.qparams.axis() {
        None => QParams::per_tensor(scales[0], 0)?,
        Some(axis) => {
            let zps = vec![0; scales.len()];
            QParams::per_channel(scales, zps, axis)?
        }
    };
    Ok(Box::new(FittedAffine { q, spec: o.spec }))
}

/// Symmetric weights at the scale of least squared error: per channel (or per tensor, as the
/// observer chose), the scale among 12 candidates, from the one that clips neither extreme
/// ([`SymmetricUnclipped`]'s) down to 0.9 of it in steps of 1%, plus PyTorch's
/// `max|w| / 127.5`, whose round trip `clamp(round(w / s), qmin, qmax) * s` is nearest the
/// weights in the sum of squares. A smaller scale clips a channel's few largest weights to
/// resolve all the others more finely; the search keeps that trade only where it pays.
/// Zero point 0; weights only (it reads the values).
#[derive(Clone, Copy, Debug, Default)]
pub struct SymmetricMse;

impl Quantizer for SymmetricMse {
    fn name(&self) -> String {
        "symmetric, least squared error".into()
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        fit_symmetric_weights(o, "least-squares", |v, lo_q, hi_q| {
            let sse = |s: f32| -> f64 {
                v.iter()
                    .map(|&x| {
                        let e = x - (x / s).round_ties_even().clamp(lo_q, hi_q) * s;
                        f64::from(e * e)
                    })
                    .sum()
            };
            let (lo, hi) = v.iter().fold((0f32, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
            let unclipped = (lo / lo_q).max(hi / hi_q);
            if unclipped <= f32::EPSILON {
                return f32::EPSILON;
            }
            let pytorch = lo.abs().max(hi) / ((hi_q - lo_q) / 2.0);
            let mut best = (sse(unclipped), unclipped);
            for s in (1..=10).map(|i| unclipped * (1.0 - 0.01 * i as f32)).chain([pytorch]) {
                let e = sse(s);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        })
    }
}

/// Affine with every scale rounded up to a power of two (`2^ceil(log2 s)`, so the observed
/// range stays covered); affine zero points are refitted so that the range's lower end
/// keeps its place, symmetric ones are kept. Integer arithmetic can then rescale by shifts.
#[derive(Clone, Copy, Debug, Default)]
pub struct PowerOfTwo;

impl Quantizer for PowerOfTwo {
    fn name(&self) -> String {
        "power-of-two scale".into()
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        let (qmin, qmax) = (o.spec.range.qmin(), o.spec.range.qmax());
        let mut scales = Vec::new();
        let mut zps = Vec::new();
        for (c, (lo, _)) in o.ranges().into_iter().enumerate() {
            let s = o.qparams.scale(c);
            let p = (s as f64).log2().ceil().exp2() as f32;
            let z = match o.spec.scheme {
                QScheme::Symmetric => o.qparams.zero_point(c),
                QScheme::Affine => {
                    (qmin as f64 - (lo as f64 / p as f64).round()).clamp(qmin as f64, qmax as f64) as i32
                }
            };
            scales.push(p);
            zps.push(z);
        }
        let q = match o.qparams.axis() {
            None => QParams::per_tensor(scales[0], zps[0])?,
            Some(axis) => QParams::per_channel(scales, zps, axis)?,
        };
        Ok(Box::new(FittedAffine { q, spec: o.spec }))
    }
}

/// Affine over an integer range of `bits` bits (2 to 8): `u8` targets get `0..=2^bits - 1`,
/// `i8` ones `-2^(bits-1)..=2^(bits-1) - 1`; the parameters are chosen again, by the
/// observer's scheme, for the range its parameters covered. Int8 execution honours the range:
/// weights are quantized into it, and outputs are clamped to it.
#[derive(Clone, Copy, Debug)]
pub struct Bits(u8);

impl Bits {
    /// `bits` from 2 to 8.
    ///
    /// # Errors
    /// Any other width.
    pub fn new(bits: u8) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(ObserveError::Config {
                reason: format!("Bits({bits}): an integer range of 2 to 8 bits; for 8 bits, Affine is the same"),
            });
        }
        Ok(Bits(bits))
    }

    /// The width.
    pub fn bits(&self) -> u8 {
        self.0
    }

    /// The integer range this width gives `dtype`.
    ///
    /// # Errors
    /// An `i32` target, which this quantizer does not narrow.
    pub fn range(&self, dtype: DType) -> Result<QuantRange> {
        let b = self.0 as i64;
        Ok(match dtype {
            DType::U8 => QuantRange::custom(dtype, 0, (1 << b) - 1)?,
            DType::I8 => QuantRange::custom(dtype, -(1 << (b - 1)), (1 << (b - 1)) - 1)?,
            other => {
                return Err(ObserveError::Config {
                    reason: format!(
                        "Bits({b}) narrows u8 or i8 targets, not {other:?}; quantize that tensor to 8 bits"
                    ),
                })
            }
        })
    }
}

impl Quantizer for Bits {
    fn name(&self) -> String {
        format!("{}-bit", self.0)
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        let spec = QuantSpec { range: self.range(o.spec.dtype)?, ..o.spec };
        let ranges = o.ranges();
        let q = match o.qparams.axis() {
            None => spec.qparams(ranges[0].0, ranges[0].1)?,
            Some(axis) => {
                let (mins, maxs): (Vec<f32>, Vec<f32>) = ranges.into_iter().unzip();
                spec.qparams_per_channel(&mins, &maxs, axis)?
            }
        };
        Ok(Box::new(FittedAffine { q, spec }))
    }
}

/// Weights with one symmetric scale per output channel (axis 0) and group of `group` input
/// channels (axis 1, with every element of the kernel window), over `bits` bits: codes in
/// `-(2^(bits-1) - 1)..=2^(bits-1) - 1`, scale = the group's largest magnitude / the largest
/// code. A dot product then sums products under several scales, which no int8 kernel does:
/// a layer with these weights runs in float on the dequantized weights (weight-only
/// quantization), and the plan says so.
#[derive(Clone, Copy, Debug)]
pub struct PerGroup {
    group: usize,
    bits: u8,
}

impl PerGroup {
    /// Groups of `group` input channels, `bits` from 2 to 8.
    ///
    /// # Errors
    /// A zero group or a width outside 2..=8.
    pub fn new(group: usize, bits: u8) -> Result<Self> {
        if group == 0 || !(2..=8).contains(&bits) {
            return Err(ObserveError::Config {
                reason: format!("PerGroup(group {group}, {bits} bits): the group needs at least one input channel and the width 2 to 8 bits"),
            });
        }
        Ok(PerGroup { group, bits })
    }
}

#[derive(Clone, Debug)]
struct FittedGroups {
    shape: Vec<usize>,
    group: usize,
    qmax: f32,
    /// `[out][group]`, row-major.
    scales: Vec<f32>,
}

impl FittedGroups {
    fn groups(&self) -> usize {
        self.shape[1].div_ceil(self.group)
    }
}

impl Fitted for FittedGroups {
    fn fake_quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if x.shape() != self.shape.as_slice() {
            return Err(ObserveError::Shape {
                tensor: "PerGroup".into(),
                reason: format!("fitted to weights of shape {:?}, given {:?}", self.shape, x.shape()),
            });
        }
        let inner: usize = self.shape[2..].iter().product();
        let per_out = self.shape[1] * inner;
        let groups = self.groups();
        let mut y = x.as_standard_layout().into_owned();
        let data = y.as_slice_mut().expect("standard layout");
        for (o, row) in data.chunks_mut(per_out.max(1)).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                let s = self.scales[o * groups + (i / inner) / self.group];
                *v = s * (*v / s).round_ties_even().clamp(-self.qmax, self.qmax);
            }
        }
        Ok(y)
    }
    fn affine(&self) -> Option<(QParams, QuantSpec)> {
        None
    }
}

impl Quantizer for PerGroup {
    fn name(&self) -> String {
        format!("{}-bit per-group weights (groups of {} input channels)", self.bits, self.group)
    }
    fn int8(&self) -> std::result::Result<(), String> {
        Err(format!(
            "per-group scales (groups of {} input channels) make each output a sum under several scales, which \
             no int8 kernel computes",
            self.group
        ))
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        let Some(w) = &o.values else {
            return Err(ObserveError::Config {
                reason: "PerGroup quantizes weights (groups of input channels); give activations another quantizer"
                    .into(),
            });
        };
        if w.ndim() < 2 || w.shape().contains(&0) {
            return Err(ObserveError::Shape {
                tensor: "PerGroup".into(),
                reason: format!("weights of shape {:?}: it needs [out, in, ...] with no empty axis", w.shape()),
            });
        }
        let qmax = ((1i32 << (self.bits - 1)) - 1) as f32;
        let shape = w.shape().to_vec();
        let groups = shape[1].div_ceil(self.group);
        let mut scales = Vec::with_capacity(shape[0] * groups);
        for out in w.axis_iter(Axis(0)) {
            for g in 0..groups {
                let hi = ((g + 1) * self.group).min(shape[1]);
                let part = out.slice_axis(Axis(0), (g * self.group..hi).into());
                let amax = part.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                if !amax.is_finite() {
                    return Err(ObserveError::Config { reason: "PerGroup: the weights hold NaN or infinities".into() });
                }
                scales.push((amax / qmax).max(o.spec.eps.max(f32::MIN_POSITIVE)));
            }
        }
        Ok(Box::new(FittedGroups { shape, group: self.group, qmax, scales }))
    }
}

/// A non-uniform grid: zero, and `±amax · 2^-k` for `k = 0 .. 2^(bits-1) - 2` (one sign bit,
/// the rest an exponent), `amax` being the largest magnitude the observer's parameters cover
/// (per channel for per-channel weights). Values round to the nearest level in the log
/// domain; below half the smallest level they become zero. Not affine: simulated only.
#[derive(Clone, Copy, Debug)]
pub struct Log2 {
    bits: u8,
}

impl Log2 {
    /// `bits` from 3 to 8.
    ///
    /// # Errors
    /// Any other width.
    pub fn new(bits: u8) -> Result<Self> {
        if !(3..=8).contains(&bits) {
            return Err(ObserveError::Config {
                reason: format!("Log2({bits}): 3 to 8 bits (a sign, zero and at least two powers of two)"),
            });
        }
        Ok(Log2 { bits })
    }
}

/// Scales per channel along an axis (or one for the whole tensor), applied level by level.
#[derive(Clone, Debug)]
struct FittedLevels {
    amax: Vec<f32>,
    axis: Option<usize>,
    /// Nearest level of `|x| / amax` in `[0, 1]`.
    level: LevelFn,
}

#[derive(Clone, Debug)]
enum LevelFn {
    /// Exponents 0 ..= `max_k`.
    Log2 { max_k: i32 },
    /// Sorted levels in `[-1, 1]`.
    Table(Vec<f32>),
}

impl LevelFn {
    fn apply(&self, r: f32) -> f32 {
        match self {
            LevelFn::Log2 { max_k } => {
                let m = r.abs();
                let smallest = (-(*max_k) as f32).exp2();
                if m < smallest / 2.0 {
                    return 0.0;
                }
                let k = (-m.log2()).round().clamp(0.0, *max_k as f32);
                (-k).exp2().copysign(r)
            }
            LevelFn::Table(t) => {
                let i = t.partition_point(|&v| v < r);
                let below = i.checked_sub(1).map(|j| t[j]);
                let above = t.get(i).copied();
                match (below, above) {
                    (Some(b), Some(a)) => {
                        if r - b <= a - r {
                            b
                        } else {
                            a
                        }
                    }
                    (Some(b), None) => b,
                    (None, Some(a)) => a,
                    (None, None) => 0.0,
                }
            }
        }
    }
}

impl Fitted for FittedLevels {
    fn fake_quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let mut y = x.clone();
        let one = |v: &mut f32, a: f32| {
            *v = if a > 0.0 { a * self.level.apply((*v / a).clamp(-1.0, 1.0)) } else { 0.0 };
        };
        match self.axis {
            None => y.iter_mut().for_each(|v| one(v, self.amax[0])),
            Some(axis) => {
                if axis >= y.ndim() || y.shape()[axis] != self.amax.len() {
                    return Err(ObserveError::Shape {
                        tensor: "non-uniform quantizer".into(),
                        reason: format!(
                            "fitted to {} channels along axis {axis}, given shape {:?}",
                            self.amax.len(),
                            y.shape()
                        ),
                    });
                }
                for (mut lane, &a) in y.axis_iter_mut(Axis(axis)).zip(&self.amax) {
                    lane.iter_mut().for_each(|v| one(v, a));
                }
            }
        }
        Ok(y)
    }
    fn affine(&self) -> Option<(QParams, QuantSpec)> {
        None
    }
}

fn fit_levels(o: &Observed<'_>, level: LevelFn) -> Box<dyn Fitted> {
    Box::new(FittedLevels { amax: o.amax(), axis: o.qparams.axis(), level })
}

impl Quantizer for Log2 {
    fn name(&self) -> String {
        format!("{}-bit log2 grid", self.bits)
    }
    fn int8(&self) -> std::result::Result<(), String> {
        Err("a log2 grid is not affine: int8 kernels compute on evenly spaced integers".into())
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        Ok(fit_levels(o, LevelFn::Log2 { max_k: (1 << (self.bits - 1)) - 2 }))
    }
}

/// Your own levels: each value becomes the nearest of `levels` (given in `[-1, 1]`) times
/// the largest magnitude the observer's parameters cover. Not affine: simulated only.
#[derive(Clone, Debug)]
pub struct Codebook {
    levels: Vec<f32>,
}

impl Codebook {
    /// Levels in `[-1, 1]`, at least two, finite.
    ///
    /// # Errors
    /// Fewer than two levels, or a level outside `[-1, 1]`.
    pub fn new(levels: &[f32]) -> Result<Self> {
        if levels.len() < 2 || levels.iter().any(|v| !(-1.0..=1.0).contains(v)) {
            return Err(ObserveError::Config {
                reason: format!(
                    "Codebook {levels:?}: at least two levels, each in [-1, 1] (they are scaled by the tensor's \
                     largest magnitude)"
                ),
            });
        }
        let mut levels = levels.to_vec();
        levels.sort_by(f32::total_cmp);
        levels.dedup();
        Ok(Codebook { levels })
    }
}

impl Quantizer for Codebook {
    fn name(&self) -> String {
        format!("codebook of {} levels", self.levels.len())
    }
    fn int8(&self) -> std::result::Result<(), String> {
        Err("a codebook is not affine: int8 kernels compute on evenly spaced integers".into())
    }
    fn fit(&self, o: &Observed<'_>) -> Result<Box<dyn Fitted>> {
        Ok(fit_levels(o, LevelFn::Table(self.levels.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, ArrayD, IxDyn};

    fn act(scale: f32, zp: i32) -> (QParams, QuantSpec) {
        (QParams::per_tensor(scale, zp).unwrap(), QuantSpec::u8_affine())
    }

    #[test]
    fn affine_is_the_observers_parameters() {
        let (q, spec) = act(0.1, 10);
        let f = Affine.fit(&Observed { qparams: &q, spec, values: None }).unwrap();
        let x = array![-1.0f32, 0.04, 0.06, 30.0].into_dyn();
        let y = f.fake_quantize(&x).unwrap();
        for (a, b) in y.iter().zip([-1.0f32, 0.0, 0.1, 24.5]) {
            assert!((a - b).abs() < 1e-5, "{y}");
        }
        assert_eq!(f.affine().unwrap().0, q);
    }

    #[test]
    fn power_of_two_rounds_scales_up_and_keeps_the_range_start() {
        // Covers [-1.0, 24.5] with scale 0.1: rounded up to 0.125, zero point 8 (-1.0 / 0.125).
        let (q, spec) = act(0.1, 10);
        let f = PowerOfTwo.fit(&Observed { qparams: &q, spec, values: None }).unwrap();
        let (p, _) = f.affine().unwrap();
        assert_eq!((p.scale(0), p.zero_point(0)), (0.125, 8));
        // Symmetric per-channel weights keep their zero points.
        let w = QParams::per_channel(vec![0.3, 0.01], vec![0, 0], 0).unwrap();
        let f = PowerOfTwo.fit(&Observed { qparams: &w, spec: QuantSpec::i8_symmetric(), values: None }).unwrap();
        let (p, _) = f.affine().unwrap();
        assert_eq!((p.scale(0), p.scale(1), p.zero_point(1)), (0.5, 1.0 / 64.0, 0));
    }

    /// The sum of squared round-trip errors of `w`'s channel `c` at scale `s` over [-128, 127].
    fn channel_sse(w: &ArrayD<f32>, c: usize, s: f32) -> f64 {
        w.index_axis(ndarray::Axis(0), c)
            .iter()
            .map(|&x| f64::from(x - (x / s).round_ties_even().clamp(-128.0, 127.0) * s).powi(2))
            .sum()
    }

    #[test]
    fn least_squares_symmetric_is_never_worse_than_pytorchs_or_the_unclipped_scale() {
        // Channels of 64 pseudo-random weights: Gaussian-like, one large outlier, a positive
        // extreme (PyTorch's scale clamps it), all zeros.
        let mut seed = 7u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            f32::from((seed >> 16) as u16) / 65_536.0 - 0.5
        };
        let mut v: Vec<f32> = Vec::new();
        for c in 0..4 {
            for i in 0..64 {
                v.push(match c {
                    0 => rnd() + rnd() + rnd(),
                    1 if i == 5 => 9.0,
                    1 => rnd(),
                    2 if i == 0 => 1.27,
                    2 => rnd() * 2.0,
                    _ => 0.0,
                });
            }
        }
        let w = ArrayD::from_shape_vec(IxDyn(&[4, 64]), v).unwrap();
        let amax: Vec<f32> =
            (0..4).map(|c| w.index_axis(ndarray::Axis(0), c).fold(0f32, |m, x| m.max(x.abs()))).collect();
        let pytorch =
            QParams::per_channel(amax.iter().map(|a| (a / 127.5).max(f32::EPSILON)).collect(), vec![0; 4], 0).unwrap();
        let spec = QuantSpec::i8_symmetric();
        let fitted = SymmetricMse.fit(&Observed { qparams: &pytorch, spec, values: Some(w.view()) }).unwrap();
        let (q, got_spec) = fitted.affine().unwrap();
        assert_eq!(got_spec, spec);
        let unclipped = SymmetricUnclipped.fit(&Observed { qparams: &pytorch, spec, values: Some(w.view()) }).unwrap();
        let (u, _) = unclipped.affine().unwrap();
        for c in 0..3 {
            let ours = channel_sse(&w, c, q.scale(c));
            assert!(ours <= channel_sse(&w, c, pytorch.scale(c)), "channel {c}");
            assert!(ours <= channel_sse(&w, c, u.scale(c)), "channel {c}");
            let top = u.scale(c).max(pytorch.scale(c));
            assert!(q.scale(c) >= 0.9 * u.scale(c) * 0.999 && q.scale(c) <= top, "channel {c}: {q:?}");
            assert_eq!(q.zero_point(c), 0);
        }
        // One outlier nine times the rest: clipping it by even 1% costs more than the others
        // gain, so its channel keeps the scale that holds it.
        assert_eq!(q.scale(1), u.scale(1));
        // The clamped positive extreme: the unclipped scale (or better) rather than PyTorch's.
        assert!(channel_sse(&w, 2, q.scale(2)) < channel_sse(&w, 2, pytorch.scale(2)));
        assert_eq!(q.scale(3), f32::EPSILON);
        // The fake quantization is the affine round trip at those scales.
        let y = fitted.fake_quantize(&w).unwrap();
        let x = w[[1, 5]];
        assert_eq!(y[[1, 5]], (x / q.scale(1)).round_ties_even().clamp(-128.0, 127.0) * q.scale(1));
        // Activations and affine targets: errors that say why.
        let (a, aspec) = act(0.1, 10);
        let e = SymmetricMse.fit(&Observed { qparams: &a, spec: aspec, values: None }).unwrap_err().to_string();
        assert!(e.contains("weights only"), "{e}");
        let e = SymmetricMse.fit(&Observed { qparams: &a, spec: aspec, values: Some(w.view()) }).unwrap_err();
        assert!(e.to_string().contains("symmetric i8"), "{e}");
    }

    #[test]
    fn unclipped_symmetric_puts_both_extremes_on_codes() {
        // Channel 0's largest magnitude is positive (2.54), channel 1's negative (-2.56).
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![2.54f32, -1.0, 0.3, -2.56, 1.0, 0.0]).unwrap();
        // PyTorch's symmetric parameters: max|w| / 127.5.
        let q = QParams::per_channel(vec![2.54 / 127.5, 2.56 / 127.5], vec![0, 0], 0).unwrap();
        let spec = QuantSpec::i8_symmetric();
        let f = SymmetricUnclipped.fit(&Observed { qparams: &q, spec, values: Some(w.view()) }).unwrap();
        let (p, s) = f.affine().unwrap();
        assert_eq!(s, spec);
        assert_eq!((p.scale(0), p.scale(1)), (2.54 / 127.0, 2.56 / 128.0));
        assert_eq!((p.zero_point(0), p.zero_point(1)), (0, 0));
        // Both extremes come back exactly, where PyTorch's scale clamps 2.54 to 127 codes.
        let y = f.fake_quantize(&w).unwrap();
        assert!((y[[0, 0]] - 2.54).abs() < 1e-6 && (y[[1, 0]] + 2.56).abs() < 1e-6, "{y}");
        let pytorch = Affine.fit(&Observed { qparams: &q, spec, values: None }).unwrap().fake_quantize(&w).unwrap();
        assert!((pytorch[[0, 0]] - 2.54 * 127.0 / 127.5).abs() < 1e-6, "{pytorch}");
        // Per tensor: one scale over both channels; all zeros: the smallest scale.
        let t = QParams::per_tensor(2.56 / 127.5, 0).unwrap();
        let f = SymmetricUnclipped.fit(&Observed { qparams: &t, spec, values: Some(w.view()) }).unwrap();
        assert_eq!(f.affine().unwrap().0.scale(0), 2.56 / 128.0);
        let zeros = ArrayD::zeros(IxDyn(&[1, 3]));
        let z = QParams::per_channel(vec![1.0], vec![0], 0).unwrap();
        let f = SymmetricUnclipped.fit(&Observed { qparams: &z, spec, values: Some(zeros.view()) }).unwrap();
        assert_eq!(f.affine().unwrap().0.scale(0), f32::EPSILON);
        // Activations, affine or u8 targets: errors that say why.
        let e = SymmetricUnclipped.fit(&Observed { qparams: &t, spec, values: None }).unwrap_err().to_string();
        assert!(e.contains("weights only"), "{e}");
        let (a, aspec) = act(0.1, 10);
        let e = SymmetricUnclipped.fit(&Observed { qparams: &a, spec: aspec, values: Some(w.view()) }).unwrap_err();
        assert!(e.to_string().contains("symmetric i8"), "{e}");
    }

    #[test]
    fn bits_narrow_the_range_and_refit() {
        let (q, spec) = act(0.1, 0); // covers [0, 25.5]
        let f = Bits::new(4).unwrap().fit(&Observed { qparams: &q, spec, values: None }).unwrap();
        let (p, s) = f.affine().unwrap();
        assert_eq!((s.range.qmin(), s.range.qmax()), (0, 15));
        assert!((p.scale(0) - 25.5 / 15.0).abs() < 1e-6);
        let y = f.fake_quantize(&array![100.0f32].into_dyn()).unwrap();
        assert!((y[0] - 25.5).abs() < 1e-4, "clamped to 15 codes: {y}");
        assert!(Bits::new(1).is_err() && Bits::new(9).is_err());
        let i8r = Bits::new(3).unwrap().range(DType::I8).unwrap();
        assert_eq!((i8r.qmin(), i8r.qmax()), (-4, 3));
    }

    #[test]
    fn per_group_scales_each_group_on_its_own() {
        // 2 outputs x 4 inputs, groups of 2: [1, 0.6 | 8, -3], [0.1, 0.1 | 0, 0].
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 4]), vec![1.0f32, 0.6, 8.0, -3.0, 0.1, 0.1, 0.0, 0.0]).unwrap();
        let q = QParams::per_channel(vec![8.0 / 7.0, 0.1 / 7.0], vec![0, 0], 0).unwrap();
        let pg = PerGroup::new(2, 4).unwrap();
        assert!(pg.int8().is_err());
        let f = pg.fit(&Observed { qparams: &q, spec: QuantSpec::i8_symmetric(), values: Some(w.view()) }).unwrap();
        assert!(f.affine().is_none());
        let y = f.fake_quantize(&w).unwrap();
        // Group [1, 0.6]: scale 1/7; 0.6 -> 4.2 codes -> 4.
        assert!((y[[0, 0]] - 1.0).abs() < 1e-6 && (y[[0, 1]] - 4.0 / 7.0).abs() < 1e-6, "{y}");
        // Group [8, -3]: scale 8/7: -3 -> -2.625 codes -> -3 (the first group's scale would give -21).
        assert!((y[[0, 3]] + 24.0 / 7.0).abs() < 1e-5, "{y}");
        assert_eq!(y[[1, 2]], 0.0);
        assert!(pg.fit(&Observed { qparams: &q, spec: QuantSpec::u8_affine(), values: None }).is_err());
        assert!(f.fake_quantize(&ArrayD::zeros(IxDyn(&[4, 2]))).is_err());
        assert!(PerGroup::new(0, 4).is_err());
    }

    #[test]
    fn log2_rounds_in_the_log_domain_and_flushes_tiny_values() {
        let (q, spec) = (QParams::per_tensor(1.0 / 32.0, 0).unwrap(), QuantSpec::i8_symmetric()); // amax 4
        let f = Log2::new(4).unwrap().fit(&Observed { qparams: &q, spec, values: None }).unwrap();
        // 4 bits: levels 4 * 2^-k, k = 0..=6; smallest 1/16, half of it 1/32.
        let x = array![4.0f32, 3.0, 2.7, 1.0, -0.7, 0.05, 0.03, 0.0, 100.0].into_dyn();
        let y = f.fake_quantize(&x).unwrap();
        assert_eq!(y, array![4.0f32, 4.0, 2.0, 1.0, -0.5, 0.0625, 0.0, 0.0, 4.0].into_dyn());
        assert!(f.affine().is_none() && Log2::new(2).is_err());
    }

    #[test]
    fn codebook_takes_the_nearest_level() {
        let (q, spec) = (QParams::per_tensor(1.0 / 64.0, 0).unwrap(), QuantSpec::i8_symmetric()); // amax 2
        let cb = Codebook::new(&[0.0, 0.25, 1.0, -1.0]).unwrap();
        let f = cb.fit(&Observed { qparams: &q, spec, values: None }).unwrap();
        let y = f.fake_quantize(&array![0.2f32, 0.3, 1.5, -5.0, 1.2].into_dyn()).unwrap();
        assert_eq!(y, array![0.0f32, 0.5, 2.0, -2.0, 0.5].into_dyn());
        assert!(Codebook::new(&[0.5]).is_err() && Codebook::new(&[0.0, 2.0]).is_err());
    }
}
