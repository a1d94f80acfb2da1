//! Dynamic quantization against PyTorch (`scripts/golden/qdynamic_golden.py`; f32 values as
//! bit patterns): the activation parameters `torch._choose_qparams_per_tensor` picks, and
//! `quantized::linear_dynamic` / `linear_relu_dynamic` outputs, every element identical, on
//! every instruction set and thread count; per token, the same layer equals a per-row loop of
//! the per-tensor path.

use qkernels::{DynamicActivations, PackedLinear};
use qtensor::{QParams, QTensor, QuantRange};
use serde::Deserialize;

const FIXTURE: &str = include_str!("../golden/qdynamic.json");

fn f(b: u32) -> f32 {
    f32::from_bits(b)
}

#[derive(Deserialize)]
struct Fixture {
    choose: Vec<Choose>,
    linear: Vec<Linear>,
}

#[derive(Deserialize)]
struct Choose {
    min: u32,
    max: u32,
    reduce_range: bool,
    scale: u32,
    zp: i32,
}

#[derive(Deserialize)]
struct Linear {
    name: String,
    m: usize,
    k: usize,
    n: usize,
    x: Vec<u32>,
    w: Vec<i8>,
    w_scales: Vec<u32>,
    w_zps: Vec<i32>,
    bias: Option<Vec<u32>>,
    relu: bool,
    y: Vec<u32>,
}

fn fixture() -> Fixture {
    serde_json::from_str(FIXTURE).unwrap()
}

#[test]
fn dynamic_parameters_are_pytorchs() {
    let cases = fixture().choose;
    assert!(cases.len() >= 100);
    for c in &cases {
        let (scale, zp) = qtensor::choose_qparams_dynamic(f(c.min), f(c.max), c.reduce_range).unwrap();
        assert_eq!(
            (scale.to_bits(), zp),
            (c.scale, c.zp),
            "[{}, {}] reduce_range={}: ours {scale} {zp}, PyTorch's {} {}",
            f(c.min),
            f(c.max),
            c.reduce_range,
            f(c.scale),
            c.zp
        );
    }
    assert!(qtensor::choose_qparams_dynamic(f32::NAN, 1.0, true).is_err());
}

fn layer(isa: qtensor::isa::Isa, c: &Linear) -> PackedLinear {
    let params = if c.w_scales.len() == 1 {
        QParams::per_tensor(f(c.w_scales[0]), c.w_zps[0]).unwrap()
    } else {
        QParams::per_channel(c.w_scales.iter().map(|&s| f(s)).collect(), c.w_zps.clone(), 0).unwrap()
    };
    let w = ndarray::Array2::from_shape_vec((c.n, c.k), c.w.clone()).unwrap();
    let w = QTensor::from_int_repr(w, params, QuantRange::full(qtensor::DType::I8)).unwrap();
    let bias: Option<Vec<f32>> = c.bias.as_ref().map(|b| b.iter().map(|&v| f(v)).collect());
    PackedLinear::with_isa(isa, &w, bias.as_deref()).unwrap()
}

#[test]
fn dynamic_linear_is_pytorchs_bit_for_bit_on_every_isa() {
    let cases = fixture().linear;
    assert!(cases.len() >= 20);
    for c in &cases {
        let x: Vec<f32> = c.x.iter().map(|&v| f(v)).collect();
        for isa in crate::isas_under_test() {
            let packed = layer(isa, c);
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; c.m * c.n];
                let act = DynamicActivations::PerTensor { reduce_range: true };
                packed.forward_dynamic(&x, c.m, &mut y, act, c.relu, threads).unwrap();
                let same = y.iter().zip(&c.y).filter(|(a, b)| a.to_bits() == **b).count();
                assert_eq!(same, y.len(), "{} {isa} threads={threads}: {same} of {} identical", c.name, y.len());
            }
        }
    }
}

#[test]
fn per_token_equals_each_row_on_its_own() {
    for c in fixture().linear.iter().filter(|c| c.m > 1) {
        let x: Vec<f32> = c.x.iter().map(|&v| f(v)).collect();
        for reduce_range in [false, true] {
            // The reference: each row alone through the per-tensor path (the same range of
            // codes), scalar.
            let scalar = layer(qtensor::isa::Isa::Scalar, c);
            let mut want = vec![0.0; c.m * c.n];
            let mut first = None;
            for (row, w) in x.chunks_exact(c.k).zip(want.chunks_exact_mut(c.n)) {
                let act = DynamicActivations::PerTensor { reduce_range };
                let q = scalar.forward_dynamic(row, 1, w, act, c.relu, 1).unwrap();
                first.get_or_insert(q);
            }
            for isa in crate::isas_under_test() {
                let packed = layer(isa, c);
                for threads in [1, 2] {
                    let mut y = vec![0.0; c.m * c.n];
                    let act = DynamicActivations::PerToken { reduce_range };
                    let q = packed.forward_dynamic(&x, c.m, &mut y, act, c.relu, threads).unwrap();
                    assert_eq!(Some(q), first, "{}: the first row's parameters", c.name);
                    let same = y.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                    assert_eq!(same, y.len(), "{} {isa} threads={threads} reduce_range={reduce_range}", c.name);
                }
            }
        }
    }
}

#[test]
fn dynamic_linear_errors_name_the_row_and_the_shapes() {
    let cases = fixture().linear;
    let c = cases.iter().find(|c| c.m >= 3).unwrap();
    let packed = layer(qtensor::isa::selected(), c);
    let mut x: Vec<f32> = c.x.iter().map(|&v| f(v)).collect();
    let mut y = vec![0.0; c.m * c.n];
    let act = DynamicActivations::PerTensor { reduce_range: true };
    let e = packed.forward_dynamic(&x[1..], c.m, &mut y, act, false, 1).unwrap_err().to_string();
    assert!(e.contains("in_features") && e.contains(&format!("{}", c.k)), "{e}");
    x[2 * c.k + 3] = f32::NAN;
    for act in [act, DynamicActivations::PerToken { reduce_range: false }] {
        let e = packed.forward_dynamic(&x, c.m, &mut y, act, false, 1).unwrap_err().to_string();
        assert!(e.contains("input row 2 holds NaN"), "{e}");
    }
}

/// Per token over several row and column blocks (96 rows, 64 columns each), weights with and
/// without zero points: each row as if it ran alone.
#[test]
fn per_token_over_many_blocks_equals_each_row_on_its_own() {
    let mut next = crate::xorshift(0x0bad_5eed_1234_5678);
    for (m, k, n, symmetric) in [(200, 100, 130, false), (97, 64, 70, true)] {
        let w: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
        let zps: Vec<i32> = (0..n).map(|_| if symmetric { 0 } else { (next() % 41) as i32 - 20 }).collect();
        let scales: Vec<f32> = (0..n).map(|_| 0.001 + (next() % 100) as f32 * 1e-4).collect();
        let params = QParams::per_channel(scales, zps, 0).unwrap();
        let w = QTensor::from_int_repr(
            ndarray::Array2::from_shape_vec((n, k), w).unwrap(),
            params,
            QuantRange::full(qtensor::DType::I8),
        )
        .unwrap();
        let bias: Vec<f32> = (0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect();
        // Rows of very different ranges, as tokens with outliers have.
        let x: Vec<f32> =
            (0..m * k).map(|i| ((next() % 20001) as f32 / 10000.0 - 1.0) * (1 + (i / k) % 7) as f32 * 3.0).collect();
        let scalar = PackedLinear::with_isa(qtensor::isa::Isa::Scalar, &w, Some(&bias)).unwrap();
        let mut want = vec![0.0; m * n];
        // 7-bit codes on the symmetric weights (where the AVX2 tier pairs products in 16 bits).
        let reduce_range = symmetric;
        for (row, o) in x.chunks_exact(k).zip(want.chunks_exact_mut(n)) {
            let act = DynamicActivations::PerTensor { reduce_range };
            scalar.forward_dynamic(row, 1, o, act, true, 1).unwrap();
        }
        for isa in crate::isas_under_test() {
            let packed = PackedLinear::with_isa(isa, &w, Some(&bias)).unwrap();
            for threads in [1, 2] {
                let mut y = vec![0.0; m * n];
                let act = DynamicActivations::PerToken { reduce_range };
                packed.forward_dynamic(&x, m, &mut y, act, true, threads).unwrap();
                let same = y.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                assert_eq!(same, y.len(), "{m}x{k}x{n} {isa} threads={threads}");
            }
        }
    }
}
