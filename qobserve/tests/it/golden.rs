//! Observers against PyTorch's, on fixtures PyTorch wrote
//! (`scripts/golden/qobserve_golden.py`): the state after every batch (running min/max,
//! histogram) and the qparams it gives.

use qobserve::{HistogramObserver, MinMaxObserver, NonFinite, Observer, PerChannelMinMaxObserver, QuantSpec};
use qtensor::{DType, QScheme, QuantRange};
use serde::Deserialize;

const FIXTURE: &str = include_str!("../golden/observers.json");

#[derive(Deserialize)]
struct File {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    observer: String,
    dtype: String,
    qscheme: String,
    reduce_range: bool,
    quant_min: Option<i64>,
    quant_max: Option<i64>,
    averaging_constant: Option<u32>,
    ch_axis: Option<isize>,
    bins: Option<usize>,
    eps: u32,
    shape: Vec<usize>,
    batches: Vec<Vec<u32>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    states: Vec<State>,
}

#[derive(Deserialize)]
struct State {
    min_val: Vec<u32>,
    max_val: Vec<u32>,
    scale: Vec<u32>,
    zero_point: Vec<i64>,
    histogram: Option<Vec<u32>>,
}

fn f(b: u32) -> f32 {
    f32::from_bits(b)
}

fn spec(c: &Case) -> qobserve::Result<QuantSpec> {
    let dtype = match c.dtype.as_str() {
        "quint8" => DType::U8,
        "qint8" => DType::I8,
        other => panic!("unknown dtype {other}"),
    };
    let scheme = if c.qscheme.ends_with("symmetric") { QScheme::Symmetric } else { QScheme::Affine };
    let range = QuantRange::for_observer(dtype, c.quant_min.zip(c.quant_max), c.reduce_range)?;
    let spec = QuantSpec { dtype, scheme, range, eps: f(c.eps) };
    spec.check()?;
    Ok(spec)
}

/// `ignore`: skip non-finite values (PyTorch's HistogramObserver drops ±inf); our default
/// rejects them, which the test checks too.
fn build(c: &Case, ignore: bool) -> qobserve::Result<Box<dyn Observer>> {
    let s = spec(c)?;
    let nf = if ignore { NonFinite::Ignore } else { NonFinite::Error };
    let avg = c.averaging_constant.map(f);
    Ok(match c.observer.as_str() {
        "MinMaxObserver" => Box::new(MinMaxObserver::new(s).with_non_finite(nf)),
        "MovingAverageMinMaxObserver" => {
            Box::new(MinMaxObserver::moving_average(s, avg.unwrap_or(0.01))?.with_non_finite(nf))
        }
        "PerChannelMinMaxObserver" => Box::new(PerChannelMinMaxObserver::new(s, c.ch_axis.unwrap_or(0))),
        "MovingAveragePerChannelMinMaxObserver" => {
            Box::new(PerChannelMinMaxObserver::moving_average(s, c.ch_axis.unwrap_or(0), avg.unwrap_or(0.01))?)
        }
        "HistogramObserver" => Box::new(HistogramObserver::with_bins(s, c.bins.unwrap_or(2048))?.with_non_finite(nf)),
        other => panic!("unknown observer {other}"),
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Default, Debug)]
struct Tally {
    states: usize,
    exact_qparams: usize,
    hist_exact: usize,
    hist_states: usize,
    stricter: usize,
    mismatches: Vec<String>,
}

#[test]
fn observers_match_pytorch() {
    let file: File = serde_json::from_str(FIXTURE).unwrap();
    let mut t = Tally::default();
    for c in &file.cases {
        if let Some(e) = &c.error {
            if c.observer == "HistogramObserver" && c.qscheme.starts_with("per_channel") {
                continue; // our HistogramObserver has no per-channel form to misconfigure
            }
            assert!(build(c, false).is_err(), "{}: PyTorch rejects it ({e}) but we accept it", c.name);
            continue;
        }
        let has_inf = c.batches.iter().flatten().any(|&b| !f(b).is_finite());
        if has_inf {
            let mut strict = build(c, false).unwrap();
            let x =
                ndarray::ArrayD::from_shape_vec(c.shape.clone(), c.batches[0].iter().map(|&b| f(b)).collect()).unwrap();
            let first_has_inf = x.iter().any(|v| !v.is_finite());
            assert_eq!(strict.observe(x.view()).is_err(), first_has_inf, "{}: default policy", c.name);
        }
        let mut obs = match build(c, has_inf) {
            Ok(o) => o,
            Err(e) => {
                // Stricter than PyTorch on purpose: its HistogramObserver accepts symmetric u8
                // with reduce_range and returns zero point 128, outside its own 0..=127 range.
                let zp_outside = c.states.iter().all(|s| s.zero_point.iter().all(|&z| z > 127));
                assert!(
                    c.dtype == "quint8" && c.reduce_range && c.qscheme.ends_with("symmetric") && zp_outside,
                    "{}: {e}",
                    c.name
                );
                t.stricter += 1;
                continue;
            }
        };
        for (bi, (batch, st)) in c.batches.iter().zip(&c.states).enumerate() {
            let x = ndarray::ArrayD::from_shape_vec(c.shape.clone(), batch.iter().map(|&b| f(b)).collect()).unwrap();
            obs.observe(x.view()).unwrap_or_else(|e| panic!("{} batch {bi}: {e}", c.name));
            let (mins, maxs) = obs.observed_range().expect("observed");
            assert_eq!(bits(&mins), st.min_val, "{} batch {bi}: min_val", c.name);
            assert_eq!(bits(&maxs), st.max_val, "{} batch {bi}: max_val", c.name);
            if let (Some(h), Some(ho)) = (&st.histogram, obs.as_any().downcast_ref::<HistogramObserver>()) {
                t.hist_states += 1;
                if bits(ho.collector().counts()) == *h {
                    t.hist_exact += 1;
                } else {
                    let diff = ho.collector().counts().iter().zip(h).filter(|(a, b)| a.to_bits() != **b).count();
                    t.mismatches.push(format!("{} batch {bi}: {diff} histogram bins differ", c.name));
                }
            }
            t.states += 1;
            let p = obs.qparams().unwrap_or_else(|e| panic!("{} batch {bi}: {e}", c.name));
            let n = st.scale.len();
            let ours: Vec<(u32, i64)> = (0..n).map(|i| (p.scale(i).to_bits(), p.zero_point(i) as i64)).collect();
            let theirs: Vec<(u32, i64)> = st.scale.iter().copied().zip(st.zero_point.iter().copied()).collect();
            if ours == theirs {
                t.exact_qparams += 1;
            } else {
                t.mismatches.push(format!(
                    "{} batch {bi}: qparams ours {:?} PyTorch {:?}",
                    c.name,
                    ours.iter().map(|(s, z)| (f(*s), *z)).collect::<Vec<_>>(),
                    theirs.iter().map(|(s, z)| (f(*s), *z)).collect::<Vec<_>>()
                ));
            }
        }
    }
    eprintln!("{t:#?}");
    assert!(t.states > 200 && t.hist_states > 80, "{t:?}");
    assert_eq!(t.hist_exact, t.hist_states);
    assert!(t.mismatches.is_empty(), "{} mismatches: {:#?}", t.mismatches.len(), t.mismatches);
}
