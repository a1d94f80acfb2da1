//! # qonnx: ONNX float models as qnn graphs
//!
//! Any model PyTorch (or another framework) exports to ONNX imports as a [`qnn::Graph`],
//! with no Rust to write: then `qnn::prepare`, calibrate, `convert` as for a model written
//! in Rust.
//!
//! - Opsets 6-21 of the default domain; the ops listed in [`SUPPORTED`]. Anything else is an
//!   error naming the node, its op type and the opset.
//! - Initializers, with their data inline or in external files beside the model.
//! - Shape arithmetic on constants (`Shape` / `Gather` / `Concat` / `Reshape` chains, as
//!   exporters write for `x.view(x.size(0), -1)`) is folded at import; a reshape whose first
//!   entry is the batch keeps the batch whatever its size.
//! - One symbolic size besides the batch (a sequence length) is followed through the graph,
//!   which then runs at any length ([`Imported::sequence`] says whether the import could).
//! - Graph nodes keep the ONNX node names, so plans, reports and `QConfigMapping` rules use
//!   them (`"/layer1/layer1.0/conv1/Conv"`, or a glob such as `"/layer4/*"`).
//! - The other way, [`export_qdq`] writes a converted model as an ONNX QDQ model (our scales
//!   and zero points on `QuantizeLinear` / `DequantizeLinear` pairs) for ONNX Runtime.
//!
//! ```no_run
//! use qnn::{prepare, QConfigMapping};
//! let model = qonnx::load("resnet18.onnx", &qonnx::ImportOptions::default())?;
//! let mut prepared = prepare(model.graph, &QConfigMapping::new(qobserve::QConfig::default()))?;
//! # let calibration_batch = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 224, 224]));
//! prepared.calibrate(&calibration_batch)?;
//! let int8 = prepared.convert()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod export;
mod import;
pub mod proto;
pub mod tensor;

use std::path::Path;

pub use error::{OnnxError, Result};
pub use export::{export_qdq, save_qdq, EXPORT_OPSET};
pub use import::{ImportOptions, Imported, InputSpec, Sequence, OPSETS, SUPPORTED};

/// Decodes an ONNX model file's bytes.
///
/// # Errors
/// Bytes that are not an ONNX `ModelProto`.
pub fn decode_model(bytes: &[u8], file: &str) -> Result<proto::ModelProto> {
    prost::Message::decode(bytes).map_err(|e| OnnxError::Format { file: file.to_string(), reason: e.to_string() })
}

/// Imports the ONNX model at `path` (external data files are read from its folder).
///
/// # Errors
/// The file cannot be read or decoded; the model uses an opset, op, attribute or shape the
/// importer does not support (the message names the node, op type and opset).
pub fn load(path: impl AsRef<Path>, opts: &ImportOptions) -> Result<Imported> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io { path: path.display().to_string(), source })?;
    let model = decode_model(&bytes, &path.display().to_string())?;
    import::import(&model, path.parent(), opts)
}

/// Imports an ONNX model from its bytes (a model with external data needs [`load`]).
///
/// # Errors
/// As [`load`].
pub fn from_bytes(bytes: &[u8], opts: &ImportOptions) -> Result<Imported> {
    let model = decode_model(bytes, "<bytes>")?;
    import::import(&model, None, opts)
}

#[doc(hidden)]
pub mod fuzzing {
    //! The body of the `load_onnx` fuzz target (`fuzz/`), here so that committed regression
    //! inputs replay through the same code in ordinary tests. Not part of the API.

    use ndarray::{ArrayD, IxDyn};

    /// Imports `data` as an ONNX model; one that imports must run a small input (an answer
    /// or an error, never a panic) when every value it computes is small.
    pub fn onnx_model(data: &[u8]) {
        let Ok(m) = crate::from_bytes(data, &crate::ImportOptions::default()) else { return };
        let shapes: Vec<&[usize]> = m.inputs.iter().map(|i| i.shape.as_slice()).collect();
        let Ok(infos) = m.graph.value_info(&shapes) else { return };
        if infos.iter().any(|v| v.shape.iter().product::<usize>() > 1 << 20) {
            return;
        }
        let xs: Vec<ArrayD<f32>> = m
            .inputs
            .iter()
            .map(|i| {
                let n = i.shape.iter().product();
                let v = (0..n).map(|k: usize| (k % 7) as f32 * 0.25 - 0.5).collect();
                ArrayD::from_shape_vec(IxDyn(&i.shape), v).expect("the length is the shape's")
            })
            .collect();
        let _ = m.graph.run(&xs);
    }
}
