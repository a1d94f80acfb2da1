//! Saving and loading converted models: one safetensors file holding the int8 weights,
//! scales, biases and lookup tables as tensors, and the model's graph as JSON in the file's
//! metadata (`qrust.model`): values, inputs, outputs, and per node its name, input and output
//! values, input parameters, op name and the op's attributes as its file in [`crate::ops`]
//! serializes them. Calibration happens once; loading re-packs the weights for the CPU it
//! runs on. Every malformed input is an error, never a panic.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::error::{NnError, Result};
use crate::graph::{check, Graph, Node, NodeOp, Tensor};
use crate::ops::{bad, load_op, OpReader, OpWriter, SavedQ};
use crate::quant::{FloatReason, Mode, PlanEntry, QStep, QuantizedModel};

/// The format this version writes and reads: the int8 graph.
const FORMAT: &str = "qrust-graph-v1";
/// The tree format of earlier versions, recognised to say so.
const TREE_FORMAT: &str = "qrust-int8-v1";

/// One node as saved.
#[derive(Serialize, Deserialize)]
struct SavedNode {
    name: String,
    inputs: Vec<usize>,
    output: usize,
    in_q: SavedQ,
    /// The op's registered name.
    op: String,
    /// The op's attributes.
    attrs: J,
}

/// One plan entry as saved.
#[derive(Serialize, Deserialize)]
struct SavedPlan {
    name: String,
    kind: String,
    /// `"int8"`, `"int8-same"`, `"pass"` or `"float"`.
    mode: String,
    /// Why it runs in float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<SavedReason>,
    /// Whether conversion corrected its bias.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    bias_corrected: bool,
}

/// A float reason as saved: the enum, or the text files written before it existed carry.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SavedReason {
    Reason(FloatReason),
    Text(String),
}

/// The model as saved.
#[derive(Serialize, Deserialize)]
struct SavedGraph {
    format: String,
    values: usize,
    inputs: Vec<usize>,
    /// The inputs' names.
    input_names: Vec<String>,
    outputs: Vec<usize>,
    input_q: Vec<SavedQ>,
    /// Per input, the custom integer range its codes are clamped to.
    input_ranges: Vec<Option<[u8; 2]>>,
    /// The one batch size the model takes, if it takes no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    plan: Vec<SavedPlan>,
    nodes: Vec<SavedNode>,
}

fn saved_plan(e: &PlanEntry) -> SavedPlan {
    let (mode, reason) = match &e.mode {
        Mode::Int8 => ("int8", None),
        Mode::Int8SameParams => ("int8-same", None),
        Mode::Passthrough => ("pass", None),
        Mode::Dynamic => ("dynamic", None),
        Mode::Float(why) => ("float", Some(SavedReason::Reason(why.clone()))),
    };
    SavedPlan {
        name: e.name.clone(),
        kind: e.kind.to_string(),
        mode: mode.into(),
        reason,
        bias_corrected: e.bias_corrected,
    }
}

fn plan_entry(e: SavedPlan) -> Result<PlanEntry> {
    let kind = crate::ops::static_kind(&e.kind).unwrap_or("Module");
    let mode = match (e.mode.as_str(), e.reason) {
        ("int8", _) => Mode::Int8,
        ("int8-same", _) => Mode::Int8SameParams,
        ("pass", _) => Mode::Passthrough,
        ("dynamic", _) => Mode::Dynamic,
        ("float", Some(SavedReason::Reason(why))) => Mode::Float(why),
        ("float", Some(SavedReason::Text(why))) => Mode::Float(FloatReason::FloatOp { why }),
        ("float", None) => Mode::Float(FloatReason::FloatOp { why: "(no reason saved)".into() }),
        (other, _) => return Err(bad(format!("{}: unknown mode '{other}'", e.name))),
    };
    Ok(PlanEntry { name: e.name, kind, mode, bias_corrected: e.bias_corrected })
}

impl QuantizedModel {
    /// Writes the converted model to `path` (safetensors: tensors plus the structure as JSON
    /// metadata), so it can be loaded without calibrating again.
    ///
    /// # Errors
    /// A module that cannot be stored (a custom layer), or an I/O error.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes)
            .map_err(|e| NnError::File { file: path.display().to_string(), reason: e.to_string() })
    }

    /// The saved form, in memory.
    ///
    /// # Errors
    /// As [`QuantizedModel::save`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = OpWriter::default();
        let g = &self.graph;
        let mut nodes = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let NodeOp::Layer(step) = &n.op else { unreachable!("int8 graphs hold steps") };
            nodes.push(SavedNode {
                name: n.name.clone(),
                inputs: n.inputs.iter().map(|t| t.0).collect(),
                output: n.output.0,
                in_q: step.in_q.into(),
                op: step.op.op_name().to_string(),
                attrs: step.op.save(&n.name, &mut w)?,
            });
        }
        let desc = SavedGraph {
            format: FORMAT.into(),
            values: g.values,
            inputs: g.inputs.iter().map(|t| t.0).collect(),
            input_names: g.input_names.clone(),
            outputs: g.outputs.iter().map(|t| t.0).collect(),
            input_q: self.input_q.iter().map(|&q| q.into()).collect(),
            input_ranges: self.input_ranges.clone(),
            batch: g.batch,
            plan: self.plan.iter().map(saved_plan).collect(),
            nodes,
        };
        let desc = serde_json::to_string(&desc).expect("the saved graph serializes");
        let mut keys = std::collections::HashSet::new();
        if let Some((dup, ..)) = w.tensors.iter().find(|t| !keys.insert(t.0.as_str())) {
            return Err(NnError::File {
                file: String::new(),
                reason: format!("two tensors would be named '{dup}': give every module a unique name"),
            });
        }
        let views: Vec<(String, TensorView<'_>)> = w
            .tensors
            .iter()
            .map(|(k, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (k.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| NnError::File { file: String::new(), reason: format!("building the file: {e}") })?;
        let meta: HashMap<String, String> = [("qrust.model".to_string(), desc)].into();
        safetensors::serialize(views, Some(meta))
            .map_err(|e| NnError::File { file: String::new(), reason: e.to_string() })
    }

    /// Loads a model written by [`QuantizedModel::save`].
    ///
    /// # Errors
    /// [`NnError::File`] naming what is wrong for a file that is not one, is truncated or
    /// inconsistent.
    pub fn load(path: impl AsRef<Path>) -> Result<QuantizedModel> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| NnError::File { file: file.clone(), reason: e.to_string() })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            NnError::File { reason, .. } => NnError::File { file, reason },
            other => other,
        })
    }

    /// [`QuantizedModel::load`] from bytes.
    ///
    /// # Errors
    /// As [`QuantizedModel::load`].
    pub fn from_bytes(bytes: &[u8]) -> Result<QuantizedModel> {
        let bad = |reason: String| NnError::File { file: "(bytes)".into(), reason };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let desc = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("qrust.model"))
            .ok_or_else(|| bad("no qrust.model metadata: not a model saved by QuantizedModel::save".into()))?;
        let desc: J = serde_json::from_str(desc).map_err(|e| bad(format!("model description is not JSON: {e}")))?;
        if desc["format"] == TREE_FORMAT {
            return Err(bad(format!(
                "this model was saved in the format {TREE_FORMAT} (a tree of modules) by an earlier version, which \
                 this one no longer reads: convert the float model again and save it ({FORMAT})"
            )));
        }
        if desc["format"] != FORMAT {
            return Err(bad(format!("format {} is not {FORMAT}", desc["format"])));
        }
        let desc: SavedGraph = serde_json::from_value(desc)
            .map_err(|e| bad(format!("the model description does not fit {FORMAT}: {e}")))?;
        let r = OpReader { st: &st };
        let ids = |v: Vec<usize>| v.into_iter().map(Tensor).collect::<Vec<_>>();
        let (inputs, outputs) = (ids(desc.inputs), ids(desc.outputs));
        let input_q: Vec<_> = desc.input_q.into_iter().map(|q| q.0).collect();
        if input_q.len() != inputs.len()
            || desc.input_names.len() != inputs.len()
            || desc.input_ranges.len() != inputs.len()
            || desc.input_ranges.iter().flatten().any(|[lo, hi]| lo > hi)
        {
            return Err(bad(format!(
                "{} input parameters, {} input names and {} input ranges for {} inputs (or an empty range)",
                input_q.len(),
                desc.input_names.len(),
                desc.input_ranges.len(),
                inputs.len()
            )));
        }
        let mut nodes = Vec::with_capacity(desc.nodes.len());
        for n in desc.nodes {
            let op = load_op(&n.op, &n.attrs, &r, &n.name)?;
            if !op.takes_inputs(n.inputs.len()) {
                return Err(bad(format!("{}: {} inputs do not fit its {} op", n.name, n.inputs.len(), n.op)));
            }
            let step = QStep { in_q: n.in_q.0, op };
            nodes.push(Node { name: n.name, op: NodeOp::Layer(step), inputs: ids(n.inputs), output: Tensor(n.output) });
        }
        // Every value is a graph input or one node's output: their count is bounded by the
        // file's own size.
        let values = desc.values;
        if values != inputs.len() + nodes.len() {
            return Err(bad(format!(
                "{values} values for {} inputs and {} nodes: every value is an input or one node's output",
                inputs.len(),
                nodes.len()
            )));
        }
        check(values, &nodes, &inputs, &outputs).map_err(|e| bad(e.to_string()))?;
        let plan = desc.plan.into_iter().map(plan_entry).collect::<Result<Vec<_>>>()?;
        if plan.len() != nodes.len() || plan.iter().zip(&nodes).any(|(e, n)| e.name != n.name) {
            return Err(bad("the plan does not list the nodes, in order".into()));
        }
        let input_names = desc.input_names;
        if desc.batch == Some(0) {
            return Err(bad("a fixed batch of 0 items".into()));
        }
        let graph = Graph { values, nodes, inputs, outputs, input_names, batch: desc.batch, float: Default::default() };
        Ok(QuantizedModel::assemble(input_q, desc.input_ranges, graph, plan))
    }
}
