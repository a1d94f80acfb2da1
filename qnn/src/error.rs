//! The error type of `qnn`: every message names the module, the shapes and the fix.

use std::fmt::Write as _;

/// A tensor name with its shape, for load reports.
pub type NamedShape = (String, Vec<usize>);

/// Everything that can go wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NnError {
    /// A weights file that does not match the model; every problem is listed at once.
    #[error("{}", load_message(file, missing, unexpected, mismatched))]
    Load {
        /// The file.
        file: String,
        /// Parameters the model has but the file lacks (with the model's shapes).
        missing: Vec<NamedShape>,
        /// Tensors in the file the model has no parameter for (with the file's shapes).
        unexpected: Vec<NamedShape>,
        /// `(name, model shape, file shape)` where both exist but differ.
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    /// A file that is not a readable safetensors file, or a tensor of an unsupported dtype.
    #[error("reading {file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// An input of the wrong shape for a module.
    #[error("{module} ({kind}): input of shape {got:?} does not fit: {expected}")]
    Shape {
        /// Hierarchical name of the module, e.g. `layer1.0.conv1`.
        module: String,
        /// Its type, e.g. `Conv2d`.
        kind: &'static str,
        /// What the module expects, and what to do.
        expected: String,
        /// The input's shape.
        got: Vec<usize>,
    },
    /// A module name that does not exist in the model.
    #[error(
        "no module '{name}' in this model{}; modules are named by their path from the root, \
         e.g. 'layer1.0.conv1'",
        if suggestions.is_empty() { String::new() } else { format!("; did you mean {}?", suggestions.join(", ")) }
    )]
    UnknownModule {
        /// The name asked for.
        name: String,
        /// The closest existing names.
        suggestions: Vec<String>,
    },
    /// A fusion that cannot be done, with the reason.
    #[error("cannot fuse {modules:?}: {reason}")]
    Fusion {
        /// The modules named.
        modules: Vec<String>,
        /// Why, and what to do.
        reason: String,
    },
    /// Calibration or configuration problems reported by an observer.
    #[error("{0}")]
    Observe(#[from] qobserve::ObserveError),
    /// A layer whose output would exceed the model's activation limit
    /// ([`crate::QuantizedModel::set_max_activation_bytes`]).
    #[error("{module}: {reason}")]
    Limit {
        /// Hierarchical name of the module.
        module: String,
        /// The shape asked for, the limit, and how to raise it.
        reason: String,
    },
    /// A graph that is not well formed (a name used twice, a value read before it is
    /// computed, no output), built or loaded.
    #[error("graph: {reason}")]
    Graph {
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A configuration the library cannot honour for a module (never silently approximated).
    #[error("{module}: {reason}")]
    Config {
        /// Hierarchical name of the module (or tensor) it concerns.
        module: String,
        /// What cannot be honoured, and what to do instead.
        reason: String,
    },
    /// An error from a kernel or tensor operation inside a module.
    #[error("{module}: {source}")]
    Op {
        /// Hierarchical name of the module.
        module: String,
        /// The underlying error.
        source: qtensor::QError,
    },
}

fn load_message(
    file: &str,
    missing: &[NamedShape],
    unexpected: &[NamedShape],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut m = format!("weights in {file} do not match the model:");
    if !missing.is_empty() {
        let _ = write!(m, "\n  missing from the file ({}):", missing.len());
        for (n, s) in missing {
            let _ = write!(m, "\n    {n} {s:?}");
        }
    }
    if !unexpected.is_empty() {
        let _ = write!(m, "\n  in the file but not in the model ({}):", unexpected.len());
        for (n, s) in unexpected {
            let _ = write!(m, "\n    {n} {s:?}");
        }
    }
    if !mismatched.is_empty() {
        let _ = write!(m, "\n  shapes differ ({}):", mismatched.len());
        for (n, want, got) in mismatched {
            let _ = write!(m, "\n    {n}: model {want:?}, file {got:?}");
        }
    }
    m.push_str(
        "\n  check that the file was saved from the same architecture (torch.save(model.state_dict()) \
         then safetensors), and that module names match (e.g. a `model.` prefix from a wrapper)",
    );
    m
}

/// Result with [`NnError`].
pub type Result<T, E = NnError> = std::result::Result<T, E>;

impl NnError {
    /// Prefixes the module path (`parent` + `.` + the module's own name) in errors that carry one.
    pub(crate) fn within(mut self, parent: &str) -> Self {
        if let NnError::Shape { module, .. } | NnError::Op { module, .. } | NnError::Limit { module, .. } = &mut self {
            *module = if module.is_empty() { parent.to_string() } else { format!("{parent}.{module}") };
        }
        self
    }
}
