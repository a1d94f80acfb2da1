//! PyTorch `state_dict`s as safetensors: loading them into a model, and writing a model's
//! parameters in the same form.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{NnError, Result};
use crate::module::{join, Module};

/// Every parameter of the tree with its full name and shape.
pub fn parameter_shapes(m: &dyn Module) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    collect(m, "", &mut out, &mut Vec::new());
    out
}

fn collect(m: &dyn Module, prefix: &str, out: &mut Vec<(String, Vec<usize>)>, ignored: &mut Vec<String>) {
    for (name, t) in m.tensors() {
        out.push((join(prefix, name), t.shape().to_vec()));
    }
    for name in m.ignored_tensors() {
        ignored.push(join(prefix, name));
    }
    for (name, child) in m.children() {
        collect(child, &join(prefix, name), out, ignored);
    }
}

fn assign(m: &mut dyn Module, prefix: &str, values: &mut BTreeMap<String, ArrayD<f32>>) {
    for (name, t) in m.tensors_mut() {
        if let Some(v) = values.remove(&join(prefix, name)) {
            *t = v;
        }
    }
    for (name, child) in m.children_mut() {
        let p = join(prefix, name);
        assign(child, &p, values);
    }
}

/// Loads the weights of `model` from a safetensors file written from a PyTorch `state_dict`
/// (`safetensors.torch.save_file(model.state_dict(), path)`): every parameter must be present
/// with its shape, and every tensor in the file must belong to the model (or be a buffer it
/// accepts and ignores, like `num_batches_tracked`).
///
/// Nothing is changed unless everything matches.
///
/// # Errors
/// [`NnError::Load`] listing every missing, unexpected and mis-shaped tensor at once;
/// [`NnError::File`] for an unreadable file or a parameter stored in a dtype other than f32.
pub fn load_safetensors(model: &mut dyn Module, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| NnError::File { file: file.clone(), reason: e.to_string() })?;
    load_safetensors_bytes(model, &bytes, &file)
}

/// [`load_safetensors`] from bytes in memory; `name` is used in messages.
///
/// # Errors
/// As [`load_safetensors`].
pub fn load_safetensors_bytes(model: &mut dyn Module, bytes: &[u8], name: &str) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| NnError::File {
        file: name.to_string(),
        reason: format!("not a valid safetensors file ({e}); write it with safetensors.torch.save_file"),
    })?;
    let mut params = Vec::new();
    let mut ignored = Vec::new();
    collect(model, "", &mut params, &mut ignored);
    let (mut missing, mut mismatched) = (Vec::new(), Vec::new());
    let mut values = BTreeMap::new();
    for (pname, shape) in &params {
        match st.tensor(pname) {
            Err(_) => missing.push((pname.clone(), shape.clone())),
            Ok(t) if t.shape() != shape.as_slice() => {
                mismatched.push((pname.clone(), shape.clone(), t.shape().to_vec()))
            }
            Ok(t) if t.dtype() != Dtype::F32 => {
                return Err(NnError::File {
                    file: name.to_string(),
                    reason: format!(
                        "{pname} is stored as {:?}; parameters must be float32 (convert with .float())",
                        t.dtype()
                    ),
                })
            }
            Ok(t) => {
                let data: Vec<f32> =
                    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                values.insert(pname.clone(), ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape checked"));
            }
        }
    }
    let known: std::collections::HashSet<&str> =
        params.iter().map(|(n, _)| n.as_str()).chain(ignored.iter().map(String::as_str)).collect();
    let mut unexpected: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !known.contains(n.as_str()))
        .map(|(n, t)| (n, t.shape().to_vec()))
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        return Err(NnError::Load { file: name.to_string(), missing, unexpected, mismatched });
    }
    assign(model, "", &mut values);
    Ok(())
}

/// The model's parameters as a safetensors `state_dict` with PyTorch's names, in memory: what
/// [`save_safetensors`] writes.
///
/// # Errors
/// [`NnError::File`] when two parameters would share a name (two children with one name).
pub fn state_dict_bytes(model: &dyn Module) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, &ArrayD<f32>)> = Vec::new();
    fn gather<'a>(m: &'a dyn Module, prefix: &str, out: &mut Vec<(String, &'a ArrayD<f32>)>) {
        for (name, t) in m.tensors() {
            out.push((join(prefix, name), t));
        }
        for (name, child) in m.children() {
            gather(child, &join(prefix, name), out);
        }
    }
    gather(model, "", &mut tensors);
    let mut seen = std::collections::HashSet::new();
    if let Some((dup, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
        return Err(NnError::File {
            file: String::new(),
            reason: format!("two parameters would be named '{dup}': give every child module a unique name"),
        });
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| NnError::File { file: String::new(), reason: format!("building the file: {e}") })?;
    safetensors::serialize(views, None).map_err(|e| NnError::File { file: String::new(), reason: e.to_string() })
}

/// Writes the model's parameters (and batch-norm statistics) as a safetensors `state_dict`
/// under PyTorch's names, which `model.load_state_dict(safetensors.torch.load_file(path),
/// strict=False)` takes in PyTorch (`num_batches_tracked`, which the model does not keep, is
/// the only key it reports missing), and [`load_safetensors`] loads back unchanged.
///
/// # Errors
/// As [`state_dict_bytes`], or [`NnError::File`] when the file cannot be written.
pub fn save_safetensors(model: &dyn Module, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = state_dict_bytes(model)?;
    std::fs::write(path, bytes).map_err(|e| NnError::File { file: path.display().to_string(), reason: e.to_string() })
}
