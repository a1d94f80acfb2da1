//! qonnx's tests: one binary. `handmade`: models written here with the proto structs (each
//! op's attributes and the errors); `models`: models PyTorch exported, against ONNX
//! Runtime's outputs (`scripts/onnx/qonnx_fixtures.py`); `backend`: ONNX's own backend test
//! cases for the ops we import (`scripts/onnx/onnx_backend_cases.py`); `dynamic`: an imported
//! model dynamically quantized, against PyTorch (`scripts/onnx/qonnx_dynamic_fixture.py`);
//! `sequence`: models with a symbolic sequence length, run at several
//! (`scripts/onnx/qonnx_sequence_fixture.py`).

mod backend;
mod dynamic;
mod gpt2;
mod handmade;
mod models;
mod sequence;

use std::path::PathBuf;

pub fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Largest absolute difference over the largest absolute value of `want`.
pub fn rel_err(got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// `10 log10(|ref|^2 / |ref - q|^2)`.
pub fn sqnr_db(q: &ndarray::ArrayD<f32>, reference: &ndarray::ArrayD<f32>) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (a, b) in q.iter().zip(reference) {
        s += f64::from(*b) * f64::from(*b);
        n += f64::from(a - b) * f64::from(a - b);
    }
    10.0 * (s / n.max(1e-30)).log10()
}
