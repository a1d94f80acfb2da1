//! `nn.Embedding` / ONNX `Gather` of a constant table by computed indices (a transformer's
//! token and position embeddings): rows of the table picked by whole-number indices, which
//! the model reads as `f32` values (token ids up to 2^24 are exact). It runs in float: its
//! output is a lookup, and the next int8 op quantizes it with its observed parameters.

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::conv::{load_f32, save_f32};
use super::{attrs, bad, parse, OpWriter};
use crate::error::{NnError, Result};
use crate::module::Module;
use crate::quant::{FloatReason, Mode};

/// Row `i` of `weight` (`[rows, ...]`) for every index `i` of the input: the output's shape
/// is the input's followed by a row's. Indices count from 0; negative ones from the end, as
/// ONNX `Gather` allows.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The table, rows along axis 0.
    pub weight: ArrayD<f32>,
}

impl Embedding {
    /// A table of `rows` rows of `dim` zeros (load the weights into it).
    pub fn new(rows: usize, dim: usize) -> Self {
        Embedding { weight: ArrayD::zeros(IxDyn(&[rows, dim])) }
    }

    fn rows(&self) -> Result<usize> {
        match self.weight.shape() {
            [r, ..] => Ok(*r),
            s => Err(NnError::Config {
                module: String::new(),
                reason: format!("Embedding: a table of shape {s:?}; it needs rows along a first axis"),
            }),
        }
    }
}

impl Module for Embedding {
    fn kind(&self) -> &'static str {
        "Embedding"
    }
    fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let rows = self.rows()?;
        let row_shape = &self.weight.shape()[1..];
        let out_shape: Vec<usize> = x.shape().iter().chain(row_shape).copied().collect();
        let width: usize = row_shape.iter().product();
        let table = self.weight.as_standard_layout();
        let table = table.as_slice().expect("standard layout");
        let mut out = crate::scratch::take_f32(x.len() * width);
        for ((k, &v), dst) in x.iter().enumerate().zip(out.chunks_exact_mut(width.max(1))) {
            let i = v as i64;
            let at = if i < 0 { i + rows as i64 } else { i };
            if v != i as f32 || at < 0 || at >= rows as i64 {
                return Err(NnError::Op {
                    module: String::new(),
                    source: qtensor::QError::Unsupported {
                        op: "Embedding",
                        reason: format!(
                            "index {v} (element {k} of an input of shape {:?}) is not a whole number in \
                             [-{rows}, {rows}) for a table of {rows} rows; pass token ids as whole numbers",
                            x.shape()
                        ),
                    },
                });
            }
            dst.copy_from_slice(&table[at as usize * width..][..width]);
        }
        Ok(ArrayD::from_shape_vec(IxDyn(&out_shape), out).expect("indices x row"))
    }
    fn output_shape(&self, input: &[usize]) -> Option<Result<Vec<usize>>> {
        Some(self.rows().map(|_| input.iter().chain(&self.weight.shape()[1..]).copied().collect()))
    }
    fn tensors(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![("weight", &self.weight)]
    }
    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![("weight", &mut self.weight)]
    }
    fn lowering(&self) -> Mode {
        Mode::Float(FloatReason::FloatOp {
            why: "a table lookup by token ids: it runs in float, and the next int8 op quantizes its rows".into(),
        })
    }
    fn computes_images_apart(&self) -> bool {
        true
    }
    fn save(&self, node: &str, w: &mut OpWriter) -> Option<Result<J>> {
        Some(Ok(attrs(&EmbeddingAttrs { weight: save_f32(node, "weight", &self.weight, w) })))
    }
    any_methods!();
}

/// An [`Embedding`] as saved.
#[derive(Serialize, Deserialize)]
struct EmbeddingAttrs {
    weight: String,
}

pub(crate) const LAYERS: &[(&str, super::LayerLoader)] = &[("Embedding", |j, r| {
    let a: EmbeddingAttrs = parse(j, "Embedding", "Embedding")?;
    let weight = load_f32(r, &a.weight)?;
    if weight.ndim() == 0 {
        return Err(bad("Embedding: a table of rank 0".into()));
    }
    Ok(Box::new(Embedding { weight }) as Box<dyn Module>)
})];

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Axis;

    #[test]
    fn picks_rows_and_refuses_bad_indices() {
        let w = ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]).unwrap();
        let e = Embedding { weight: w };
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![2.0, 0.0, -1.0, 1.0]).unwrap();
        let y = e.forward(&x).unwrap();
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(y.index_axis(Axis(0), 0).iter().copied().collect::<Vec<_>>(), vec![20.0, 21.0, 0.0, 1.0]);
        assert_eq!(y.index_axis(Axis(0), 1).iter().copied().collect::<Vec<_>>(), vec![20.0, 21.0, 10.0, 11.0]);
        for bad in [3.0, -4.0, 0.5, f32::NAN] {
            let x = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![0.0, bad]).unwrap();
            let msg = e.forward(&x).unwrap_err().to_string();
            assert!(msg.contains("element 1") && msg.contains("3 rows"), "{msg}");
        }
    }
}
