//! The `--config` file: TOML that becomes a [`QConfigMapping`].
//!
//! ```toml
//! preset = "default"          # the global configuration (see PRESETS), or "none": float unless a rule says
//! activation = "histogram"    # optional: the global preset's activation observer replaced
//! weight = "per-channel"      # optional: its weight observer replaced (or "minmax",
//!                             # "per-channel-restricted": symmetric over [-127, 127],
//!                             # "per-channel-unclipped": symmetric, the smallest scale that
//!                             # clips neither extreme of a channel, "per-channel-mse":
//!                             # symmetric, each channel's scale of least squared error)
//! strict = false              # true: converting fails instead of falling back to float
//! fusion = true
//! pool_outputs = "observed"   # or "input" (PyTorch's choice)
//! table_outputs = "auto"      # sigmoid / hard-sigmoid / tanh: "observed", "fixed" (PyTorch's grid) or auto
//! residual = "int8"           # or "float": additions a LayerNorm reads, and those LayerNorms, in float
//! bias_correction = true      # false: int8 Conv / Linear biases as they are (PyTorch's and ONNX Runtime's)
//!
//! [[rule]]                    # later rules win; names beat op types and kinds
//! name = "/features/0/*"      # a node name, a name prefix ("/layer1" matches "/layer1/..."), or a glob
//! preset = "mse"
//!
//! [[rule]]
//! op = "Gemm"                 # every node imported from this ONNX op type
//! skip = true                 # keep it in float
//!
//! [[rule]]
//! kind = "Conv2d"             # a qrust layer kind, as the report names them
//! weight = "minmax"
//!
//! [[rule]]
//! name = "/fc/Gemm"
//! bias_correction = false     # alone in a rule: the configuration stays as the other rules say
//! ```

use std::collections::HashMap;

use qnn::QConfigMapping;
use qobserve::{ObserverSpec, QConfig, QuantSpec};
use serde::Deserialize;

/// The preset names.
pub const PRESETS: &[&str] = &[
    "default",
    "x86",
    "qnnpack",
    "minmax",
    "per-channel-minmax",
    "mse",
    "percentile:<p>",
    "dynamic",
    "dynamic-per-channel",
    "dynamic-per-token",
    "dynamic-per-token-reduced",
    "none",
];

/// Activation observer names.
const ACTIVATIONS: &[&str] = &["minmax", "histogram", "entropy", "mse", "percentile:<p>"];
/// Weight observer names.
const WEIGHTS: &[&str] =
    &["minmax", "per-channel", "per-channel-restricted", "per-channel-unclipped", "per-channel-mse"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    preset: Option<String>,
    activation: Option<String>,
    weight: Option<String>,
    strict: Option<bool>,
    fusion: Option<bool>,
    pool_outputs: Option<String>,
    table_outputs: Option<String>,
    residual: Option<String>,
    bias_correction: Option<bool>,
    #[serde(default)]
    rule: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    name: Option<String>,
    op: Option<String>,
    kind: Option<String>,
    preset: Option<String>,
    activation: Option<String>,
    weight: Option<String>,
    #[serde(default)]
    skip: bool,
    bias_correction: Option<bool>,
}

fn preset(name: &str) -> Result<Option<QConfig>, String> {
    Ok(Some(match name {
        "default" => QConfig::default(),
        "x86" => QConfig::pytorch_x86(),
        "qnnpack" => QConfig::qnnpack(),
        "minmax" => QConfig::pytorch_minmax(),
        "per-channel-minmax" => QConfig::pytorch_per_channel_minmax(),
        "mse" => QConfig::mse(),
        "dynamic" => QConfig::pytorch_dynamic(),
        "dynamic-per-channel" => QConfig::pytorch_dynamic_per_channel(),
        "dynamic-per-token" => QConfig::dynamic_per_token(),
        "dynamic-per-token-reduced" => QConfig::dynamic_per_token_reduced(),
        "none" => return Ok(None),
        p => match p.strip_prefix("percentile:").and_then(|v| v.parse::<f64>().ok()) {
            Some(v) if v > 0.0 && v <= 100.0 => QConfig::percentile(v),
            _ => return Err(format!("unknown preset '{name}'; presets: {}", PRESETS.join(", "))),
        },
    }))
}

fn activation(name: &str) -> Result<ObserverSpec, String> {
    let spec = QConfig::default();
    let full = match &spec.activation {
        ObserverSpec::Histogram { spec, .. } => *spec,
        _ => unreachable!("the default activation observer is a histogram"),
    };
    Ok(match name {
        "minmax" => ObserverSpec::MinMax(full),
        "histogram" => ObserverSpec::Histogram { spec: full, bins: 2048 },
        "entropy" => ObserverSpec::Entropy(full),
        "mse" => ObserverSpec::Mse(full),
        p => match p.strip_prefix("percentile:").and_then(|v| v.parse::<f64>().ok()) {
            Some(v) if v > 0.0 && v <= 100.0 => ObserverSpec::Percentile { spec: full, percentile: v },
            _ => return Err(format!("unknown activation observer '{name}'; observers: {}", ACTIVATIONS.join(", "))),
        },
    })
}

fn weight(name: &str) -> Result<ObserverSpec, String> {
    Ok(match name {
        "minmax" => ObserverSpec::MinMax(QuantSpec::i8_symmetric()),
        "per-channel" | "per-channel-unclipped" | "per-channel-mse" => {
            ObserverSpec::PerChannelMinMax { spec: QuantSpec::i8_symmetric(), axis: 0 }
        }
        // Symmetric over [-127, 127] (ONNX Runtime's and TensorRT's restricted range): the
        // largest weight of a channel lands on a code instead of half a step past 127.
        "per-channel-restricted" => {
            let range = qnn::qtensor::QuantRange::custom(qnn::qtensor::DType::I8, -127, 127).expect("a valid range");
            ObserverSpec::PerChannelMinMax { spec: QuantSpec { range, ..QuantSpec::i8_symmetric() }, axis: 0 }
        }
        _ => return Err(format!("unknown weight observer '{name}'; observers: {}", WEIGHTS.join(", "))),
    })
}

/// A preset with observers replaced; `Ok(None)` keeps float.
fn qconfig(
    p: Option<&str>,
    a: Option<&str>,
    w: Option<&str>,
    base: Option<&QConfig>,
) -> Result<Option<QConfig>, String> {
    let mut q = match p {
        Some(p) => preset(p)?,
        None => Some(base.cloned().unwrap_or_default()),
    };
    if let Some(q) = q.as_mut() {
        if let Some(a) = a {
            q.activation = activation(a)?;
        }
        if let Some(w) = w {
            q.weight = weight(w)?;
            // The observer's parameters as they are, except for the unclipped scales (a rule
            // naming another observer drops a quantizer its base configuration had).
            q.weight_quantizer = match w {
                "per-channel-unclipped" => Some(std::sync::Arc::new(qnn::qobserve::SymmetricUnclipped)
                    as std::sync::Arc<dyn qnn::qobserve::Quantizer>),
                "per-channel-mse" => Some(std::sync::Arc::new(qnn::qobserve::SymmetricMse) as _),
                _ => None,
            };
        }
    } else if a.is_some() || w.is_some() {
        return Err("observers are given for preset 'none' (kept in float)".into());
    }
    Ok(q)
}

/// The mapping a configuration file describes. `onnx_nodes` maps each ONNX op type to the
/// graph node names imported from it (for `op` rules).
pub fn mapping(
    text: Option<(&str, &str)>,
    onnx_nodes: &HashMap<String, Vec<String>>,
) -> Result<QConfigMapping, String> {
    let (file, path) = match text {
        Some((t, path)) => (toml::from_str::<File>(t).map_err(|e| format!("{path}: {e}"))?, path),
        None => (File::default(), ""),
    };
    let at = |e: String| if path.is_empty() { e } else { format!("{path}: {e}") };
    let global =
        qconfig(file.preset.as_deref(), file.activation.as_deref(), file.weight.as_deref(), None).map_err(at)?;
    let mut m = match &global {
        Some(q) => QConfigMapping::new(q.clone()),
        None => QConfigMapping::float(),
    };
    if let Some(s) = file.strict {
        m = m.strict(s);
    }
    if let Some(f) = file.fusion {
        m = m.fusion(f);
    }
    if let Some(b) = file.bias_correction {
        m = m.bias_correction(b);
    }
    match file.pool_outputs.as_deref() {
        None | Some("observed") => {}
        Some("input") => m = m.pool_outputs(qnn::PoolOutputs::InputParams),
        Some(o) => return Err(at(format!("pool_outputs '{o}': expected 'observed' or 'input'"))),
    }
    match file.residual.as_deref() {
        None | Some("int8") => {}
        Some("float") => m = m.residual(qnn::ResidualStream::Float),
        Some(r) => return Err(at(format!("residual '{r}': expected 'int8' or 'float'"))),
    }
    match file.table_outputs.as_deref() {
        None | Some("auto") => {}
        Some("observed") => m = m.table_outputs(qnn::TableOutputs::Observed),
        Some("fixed") => m = m.table_outputs(qnn::TableOutputs::Fixed),
        Some(o) => return Err(at(format!("table_outputs '{o}': expected 'auto', 'observed' or 'fixed'"))),
    }
    for (i, r) in file.rule.iter().enumerate() {
        let which = [r.name.is_some(), r.op.is_some(), r.kind.is_some()].iter().filter(|&&b| b).count();
        if which != 1 {
            return Err(at(format!("rule {}: give exactly one of name, op and kind", i + 1)));
        }
        let q = if r.skip {
            if r.preset.is_some() || r.activation.is_some() || r.weight.is_some() {
                return Err(at(format!("rule {}: skip = true with a preset or observers", i + 1)));
            }
            None
        } else {
            qconfig(r.preset.as_deref(), r.activation.as_deref(), r.weight.as_deref(), global.as_ref())
                .map_err(|e| at(format!("rule {}: {e}", i + 1)))?
        };
        // A rule that only turns bias correction on or off leaves the configuration as it is.
        let configures =
            r.skip || r.preset.is_some() || r.activation.is_some() || r.weight.is_some() || r.bias_correction.is_none();
        let set = |m: QConfigMapping, name: &str| {
            let m = match (&q, configures) {
                (_, false) => m,
                (Some(q), true) => m.set_name(name, q.clone()),
                (None, true) => m.skip_name(name),
            };
            match r.bias_correction {
                Some(b) => m.bias_correction_name(name, b),
                None => m,
            }
        };
        if let Some(n) = &r.name {
            m = set(m, n);
        } else if let Some(op) = &r.op {
            let nodes = onnx_nodes.get(op).ok_or_else(|| {
                let mut ops: Vec<&String> = onnx_nodes.keys().collect();
                ops.sort();
                at(format!("rule {}: the model has no {op} node; its op types: {ops:?}", i + 1))
            })?;
            for n in nodes {
                m = set(m, n);
            }
        } else if let Some(k) = &r.kind {
            m = match (&q, configures) {
                (_, false) => m,
                (Some(q), true) => m.set_kind(k, q.clone()),
                (None, true) => m.skip_kind(k),
            };
            if let Some(b) = r.bias_correction {
                m = m.bias_correction_kind(k, b);
            }
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_by_name_op_and_kind() {
        let nodes: HashMap<String, Vec<String>> = [("Gemm".to_string(), vec!["/fc/Gemm".to_string()])].into();
        let text = r#"
            preset = "x86"
            [[rule]]
            op = "Gemm"
            skip = true
            [[rule]]
            name = "/layer1/*"
            preset = "mse"
            [[rule]]
            kind = "add"
            activation = "minmax"
        "#;
        let m = mapping(Some((text, "c.toml")), &nodes).unwrap();
        assert!(m.resolve("/fc/Gemm", "Linear").is_none());
        assert!(matches!(m.resolve("/layer1/0/conv1/Conv", "Conv2d").unwrap().activation, ObserverSpec::Mse(_)));
        assert!(matches!(m.resolve("/add", "add").unwrap().activation, ObserverSpec::MinMax(_)));
        assert!(matches!(m.resolve("/conv1/Conv", "Conv2d").unwrap().activation, ObserverSpec::Histogram { .. }));
    }

    #[test]
    fn biases_are_corrected_unless_asked() {
        let none = HashMap::new();
        assert!(mapping(None, &none).unwrap().corrects_bias());
        assert!(!mapping(Some(("bias_correction = false", "c.toml")), &none).unwrap().corrects_bias());
        let e = mapping(Some(("bias_correction = \"no\"", "c.toml")), &none).unwrap_err();
        assert!(e.contains("bias_correction"), "{e}");
        // Per rule: by name, op and kind; names beat kinds; such a rule keeps the configuration.
        let nodes: HashMap<String, Vec<String>> = [("Gemm".to_string(), vec!["/fc/Gemm".to_string()])].into();
        let text = r#"
            [[rule]]
            name = "/layer1"
            preset = "mse"
            [[rule]]
            kind = "Conv2d"
            bias_correction = false
            [[rule]]
            name = "/layer1/0/conv1/Conv"
            bias_correction = true
            [[rule]]
            op = "Gemm"
            bias_correction = false
        "#;
        let m = mapping(Some((text, "c.toml")), &nodes).unwrap();
        assert!(!m.corrects_bias_of("/conv1/Conv", "Conv2d") && !m.corrects_bias_of("/layer1/0/conv2/Conv", "Conv2d"));
        assert!(m.corrects_bias_of("/layer1/0/conv1/Conv", "Conv2d"));
        assert!(!m.corrects_bias_of("/fc/Gemm", "Linear") && m.corrects_bias_of("/other/Gemm", "Linear"));
        assert!(matches!(m.resolve("/layer1/0/conv1/Conv", "Conv2d").unwrap().activation, ObserverSpec::Mse(_)));
        assert!(matches!(m.resolve("/conv1/Conv", "Conv2d").unwrap().activation, ObserverSpec::Histogram { .. }));
        assert!(m.resolve("/fc/Gemm", "Linear").is_some());
    }

    #[test]
    fn the_residual_stream_is_int8_unless_asked() {
        let none = HashMap::new();
        assert_eq!(mapping(None, &none).unwrap().residual_stream(), qnn::ResidualStream::Int8);
        let m = mapping(Some(("residual = \"float\"", "c.toml")), &none).unwrap();
        assert_eq!(m.residual_stream(), qnn::ResidualStream::Float);
    }

    #[test]
    fn restricted_weights_use_127_codes_each_side() {
        let m = mapping(Some(("weight = \"per-channel-restricted\"", "c.toml")), &HashMap::new()).unwrap();
        match &m.resolve("/conv1/Conv", "Conv2d").unwrap().weight {
            ObserverSpec::PerChannelMinMax { spec, axis: 0 } => {
                assert_eq!((spec.range.qmin(), spec.range.qmax()), (-127, 127));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unclipped_weights_take_the_quantizer() {
        let m = mapping(Some(("weight = \"per-channel-unclipped\"", "c.toml")), &HashMap::new()).unwrap();
        let q = m.resolve("/conv1/Conv", "Conv2d").unwrap();
        assert!(matches!(q.weight, ObserverSpec::PerChannelMinMax { axis: 0, .. }));
        assert_eq!(q.weight_quantizer.as_ref().unwrap().name(), "symmetric without clipping");
        // A rule naming another observer drops it.
        let text = "weight = \"per-channel-unclipped\"\n[[rule]]\nname = \"/fc\"\nweight = \"per-channel\"";
        let m = mapping(Some((text, "c.toml")), &HashMap::new()).unwrap();
        assert!(m.resolve("/fc/Gemm", "Linear").unwrap().weight_quantizer.is_none());
        assert!(m.resolve("/conv1/Conv", "Conv2d").unwrap().weight_quantizer.is_some());
        let m = mapping(Some(("weight = \"per-channel-mse\"", "c.toml")), &HashMap::new()).unwrap();
        let q = m.resolve("/conv1/Conv", "Conv2d").unwrap();
        assert!(matches!(q.weight, ObserverSpec::PerChannelMinMax { axis: 0, .. }));
        assert_eq!(q.weight_quantizer.as_ref().unwrap().name(), "symmetric, least squared error");
    }

    #[test]
    fn mistakes_are_named() {
        let none = HashMap::new();
        let e = mapping(Some(("preset = \"fast\"", "c.toml")), &none).unwrap_err();
        assert!(e.contains("unknown preset 'fast'") && e.contains("per-channel-minmax"), "{e}");
        let e = mapping(Some(("[[rule]]\nop = \"Conv\"\nskip = true", "c.toml")), &none).unwrap_err();
        assert!(e.contains("no Conv node"), "{e}");
        let e = mapping(Some(("[[rule]]\nname = \"a\"\nkind = \"b\"", "c.toml")), &none).unwrap_err();
        assert!(e.contains("exactly one of"), "{e}");
        let e = mapping(Some(("presets = \"x86\"", "c.toml")), &none).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = mapping(Some(("residual = \"fp16\"", "c.toml")), &none).unwrap_err();
        assert!(e.contains("residual 'fp16'") && e.contains("'float'"), "{e}");
    }
}
