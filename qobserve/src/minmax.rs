//! Min-max observers, per tensor and per channel, plain and moving-average: PyTorch's
//! `MinMaxObserver`, `MovingAverageMinMaxObserver`, `PerChannelMinMaxObserver` and
//! `MovingAveragePerChannelMinMaxObserver`, with the same running statistics in `f32`.

use std::any::Any;

use ndarray::ArrayViewD;
use qtensor::QParams;

use crate::error::{ObserveError, Result};
use crate::observer::{check_finite, contiguous, in_memory_order, resolve_axis, NonFinite, Observer, QuantSpec};
use crate::scan::{scan, scan_channels, Scan};

/// Running min and max; with `averaging = Some(c)`, an exponential moving average after the
/// first batch: `min += c * (batch_min - min)` (PyTorch's order of `f32` operations).
#[derive(Clone, Debug, PartialEq)]
struct Running {
    averaging: Option<f32>,
    mins: Vec<f32>,
    maxs: Vec<f32>,
    seen: bool,
}

impl Running {
    fn update(&mut self, scans: &[Scan]) {
        if self.mins.len() != scans.len() {
            self.mins = vec![f32::INFINITY; scans.len()];
            self.maxs = vec![f32::NEG_INFINITY; scans.len()];
        }
        for (i, s) in scans.iter().enumerate() {
            match (self.averaging, self.seen) {
                (Some(c), true) => {
                    self.mins[i] += c * (s.min - self.mins[i]);
                    self.maxs[i] += c * (s.max - self.maxs[i]);
                }
                _ => {
                    self.mins[i] = self.mins[i].min(s.min);
                    self.maxs[i] = self.maxs[i].max(s.max);
                }
            }
        }
        self.seen = true;
    }
}

/// Min-max observer for a whole tensor (PyTorch `MinMaxObserver`), or with
/// [`MinMaxObserver::moving_average`] PyTorch's `MovingAverageMinMaxObserver`.
#[derive(Clone, Debug)]
pub struct MinMaxObserver {
    spec: QuantSpec,
    policy: NonFinite,
    run: Running,
}

impl MinMaxObserver {
    /// Running min and max over every batch.
    pub fn new(spec: QuantSpec) -> Self {
        MinMaxObserver {
            spec,
            policy: NonFinite::default(),
            run: Running { averaging: None, mins: vec![], maxs: vec![], seen: false },
        }
    }

    /// Moving average with constant `c` (PyTorch's default: 0.01).
    ///
    /// # Errors
    /// `c` outside `(0, 1]`.
    pub fn moving_average(spec: QuantSpec, c: f32) -> Result<Self> {
        check_averaging(c)?;
        let mut o = Self::new(spec);
        o.run.averaging = Some(c);
        Ok(o)
    }

    /// Sets the non-finite policy.
    pub fn with_non_finite(mut self, policy: NonFinite) -> Self {
        self.policy = policy;
        self
    }
}

fn check_averaging(c: f32) -> Result<()> {
    if c > 0.0 && c <= 1.0 {
        Ok(())
    } else {
        Err(ObserveError::Config {
            reason: format!("averaging constant {c} must be in (0, 1]; PyTorch's default is 0.01"),
        })
    }
}

fn merge_running(kind: &str, a: &mut Running, b: &Running) -> Result<()> {
    if a.averaging.is_some() {
        return Err(ObserveError::Merge {
            reason: format!("{kind}: a moving average depends on the order of batches; calibrate it on one thread"),
        });
    }
    if !b.seen {
        return Ok(());
    }
    if a.seen && a.mins.len() != b.mins.len() {
        return Err(ObserveError::Merge { reason: format!("{kind}: {} channels vs {}", a.mins.len(), b.mins.len()) });
    }
    let scans: Vec<Scan> = b.mins.iter().zip(&b.maxs).map(|(&min, &max)| Scan { min, max, nonfinite: 0 }).collect();
    a.update(&scans);
    Ok(())
}

impl Observer for MinMaxObserver {
    fn kind(&self) -> &'static str {
        if self.run.averaging.is_some() {
            "MovingAverageMinMax"
        } else {
            "MinMax"
        }
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let data = in_memory_order(&x);
        let s = scan(&data);
        check_finite(self.policy, self.kind(), &x, &s)?;
        if s.min <= s.max {
            self.run.update(&[s]);
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        if !self.run.seen {
            return Err(ObserveError::NoData { tensor: self.kind().into() });
        }
        Ok(self.spec.qparams(self.run.mins[0], self.run.maxs[0])?)
    }

    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let o = other.as_any().downcast_ref::<Self>().filter(|o| o.spec == self.spec).ok_or_else(|| {
            ObserveError::Merge { reason: format!("{} with {} of another configuration", self.kind(), other.kind()) }
        })?;
        merge_running(self.kind(), &mut self.run, &o.run)
    }

    fn merges_exactly(&self) -> bool {
        // Minima and maxima of minima and maxima; a moving average depends on order.
        self.run.averaging.is_none()
    }

    fn spec(&self) -> QuantSpec {
        self.spec
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn clone_box(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }

    fn observed_range(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        self.run.seen.then(|| (self.run.mins.clone(), self.run.maxs.clone()))
    }
}

/// Min-max per channel along an axis (PyTorch `PerChannelMinMaxObserver`, default axis 0),
/// or with [`PerChannelMinMaxObserver::moving_average`] PyTorch's
/// `MovingAveragePerChannelMinMaxObserver`. Negative axes count from the end.
#[derive(Clone, Debug)]
pub struct PerChannelMinMaxObserver {
    spec: QuantSpec,
    axis: isize,
    resolved: Option<usize>,
    policy: NonFinite,
    run: Running,
}

impl PerChannelMinMaxObserver {
    /// Running per-channel min and max along `axis`.
    pub fn new(spec: QuantSpec, axis: isize) -> Self {
        PerChannelMinMaxObserver {
            spec,
            axis,
            resolved: None,
            policy: NonFinite::default(),
            run: Running { averaging: None, mins: vec![], maxs: vec![], seen: false },
        }
    }

    /// Per-channel moving average with constant `c`.
    ///
    /// # Errors
    /// `c` outside `(0, 1]`.
    pub fn moving_average(spec: QuantSpec, axis: isize, c: f32) -> Result<Self> {
        check_averaging(c)?;
        let mut o = Self::new(spec, axis);
        o.run.averaging = Some(c);
        Ok(o)
    }

    /// Sets the non-finite policy.
    pub fn with_non_finite(mut self, policy: NonFinite) -> Self {
        self.policy = policy;
        self
    }
}

impl Observer for PerChannelMinMaxObserver {
    fn kind(&self) -> &'static str {
        if self.run.averaging.is_some() {
            "MovingAveragePerChannelMinMax"
        } else {
            "PerChannelMinMax"
        }
    }

    fn observe(&mut self, x: ArrayViewD<'_, f32>) -> Result<()> {
        let axis = resolve_axis(self.kind(), self.axis, x.shape())?;
        if x.is_empty() {
            return Ok(());
        }
        if self.run.seen && (self.resolved != Some(axis) || self.run.mins.len() != x.shape()[axis]) {
            return Err(ObserveError::Shape {
                tensor: self.kind().into(),
                reason: format!(
                    "batch of shape {:?} has {} channels on axis {axis}; earlier batches had {}",
                    x.shape(),
                    x.shape()[axis],
                    self.run.mins.len()
                ),
            });
        }
        let data = contiguous(&x);
        let scans = scan_channels(&data, x.shape(), axis);
        let total = scans.iter().fold(Scan::EMPTY, |a, s| a.merge(*s));
        check_finite(self.policy, self.kind(), &x, &total)?;
        self.resolved = Some(axis);
        self.run.update(&scans);
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let (true, Some(axis)) = (self.run.seen, self.resolved) else {
            return Err(ObserveError::NoData { tensor: self.kind().into() });
        };
        Ok(self.spec.qparams_per_channel(&self.run.mins, &self.run.maxs, axis)?)
    }

    fn merge(&mut self, other: &dyn Observer) -> Result<()> {
        let o =
            other.as_any().downcast_ref::<Self>().filter(|o| o.spec == self.spec && o.axis == self.axis).ok_or_else(
                || ObserveError::Merge {
                    reason: format!("{} with {} of another configuration", self.kind(), other.kind()),
                },
            )?;
        if self.resolved.is_none() {
            self.resolved = o.resolved;
        }
        merge_running(self.kind(), &mut self.run, &o.run)
    }

    fn merges_exactly(&self) -> bool {
        // Minima and maxima of minima and maxima; a moving average depends on order.
        self.run.averaging.is_none()
    }

    fn spec(&self) -> QuantSpec {
        self.spec
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn clone_box(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }

    fn observed_range(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        self.run.seen.then(|| (self.run.mins.clone(), self.run.maxs.clone()))
    }
}
