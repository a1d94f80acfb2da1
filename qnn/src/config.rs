//! Choosing, per module, whether and how it is quantized.

use qobserve::QConfig;

/// How a name pattern matches a module's full name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// The name itself, or any module below it (`layer1` matches `layer1.0.conv1`, and the ONNX
    /// node name prefix `/layer1` matches `/layer1/layer1.0/conv1/Conv`).
    Path(String),
    /// `*` matches any run of characters, dots included (`*.downsample.*`).
    Glob(String),
}

impl Pattern {
    fn parse(s: &str) -> Self {
        if s.contains('*') {
            Pattern::Glob(s.to_string())
        } else {
            Pattern::Path(s.to_string())
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            // A path and everything under it: qnn's module paths go down with '.', ONNX node
            // names with '/'.
            Pattern::Path(p) => {
                name == p
                    || name
                        .strip_prefix(p.as_str())
                        .is_some_and(|r| !r.is_empty() && (r.starts_with(['.', '/']) || p.ends_with(['.', '/'])))
            }
            Pattern::Glob(g) => glob(g.as_bytes(), name.as_bytes()),
        }
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// Which [`QConfig`] each module gets: a global one, overridden per module type
/// (`"Conv2d"`), overridden per name (exact path, path prefix, or glob with `*`); `None`
/// keeps a module in float. Later overrides of the same kind win; names beat types beat the
/// global setting.
///
/// ```
/// use qnn::QConfigMapping;
/// use qobserve::QConfig;
/// let m = QConfigMapping::new(QConfig::default())
///     .skip_name("fc2")                       // keep the classifier in float
///     .set_kind("Linear", QConfig::pytorch_x86())
///     .skip_name("*.downsample.*");
/// assert!(m.resolve("fc2", "Linear").is_none());
/// assert!(m.resolve("fc1", "Linear").is_some());
/// assert!(m.resolve("layer1.0.downsample.0", "Conv2d").is_none());
/// ```
#[derive(Clone, Debug)]
pub struct QConfigMapping {
    global: Option<QConfig>,
    kinds: Vec<(String, Option<QConfig>)>,
    names: Vec<(Pattern, Option<QConfig>)>,
    pool_outputs: PoolOutputs,
    table_outputs: TableOutputs,
    residual: ResidualStream,
    bias_correction: bool,
    /// Per-kind and per-name overrides of `bias_correction`.
    bias_kinds: Vec<(String, bool)>,
    bias_names: Vec<(Pattern, bool)>,
    fusion: bool,
    strict: bool,
}

/// How the residual stream of a transformer runs: the additions whose output a `LayerNorm`
/// reads, and those `LayerNorm`s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResidualStream {
    /// As configured, like any addition and layer: int8 where the configuration says so
    /// (qrust's default, and PyTorch's and ONNX Runtime's).
    #[default]
    Int8,
    /// In float: each such addition adds its operands in float (an int8 operand is
    /// dequantized), and the `LayerNorm` reading it normalizes the float sum; the layers
    /// after it take its output quantized on their input's observed grid, as any float
    /// module's. In int8 the stream has one scale for all tokens, and a `LayerNorm` scales
    /// each token to unit variance, so a token of small norm comes out with the error of the
    /// largest: float keeps it (ViT-B/16's class token, which its classifier reads).
    Float,
}

/// The output parameters of average pools (`AvgPool2d`, `AdaptiveAvgPool2d`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolOutputs {
    /// Observed like any layer's, and the pool requantizes to them: an average spans a
    /// narrower range than its input, and gets the full 8 bits over it (ONNX Runtime's QDQ
    /// choice; qrust's default).
    #[default]
    Observed,
    /// The input's (PyTorch's eager and FX modes): use it to reproduce PyTorch's results.
    InputParams,
}

/// The output parameters of the sigmoid, hard-sigmoid and tanh tables, whose outputs are
/// bounded (`[0, 1]`, `[-1, 1]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TableOutputs {
    /// PyTorch's fixed grid over the whole bound, unless the observed outputs span less than
    /// half of it: then the observed range, which keeps more bits (a tanh whose outputs stay
    /// within +-0.2 gains about 8 dB). qrust's default.
    #[default]
    Auto,
    /// Always the observed range, like any layer's (ONNX Runtime's QDQ choice).
    Observed,
    /// Always PyTorch's fixed grid: sigmoid and hard sigmoid `1/256` with zero point 0
    /// (`[0, 1)`), tanh `1/128` with 128 (`[-1, 1)`). Use it to reproduce PyTorch's results.
    Fixed,
}

impl QConfigMapping {
    /// Every module quantized with `global` unless overridden.
    pub fn new(global: QConfig) -> Self {
        QConfigMapping {
            global: Some(global),
            kinds: Vec::new(),
            names: Vec::new(),
            pool_outputs: PoolOutputs::default(),
            table_outputs: TableOutputs::default(),
            residual: ResidualStream::default(),
            bias_correction: true,
            bias_kinds: Vec::new(),
            bias_names: Vec::new(),
            fusion: true,
            strict: false,
        }
    }

    /// Nothing quantized unless a type or name override says so.
    pub fn float() -> Self {
        QConfigMapping { global: None, ..QConfigMapping::new(QConfig::default()) }
    }

    /// Quantize modules of this type (`"Conv2d"`, `"Linear"`, ...) with `q`.
    pub fn set_kind(mut self, kind: &str, q: QConfig) -> Self {
        self.kinds.push((kind.to_string(), Some(q)));
        self
    }

    /// How average pools choose their output parameters (default [`PoolOutputs::Observed`]).
    pub fn pool_outputs(mut self, p: PoolOutputs) -> Self {
        self.pool_outputs = p;
        self
    }

    /// See [`QConfigMapping::pool_outputs`].
    pub fn pool_output_params(&self) -> PoolOutputs {
        self.pool_outputs
    }

    /// How sigmoid, hard-sigmoid and tanh tables choose their output parameters (default
    /// [`TableOutputs::Auto`]).
    pub fn table_outputs(mut self, t: TableOutputs) -> Self {
        self.table_outputs = t;
        self
    }

    /// See [`QConfigMapping::table_outputs`].
    pub fn table_output_params(&self) -> TableOutputs {
        self.table_outputs
    }

    /// How the residual stream runs (default [`ResidualStream::Int8`]): [`ResidualStream::Float`] keeps
    /// in float each addition that a `LayerNorm` reads directly, and that `LayerNorm`; the
    /// plan gives them [`crate::FloatReason::Residual`].
    pub fn residual(mut self, r: ResidualStream) -> Self {
        self.residual = r;
        self
    }

    /// See [`QConfigMapping::residual`].
    pub fn residual_stream(&self) -> ResidualStream {
        self.residual
    }

    /// Bias correction (on by default): calibration also measures the mean of every input
    /// tap of each static int8 `Linear` and `Conv2d` (one that runs as a convolution, not as
    /// a scalar map's table; per input channel and kernel position, padding counted as
    /// zeros), and conversion subtracts from each output channel's bias the mean its rounded
    /// weights add, `sum((w_q - w) * E[x])`. Weight rounding then adds noise but no offset: torchvision's ResNets and MobileNetV2 gain 4.5-6 dB of output
    /// SQNR. The plan marks the corrected layers ([`crate::PlanEntry::bias_corrected`]).
    /// Off: the biases stay as they are, as PyTorch and ONNX Runtime leave them (use it to
    /// reproduce PyTorch's results). Dynamic layers, whose inputs are not calibrated,
    /// layers in float, and layers whose calibration saw fewer than 32 output positions (a
    /// classifier reading one row per item, calibrated on fewer than 32 items) are not
    /// corrected. Per module: [`QConfigMapping::bias_correction_kind`] and
    /// [`QConfigMapping::bias_correction_name`].
    pub fn bias_correction(mut self, on: bool) -> Self {
        self.bias_correction = on;
        self
    }

    /// Bias correction on or off for the modules of this type (`"Conv2d"`, `"Linear"`),
    /// over [`QConfigMapping::bias_correction`].
    pub fn bias_correction_kind(mut self, kind: &str, on: bool) -> Self {
        self.bias_kinds.push((kind.to_string(), on));
        self
    }

    /// Bias correction on or off for the modules matching `pattern` (as
    /// [`QConfigMapping::set_name`] matches), over the per-kind and global settings.
    pub fn bias_correction_name(mut self, pattern: &str, on: bool) -> Self {
        self.bias_names.push((Pattern::parse(pattern), on));
        self
    }

    /// See [`QConfigMapping::bias_correction`] (the global setting).
    pub fn corrects_bias(&self) -> bool {
        self.bias_correction
    }

    /// Whether module `name` of type `kind` gets its bias corrected (when it runs in static
    /// int8): the last name override that matches, else the last one for its type, else the
    /// global setting.
    pub fn corrects_bias_of(&self, name: &str, kind: &str) -> bool {
        if let Some((_, on)) = self.bias_names.iter().rev().find(|(p, _)| p.matches(name)) {
            return *on;
        }
        if let Some((_, on)) = self.bias_kinds.iter().rev().find(|(k, _)| k == kind) {
            return *on;
        }
        self.bias_correction
    }

    /// Whether [`crate::prepare`] fuses the model first ([`crate::fuse_graph`]: conv / linear +
    /// batch-norm + ReLU / ReLU6, batch-norm + ReLU, per-channel affine maps beside
    /// convolutions); on by default, so that a forgotten
    /// `fuse` costs neither speed nor accuracy. Fusing again a model you fused finds nothing
    /// more. Off: the model is taken as it is (an unfused batch-norm then runs in float, and
    /// the plan says so).
    pub fn fusion(mut self, on: bool) -> Self {
        self.fusion = on;
        self
    }

    /// See [`QConfigMapping::fusion`].
    pub fn fuses(&self) -> bool {
        self.fusion
    }

    /// Strict: [`crate::Prepared::convert`] fails when any module would run in float, listing
    /// each with its reason, instead of converting with float fallbacks (off by default).
    pub fn strict(mut self, on: bool) -> Self {
        self.strict = on;
        self
    }

    /// See [`QConfigMapping::strict`].
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Keep modules of this type in float.
    pub fn skip_kind(mut self, kind: &str) -> Self {
        self.kinds.push((kind.to_string(), None));
        self
    }

    /// Quantize the modules matching `pattern` with `q`.
    pub fn set_name(mut self, pattern: &str, q: QConfig) -> Self {
        self.names.push((Pattern::parse(pattern), Some(q)));
        self
    }

    /// Keep the modules matching `pattern` in float.
    pub fn skip_name(mut self, pattern: &str) -> Self {
        self.names.push((Pattern::parse(pattern), None));
        self
    }

    /// The configuration of module `name` of type `kind` (`None`: float).
    pub fn resolve(&self, name: &str, kind: &str) -> Option<&QConfig> {
        if let Some((_, q)) = self.names.iter().rev().find(|(p, _)| p.matches(name)) {
            return q.as_ref();
        }
        if let Some((_, q)) = self.kinds.iter().rev().find(|(k, _)| k == kind) {
            return q.as_ref();
        }
        self.global.as_ref()
    }

    /// The name patterns, for checking them against a model.
    pub(crate) fn name_patterns(&self) -> impl Iterator<Item = (&str, bool)> {
        self.names.iter().map(|(p, _)| p).chain(self.bias_names.iter().map(|(p, _)| p)).map(|p| match p {
            Pattern::Path(s) => (s.as_str(), false),
            Pattern::Glob(s) => (s.as_str(), true),
        })
    }

    /// The kinds named by [`QConfigMapping::set_kind`], [`QConfigMapping::skip_kind`] and
    /// [`QConfigMapping::bias_correction_kind`].
    pub(crate) fn kind_names(&self) -> impl Iterator<Item = &str> {
        self.kinds.iter().map(|(k, _)| k.as_str()).chain(self.bias_kinds.iter().map(|(k, _)| k.as_str()))
    }

    /// Whether any module name matches.
    pub(crate) fn pattern_matches_any(pattern: &str, glob_pattern: bool, names: &[String]) -> bool {
        let p = if glob_pattern { Pattern::Glob(pattern.into()) } else { Pattern::Path(pattern.into()) };
        names.iter().any(|n| p.matches(n))
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn paths_match_themselves_and_what_lies_below_them() {
        let p = Pattern::parse("layer1");
        assert!(p.matches("layer1") && p.matches("layer1.0.conv1"));
        assert!(!p.matches("layer10") && !p.matches("layer10.conv"));
        let onnx = Pattern::parse("/layer1");
        assert!(onnx.matches("/layer1/layer1.0/conv1/Conv") && !onnx.matches("/layer10/Conv"));
        assert!(Pattern::parse("/layer1/").matches("/layer1/Add"));
        assert!(Pattern::parse("*.conv1").matches("layer1.0.conv1"));
    }
}
