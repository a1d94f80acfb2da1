//! Bit-exact agreement with PyTorch, on fixtures PyTorch itself wrote
//! (`scripts/golden/qtensor_golden.py`; the JSON stores every f32 as its bit pattern).
//!
//! One deliberate divergence, checked rather than skipped: PyTorch's vectorised per-tensor
//! 8-bit quantize converts `x * (1/scale)` to i32 after clamping it only from above (to
//! 2147483520), so values whose scaled magnitude reaches 2^31 (1e30, 3.4e38, ±inf with
//! large scales) overflow the conversion to i32::MIN, and adding the zero point wraps: +inf
//! becomes 0 for `quint8` with zero point 128. We saturate, as the scalar formula (and
//! PyTorch's own per-channel path) does. The test recomputes PyTorch's wrapping rule for every
//! such element, asserts PyTorch's stored value equals it and ours is the saturated one, and
//! fails on any other difference.
//!
//! A second one, in `qint32` qparams: PyTorch converts `round(min_neg / scale)` to int32 and
//! subtracts it from `quant_min` in int32. When the quotient exceeds the int32 range (a
//! `qint32` affine range whose scale came out above eps, e.g. min = -7161), the conversion
//! yields INT32_MIN and the subtraction wraps, giving zero point 0 where the range needs
//! `qmax`. We compute the zero point in i64 and clamp. The test checks each such case the same
//! way: PyTorch's value equals the wrapping rule, ours the clamped one.

use qtensor::{choose_qparams, choose_qparams_per_channel, DType, QParams, QScheme, QTensor, QuantRange};
use serde::Deserialize;

const QUANTIZE: &str = include_str!("../golden/quantize.json");
const QPARAMS: &str = include_str!("../golden/qparams.json");

fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

fn dtype(name: &str) -> DType {
    match name {
        "quint8" => DType::U8,
        "qint8" => DType::I8,
        "qint32" => DType::I32,
        other => panic!("fixture names unknown dtype {other}"),
    }
}

#[derive(Deserialize)]
struct QuantizeFile {
    torch_version: String,
    per_tensor: Vec<PerTensorCase>,
    per_channel: Vec<PerChannelCase>,
}

#[derive(Deserialize)]
struct PerTensorCase {
    name: String,
    dtype: String,
    scale: u32,
    zero_point: i64,
    input: Vec<u32>,
    output: Vec<i64>,
}

#[derive(Deserialize)]
struct PerChannelCase {
    name: String,
    dtype: String,
    axis: usize,
    shape: Vec<usize>,
    scales: Vec<u32>,
    zero_points: Vec<i64>,
    input: Vec<u32>,
    output: Vec<i64>,
}

fn quantize_as(dtype: DType, x: &ndarray::ArrayD<f32>, params: QParams, isa: qtensor::isa::Isa) -> Vec<i64> {
    let r = QuantRange::full(dtype);
    match dtype {
        DType::U8 => {
            QTensor::<u8>::quantize_with(isa, x, params, r).unwrap().as_slice().iter().map(|&v| v as i64).collect()
        }
        DType::I8 => {
            QTensor::<i8>::quantize_with(isa, x, params, r).unwrap().as_slice().iter().map(|&v| v as i64).collect()
        }
        DType::I32 => {
            QTensor::<i32>::quantize_with(isa, x, params, r).unwrap().as_slice().iter().map(|&v| v as i64).collect()
        }
        _ => unreachable!(),
    }
}

/// PyTorch's vectorised per-tensor 8-bit quantize, overflow included (see the module docs).
fn torch_vectorised_8bit(x: f32, inv: f32, zp: i32, dtype: DType) -> i64 {
    let p = (x * inv).min(2_147_483_520.0);
    let r = p.round_ties_even();
    let r = if (-2_147_483_648.0..2_147_483_648.0).contains(&r) { r as i32 } else { i32::MIN };
    (r.wrapping_add(zp) as i64).clamp(dtype.min_value(), dtype.max_value())
}

#[test]
#[cfg_attr(miri, ignore = "golden fixtures are large; the same kernels run under Miri in the property tests")]
fn quantize_matches_pytorch_bit_for_bit() {
    let file: QuantizeFile = serde_json::from_str(QUANTIZE).unwrap();
    assert!(file.torch_version.starts_with('2'), "fixtures from torch {}", file.torch_version);
    let (mut compared, mut overflow_divergences) = (0usize, 0usize);
    for case in &file.per_tensor {
        let dt = dtype(&case.dtype);
        let scale = f(case.scale);
        let zp = case.zero_point as i32;
        let x = ndarray::ArrayD::from_shape_vec(vec![case.input.len()], case.input.iter().map(|&b| f(b)).collect())
            .unwrap();
        for isa in crate::isas_under_test() {
            let ours = quantize_as(dt, &x, QParams::per_tensor(scale, zp).unwrap(), isa);
            for (i, (&got, &want)) in ours.iter().zip(&case.output).enumerate() {
                compared += 1;
                if got == want {
                    continue;
                }
                let xi = x[i];
                let inv = 1.0f32 / scale;
                let saturated = if xi * inv > 0.0 { dt.max_value() } else { dt.min_value() };
                let overflowing = dt != DType::I32 && (xi * inv).abs() >= 2_147_483_520.0;
                assert!(
                    overflowing && want == torch_vectorised_8bit(xi, inv, zp, dt) && got == saturated,
                    "{} [{isa}] element {i}: x = {xi:e} ({:#010x}): ours {got}, PyTorch {want}",
                    case.name,
                    case.input[i]
                );
                overflow_divergences += 1;
            }
        }
    }
    for case in &file.per_channel {
        let dt = dtype(&case.dtype);
        let x =
            ndarray::ArrayD::from_shape_vec(case.shape.clone(), case.input.iter().map(|&b| f(b)).collect()).unwrap();
        let params = QParams::per_channel(
            case.scales.iter().map(|&b| f(b)).collect(),
            case.zero_points.iter().map(|&z| z as i32).collect(),
            case.axis,
        )
        .unwrap();
        for isa in crate::isas_under_test() {
            let ours = quantize_as(dt, &x, params.clone(), isa);
            assert_eq!(ours, case.output, "{} [{isa}]", case.name);
            compared += ours.len();
        }
    }
    assert!(file.per_tensor.len() >= 100 && file.per_channel.len() >= 18);
    // Per instruction set, whichever ones this CPU has.
    let per_tier = compared / crate::isas_under_test().len();
    assert!(per_tier > 20_000, "compared only {per_tier} values per instruction set");
    // The fixtures hold 246 overflowing values per instruction set (see the module docs).
    assert_eq!(overflow_divergences, 246 * crate::isas_under_test().len());
}

#[derive(Deserialize)]
struct QParamsFile {
    cases: Vec<QParamsCase>,
}

#[derive(Deserialize)]
struct QParamsCase {
    name: String,
    observer: String,
    dtype: String,
    qscheme: String,
    reduce_range: bool,
    quant_min: Option<i64>,
    quant_max: Option<i64>,
    eps: u32,
    ch_axis: Option<i64>,
    shape: Vec<usize>,
    batches: Vec<Vec<u32>>,
    error: Option<String>,
    qmin: Option<i64>,
    qmax: Option<i64>,
    min_val: Option<Vec<u32>>,
    max_val: Option<Vec<u32>>,
    scale: Option<Vec<u32>>,
    zero_point: Option<Vec<i64>>,
}

/// Per-channel (or whole-tensor) min and max over all batches, as PyTorch's observers keep them.
fn observe(case: &QParamsCase, axis: Option<usize>) -> (Vec<f32>, Vec<f32>) {
    let channels = axis.map_or(1, |a| case.shape[a]);
    let (mut mins, mut maxs) = (vec![f32::INFINITY; channels], vec![f32::NEG_INFINITY; channels]);
    for batch in &case.batches {
        let x = ndarray::ArrayD::from_shape_vec(case.shape.clone(), batch.iter().map(|&b| f(b)).collect()).unwrap();
        for (idx, &v) in x.indexed_iter() {
            let c = axis.map_or(0, |a| idx[a]);
            mins[c] = mins[c].min(v);
            maxs[c] = maxs[c].max(v);
        }
    }
    (mins, maxs)
}

#[test]
#[cfg_attr(miri, ignore = "golden fixtures are large; the same kernels run under Miri in the property tests")]
fn qparams_match_pytorch_observers_bit_for_bit() {
    let file: QParamsFile = serde_json::from_str(QPARAMS).unwrap();
    let (mut exact, mut both_reject, mut stricter, mut not_applicable, mut int32_zp_overflows) = (0, 0, 0, 0, 0);
    for case in &file.cases {
        let per_channel = case.observer == "PerChannelMinMaxObserver";
        let scheme_per_channel = case.qscheme.starts_with("per_channel");
        if per_channel != scheme_per_channel || case.error.as_deref().is_some_and(|e| e.starts_with("IndexError")) {
            // A per-tensor observer asked for per-channel qparams (or the reverse), or an
            // observer fed a tensor without its channel axis: these are observer-level
            // mistakes (qobserve's business) that qtensor's two functions cannot express.
            not_applicable += 1;
            continue;
        }
        let dt = dtype(&case.dtype);
        let scheme = if case.qscheme.ends_with("symmetric") { QScheme::Symmetric } else { QScheme::Affine };
        // PyTorch ignores a custom range unless both ends are given.
        let custom = case.quant_min.zip(case.quant_max);
        let range = QuantRange::for_observer(dt, custom, case.reduce_range);
        let axis = case.ch_axis.filter(|_| per_channel).map(|a| {
            if a < 0 {
                (case.shape.len() as i64 + a) as usize
            } else {
                a as usize
            }
        });
        let result = range.and_then(|r| {
            let (mins, maxs) = observe(case, axis);
            if let (Some(min_val), Some(max_val)) = (&case.min_val, &case.max_val) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(&bits(&mins), min_val, "{}: min_val", case.name);
                assert_eq!(&bits(&maxs), max_val, "{}: max_val", case.name);
            }
            let eps = f(case.eps);
            match axis {
                Some(a) => choose_qparams_per_channel(&mins, &maxs, a, dt, scheme, r, eps).map(|p| (r, p)),
                None => choose_qparams(mins[0], maxs[0], dt, scheme, r, eps).map(|p| (r, p)),
            }
        });
        match (&case.error, result) {
            (Some(_), Err(_)) => both_reject += 1,
            (Some(e), Ok(_)) => panic!("{}: PyTorch rejects it ({e}) but we accept it", case.name),
            (None, Ok((r, p))) => {
                assert_eq!(
                    (r.qmin() as i64, r.qmax() as i64),
                    (case.qmin.unwrap(), case.qmax.unwrap()),
                    "{}: range",
                    case.name
                );
                let scales = case.scale.as_ref().unwrap();
                let zps = case.zero_point.as_ref().unwrap();
                let mut diverged = false;
                for c in 0..scales.len() {
                    assert_eq!(
                        p.scale(c).to_bits(),
                        scales[c],
                        "{}: scale[{c}] {:e} vs {:e}",
                        case.name,
                        p.scale(c),
                        f(scales[c])
                    );
                    let ours = p.zero_point(c) as i64;
                    if ours != zps[c] {
                        let (mins, _) = observe(case, axis);
                        let shift = (mins[c].min(0.0) / p.scale(c)).round_ties_even();
                        let shift_overflows = !(-2_147_483_648.0..2_147_483_648.0).contains(&shift);
                        let torch_rule =
                            (r.qmin().wrapping_sub(i32::MIN) as i64).clamp(r.qmin() as i64, r.qmax() as i64);
                        let proper = (r.qmin() as i64 - shift as i64).clamp(r.qmin() as i64, r.qmax() as i64);
                        assert!(
                            dt == DType::I32 && shift_overflows && zps[c] == torch_rule && ours == proper,
                            "{}: zero_point[{c}]: ours {ours}, PyTorch {}",
                            case.name,
                            zps[c]
                        );
                        diverged = true;
                    }
                }
                if diverged {
                    int32_zp_overflows += 1;
                } else {
                    exact += 1;
                }
            }
            (None, Err(e)) => {
                // Where we are stricter than PyTorch, on purpose: a custom range outside the
                // dtype (PyTorch accepts quint8 (0, 511) and clamps later), or an infinite
                // scale (a range of ±3e38: PyTorch returns scale = inf).
                let torch_scale_inf = case.scale.as_ref().is_some_and(|s| s.iter().any(|&b| !f(b).is_finite()));
                let range_outside_dtype = case.qmin.unwrap() < dt.min_value() || case.qmax.unwrap() > dt.max_value();
                assert!(torch_scale_inf || range_outside_dtype, "{}: we reject what PyTorch accepts: {e}", case.name);
                stricter += 1;
            }
        }
    }
    eprintln!(
        "qparams golden: {exact} exact, {both_reject} rejected by both, {stricter} stricter here, \
         {int32_zp_overflows} int32 zero-point overflows in PyTorch, {not_applicable} n/a"
    );
    assert!(int32_zp_overflows <= 4, "{int32_zp_overflows} qint32 zero-point divergences");
    assert!(exact >= 280, "only {exact} cases compared exactly");
    assert!(stricter <= 12, "{stricter} cases rejected here but accepted by PyTorch");
}
