//! Models with torchvision's (or the bundled scripts') module names and shapes, so their
//! PyTorch `state_dict`s load unchanged.

use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, ReLU};
use crate::module::Sequential;

/// The bundled digits classifier (`scripts/models/digits.py`): 1x8x8 images of handwritten
/// digits (scikit-learn's), 10 classes. Weights: `qnn/data/digits_model.safetensors`.
pub fn digits() -> Sequential {
    Sequential::new()
        .add("conv1", Conv2d::new(1, 16, 3).padding(1))
        .add("bn1", BatchNorm2d::new(16))
        .add("relu1", ReLU)
        .add("conv2", Conv2d::new(16, 32, 3).stride(2).padding(1))
        .add("bn2", BatchNorm2d::new(32))
        .add("relu2", ReLU)
        .add("pool", AdaptiveAvgPool2d(2, 2))
        .add("flatten", Flatten)
        .add("fc1", Linear::new(32 * 2 * 2, 64))
        .add("relu3", ReLU)
        .add("fc2", Linear::new(64, 10))
}
