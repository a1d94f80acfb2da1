//! The error type of `qonnx`: every message names the file or the node, the op type and
//! opset, the shapes or data types, and what to do.

/// Everything that can go wrong reading an ONNX model or writing one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// A file that cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Bytes that are not an ONNX protobuf message, or a message that breaks the format's rules.
    #[error("{file} is not a readable ONNX model: {reason}")]
    Format {
        /// The file (or `<bytes>`).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// An op type we do not import.
    #[error(
        "node '{node}': op {op_type} (domain '{domain}', opset {opset}) is not supported; \
         supported ops of the default domain: {}",
        crate::import::SUPPORTED.join(", ")
    )]
    Unsupported {
        /// The node's name.
        node: String,
        /// Its op type.
        op_type: String,
        /// Its domain (`""` is `ai.onnx`).
        domain: String,
        /// The model's opset of that domain.
        opset: i64,
    },
    /// A supported op with inputs, attributes or shapes we cannot honour.
    #[error("node '{node}' ({op_type}, opset {opset}): {reason}")]
    Node {
        /// The node's name.
        node: String,
        /// Its op type.
        op_type: String,
        /// The model's opset.
        opset: i64,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A model-level problem: opsets, inputs, outputs, initializers.
    #[error("{0}")]
    Model(String),
    /// An error of the graph or the quantization workflow.
    #[error(transparent)]
    Nn(#[from] qnn::NnError),
}

/// `Result` with [`OnnxError`].
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;
