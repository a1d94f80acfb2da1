//! The bodies of the fuzz targets in `fuzz/` (run with `cargo +nightly fuzz`), here so that
//! the committed regression inputs replay through exactly the same code in ordinary tests on
//! stable (`qnn/tests/fuzz_regressions.rs`). Not part of the API.

use ndarray::{ArrayD, IxDyn};

use crate::{load_safetensors_bytes, zoo, Module, QuantizedModel, Sequential};

/// The activation budget models from the fuzzer run under: large enough for every
/// legitimate small input here, small enough that a hostile geometry is refused.
const BUDGET: usize = 16 << 20;

fn input(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product();
    let v = (0..n).map(|k: usize| (k * 5 % 7) as f32 * 0.3 - 0.9).collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).expect("the length is the shape's")
}

/// Loads `data` as a saved model. One that loads must run a few small inputs (an answer or
/// an error, not a panic), save again, and load back to the same plan.
pub fn saved_model(data: &[u8]) {
    let Ok(mut model) = QuantizedModel::from_bytes(data) else { return };
    model.set_max_activation_bytes(BUDGET);
    for shape in [&[1, 1, 8, 8][..], &[2, 3, 5, 5], &[1, 64], &[3, 10]] {
        let _ = model.forward(&input(shape));
    }
    let bytes = model.to_bytes().expect("a model that loaded saves again");
    let back = QuantizedModel::from_bytes(&bytes).expect("a model saved by us loads");
    assert_eq!(back.plan(), model.plan(), "saving and loading keeps the plan");
}

/// A small model with every container, for weight files to be loaded into.
fn blocks() -> Sequential {
    use crate::layers::{BatchNorm2d, Conv2d, Linear, ReLU};
    let body = Sequential::new().add("conv", Conv2d::new(4, 4, 3).padding(1)).add("bn", BatchNorm2d::new(4));
    Sequential::new()
        .add("stem", Conv2d::new(1, 4, 1))
        .add("res", crate::Residual { body, shortcut: None, add_name: "add".into(), relu: Some("relu".into()) })
        .add("act", ReLU)
        .add("fc", Linear::new(4, 2))
}

/// Loads `data` as a PyTorch `state_dict` into the bundled architectures: every outcome is
/// an answer or an error.
pub fn state_dict(data: &[u8]) {
    let mut models: [(Sequential, &[usize]); 2] = [(zoo::digits(), &[1, 1, 8, 8]), (blocks(), &[1, 1, 3, 3])];
    for (model, shape) in &mut models {
        if load_safetensors_bytes(model, data, "(fuzz)").is_ok() {
            let _ = model.forward(&input(shape));
        }
    }
}
