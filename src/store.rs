//! Model directories: `model.json` (architecture, ranges, provenance) next
//! to `model.safetensors` (the tensors). The schema is in `docs/MODEL_FORMAT.md`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::fsio;
use crate::model::{BatchNorm, Conv1d, Conv2d, Elman, Layer, Linear, Network, Pool, Range, Residual};
use crate::nonneg::{
    AffineOp, NonnegActivation, NonnegAffine, NonnegElman, NonnegLayer, NonnegNetwork, NonnegResidual,
};

/// The `format` tag of every `model.json`.
pub const FORMAT: &str = "isonn-model";
/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// File name of the architecture description.
pub const MODEL_JSON: &str = "model.json";
/// File name of the tensors.
pub const MODEL_TENSORS: &str = "model.safetensors";

/// A model of either kind.
#[derive(Debug, Clone)]
pub enum Model {
    /// A regular network with signed parameters.
    Regular(Network),
    /// A non-negative isomorphic network.
    Nonneg(NonnegNetwork),
}

impl Model {
    /// Computes logits for a batch of true inputs.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Model::Regular(n) => n.forward(x),
            Model::Nonneg(n) => n.forward(x),
        }
    }

    /// Returns the shape of one input sample.
    pub fn input_shape(&self) -> &[usize] {
        match self {
            Model::Regular(n) => &n.input_shape,
            Model::Nonneg(n) => &n.input_shape,
        }
    }

    /// `"regular"` or `"nonneg"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Model::Regular(_) => "regular",
            Model::Nonneg(_) => "nonneg",
        }
    }

    /// Returns the parameters' data type.
    pub fn dtype(&self) -> DType {
        match self {
            Model::Regular(n) => n.dtype(),
            Model::Nonneg(n) => n.dtype(),
        }
    }
}

/// The contents of `model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModelFile {
    format: String,
    schema_version: u32,
    kind: String,
    input: InputSpec,
    layers: Vec<LayerSpec>,
    #[serde(default)]
    output_offset: f64,
    #[serde(default)]
    provenance: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InputSpec {
    shape: Vec<usize>,
    range: Range,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    channel_ranges: Vec<Range>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConvSpec {
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pad_value: Vec<f64>,
}

/// Settings of a 1-D convolution, as PyTorch's `Conv1d`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Conv1dSpec {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pad_value: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NonnegSpec {
    lo: Vec<f64>,
    alpha: Vec<f64>,
    shift: f64,
    out_max: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pad: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum LayerSpec {
    Linear {
        in_features: usize,
        out_features: usize,
    },
    Conv2d(ConvSpec),
    Conv1d(Conv1dSpec),
    Activation {
        activation: Activation,
    },
    AvgPool2d {
        #[serde(flatten)]
        pool: Pool,
        /// Physical padding value of a non-negative pool, per channel.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pad: Vec<f64>,
    },
    MaxPool2d(Pool),
    Flatten,
    BatchNorm {
        channels: usize,
        eps: f64,
        momentum: f64,
    },
    Residual {
        main: Vec<LayerSpec>,
        shortcut: Vec<LayerSpec>,
    },
    Elman {
        features: usize,
        hidden: usize,
        activation: Activation,
    },
    GlobalAvgPool,
    AdaptiveAvgPool2d {
        size: [usize; 2],
    },
    Dropout {
        p: f64,
    },
    NonnegElman {
        features: usize,
        hidden: usize,
        activation: Activation,
        #[serde(flatten)]
        nonneg: NonnegSpec,
        input_offset: f64,
        output_offset: f64,
        initial_state: f64,
    },
    NonnegLinear {
        in_features: usize,
        out_features: usize,
        #[serde(flatten)]
        nonneg: NonnegSpec,
    },
    NonnegConv2d {
        #[serde(flatten)]
        conv: ConvSpec,
        #[serde(flatten)]
        nonneg: NonnegSpec,
    },
    NonnegConv1d {
        #[serde(flatten)]
        conv: Conv1dSpec,
        #[serde(flatten)]
        nonneg: NonnegSpec,
    },
    NonnegActivation {
        activation: Activation,
        input_offset: f64,
        output_offset: f64,
    },
}

/// Fields that a layer description may give but that are not written back
/// when empty, so a round trip through [`LayerSpec`] drops them.
const OMITTED_WHEN_EMPTY: [&str; 2] = ["pad_value", "pad"];

/// Finds the fields of the layer descriptions in `layers` (named
/// `{prefix}.{i}`) that no layer type reads, one message each. serde ignores
/// such fields, and `deny_unknown_fields` cannot be used on `LayerSpec`
/// because its variants flatten shared settings, so the check compares
/// each description with its own round trip. Descriptions that do not
/// parse are skipped: loading them reports the error.
pub(crate) fn unknown_layer_fields(layers: &[serde_json::Value], prefix: &str) -> Vec<String> {
    let mut messages = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        let Some(object) = layer.as_object() else {
            continue;
        };
        let Ok(spec) = serde_json::from_value::<LayerSpec>(layer.clone()) else {
            continue;
        };
        let known = serde_json::to_value(&spec).expect("a LayerSpec serialises");
        let kind = object.get("type").and_then(serde_json::Value::as_str).unwrap_or_default();
        for key in object.keys() {
            if known.get(key).is_none() && !OMITTED_WHEN_EMPTY.contains(&key.as_str()) {
                let fields: Vec<&str> = known
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                messages.push(format!(
                    "layer {path} ({kind}): unknown field \"{key}\"; a {kind} layer takes {}",
                    fields.join(", ")
                ));
            }
        }
        for branch in ["main", "shortcut"] {
            if let Some(serde_json::Value::Array(inner)) = object.get(branch) {
                messages.extend(unknown_layer_fields(inner, &format!("{path}.{branch}")));
            }
        }
    }
    messages
}

fn conv_spec(weight: &Tensor, stride: usize, padding: usize, dilation: usize, groups: usize) -> ConvSpec {
    let d = weight.dims();
    ConvSpec {
        in_channels: d[1] * groups,
        out_channels: d[0],
        kernel: [d[2], d[3]],
        stride,
        padding,
        dilation,
        groups,
        pad_value: Vec::new(),
    }
}

fn conv1d_spec(weight: &Tensor, stride: usize, padding: usize, dilation: usize, groups: usize) -> Conv1dSpec {
    let d = weight.dims();
    Conv1dSpec {
        in_channels: d[1] * groups,
        out_channels: d[0],
        kernel: d[2],
        stride,
        padding,
        dilation,
        groups,
        pad_value: Vec::new(),
    }
}

/// Writes `model` and `provenance` to `dir` (created if missing): the
/// tensors first, then `model.json`, each atomically.
pub fn save(dir: &Path, model: &Model, provenance: &serde_json::Value) -> Result<()> {
    fsio::create_dir_all(dir)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let (kind, input_shape, input_range, channel_ranges, layers, output_offset) = match model {
        Model::Regular(n) => {
            let layers = regular_specs(&n.layers, "layers", &mut tensors);
            ("regular", &n.input_shape, n.input_range, &n.channel_ranges, layers, 0.0)
        }
        Model::Nonneg(n) => {
            let layers = nonneg_specs(&n.layers, "layers", &mut tensors);
            ("nonneg", &n.input_shape, n.input_range, &n.channel_ranges, layers, n.output_offset)
        }
    };
    let file = ModelFile {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        kind: kind.into(),
        input: InputSpec {
            shape: input_shape.clone(),
            range: input_range,
            channel_ranges: channel_ranges.clone(),
        },
        layers,
        output_offset,
        provenance: provenance.clone(),
    };

    let tensor_path = dir.join(MODEL_TENSORS);
    for (name, tensor) in &tensors {
        check_finite(tensor, name, &tensor_path)?;
    }
    let bytes = serialize_tensors(&tensors, None, &tensor_path)?;
    fsio::write_atomic(&tensor_path, &bytes)?;
    fsio::write_json_atomic(&dir.join(MODEL_JSON), &file)
}

/// Describes regular layers, appending their tensors as `{prefix}.{i}.{name}`.
fn regular_specs(layers: &[Layer], prefix: &str, tensors: &mut Vec<(String, Tensor)>) -> Vec<LayerSpec> {
    let mut specs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        specs.push(match layer {
            Layer::Linear(l) => LayerSpec::Linear {
                in_features: l.in_features(),
                out_features: l.out_features(),
            },
            Layer::Conv2d(c) => LayerSpec::Conv2d(ConvSpec {
                pad_value: c.pad_value.clone(),
                ..conv_spec(&c.weight, c.stride, c.padding, c.dilation, c.groups)
            }),
            Layer::Conv1d(c) => LayerSpec::Conv1d(Conv1dSpec {
                pad_value: c.pad_value.clone(),
                ..conv1d_spec(&c.weight, c.stride, c.padding, c.dilation, c.groups)
            }),
            Layer::Activation(a) => LayerSpec::Activation { activation: a.clone() },
            Layer::AvgPool2d(p) => LayerSpec::AvgPool2d {
                pool: *p,
                pad: Vec::new(),
            },
            Layer::MaxPool2d(p) => LayerSpec::MaxPool2d(*p),
            Layer::Flatten => LayerSpec::Flatten,
            Layer::BatchNorm(bn) => {
                let (mean, var) = bn.running_stats();
                tensors.push((format!("{path}.running_mean"), mean));
                tensors.push((format!("{path}.running_var"), var));
                LayerSpec::BatchNorm {
                    channels: bn.channels(),
                    eps: bn.eps,
                    momentum: bn.momentum,
                }
            }
            Layer::Residual(r) => LayerSpec::Residual {
                main: regular_specs(&r.main, &format!("{path}.main"), tensors),
                shortcut: regular_specs(&r.shortcut, &format!("{path}.shortcut"), tensors),
            },
            Layer::Elman(e) => LayerSpec::Elman {
                features: e.features(),
                hidden: e.hidden(),
                activation: e.activation.clone(),
            },
            Layer::GlobalAvgPool => LayerSpec::GlobalAvgPool,
            Layer::AdaptiveAvgPool2d(size) => LayerSpec::AdaptiveAvgPool2d { size: *size },
            Layer::Dropout(p) => LayerSpec::Dropout { p: *p },
        });
        let mut copy = layer.clone();
        for (name, t) in copy.parameters_mut() {
            tensors.push((format!("{path}.{name}"), t.clone()));
        }
    }
    specs
}

fn nonneg_spec(a: &NonnegAffine) -> NonnegSpec {
    NonnegSpec {
        lo: a.lo.clone(),
        alpha: a.alpha.clone(),
        shift: a.shift,
        out_max: a.out_max,
        pad: a.pad.clone(),
    }
}

fn push_affine_tensors(a: &NonnegAffine, path: &str, tensors: &mut Vec<(String, Tensor)>) {
    for (name, t) in ["positive", "negative", "bias"].iter().zip(a.parameters()) {
        tensors.push((format!("{path}.{name}"), t.clone()));
    }
}

/// Describes non-negative layers, appending their tensors.
fn nonneg_specs(layers: &[NonnegLayer], prefix: &str, tensors: &mut Vec<(String, Tensor)>) -> Vec<LayerSpec> {
    let mut specs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        specs.push(match layer {
            NonnegLayer::Affine(a) => {
                push_affine_tensors(a, &path, tensors);
                match a.op {
                    AffineOp::Linear => LayerSpec::NonnegLinear {
                        in_features: a.positive.dims()[1],
                        out_features: a.positive.dims()[0],
                        nonneg: nonneg_spec(a),
                    },
                    AffineOp::Conv2d {
                        stride,
                        padding,
                        dilation,
                        groups,
                    } => LayerSpec::NonnegConv2d {
                        conv: conv_spec(&a.positive, stride, padding, dilation, groups),
                        nonneg: nonneg_spec(a),
                    },
                    AffineOp::Conv1d {
                        stride,
                        padding,
                        dilation,
                        groups,
                    } => LayerSpec::NonnegConv1d {
                        conv: conv1d_spec(&a.positive, stride, padding, dilation, groups),
                        nonneg: nonneg_spec(a),
                    },
                }
            }
            NonnegLayer::Activation(a) => LayerSpec::NonnegActivation {
                activation: a.activation.clone(),
                input_offset: a.input_offset,
                output_offset: a.output_offset,
            },
            NonnegLayer::AvgPool2d(p) => LayerSpec::AvgPool2d {
                pool: *p,
                pad: Vec::new(),
            },
            NonnegLayer::PaddedAvgPool2d { pool, pad } => LayerSpec::AvgPool2d {
                pool: *pool,
                pad: pad.clone(),
            },
            NonnegLayer::MaxPool2d(p) => LayerSpec::MaxPool2d(*p),
            NonnegLayer::Flatten => LayerSpec::Flatten,
            NonnegLayer::Residual(r) => LayerSpec::Residual {
                main: nonneg_specs(&r.main, &format!("{path}.main"), tensors),
                shortcut: nonneg_specs(&r.shortcut, &format!("{path}.shortcut"), tensors),
            },
            NonnegLayer::Elman(e) => {
                push_affine_tensors(&e.affine, &format!("{path}.affine"), tensors);
                LayerSpec::NonnegElman {
                    features: e.features(),
                    hidden: e.hidden(),
                    activation: e.activation.activation.clone(),
                    nonneg: nonneg_spec(&e.affine),
                    input_offset: e.activation.input_offset,
                    output_offset: e.activation.output_offset,
                    initial_state: e.initial_state,
                }
            }
            NonnegLayer::GlobalAvgPool => LayerSpec::GlobalAvgPool,
            NonnegLayer::AdaptiveAvgPool2d(size) => LayerSpec::AdaptiveAvgPool2d { size: *size },
            NonnegLayer::Dropout(p) => LayerSpec::Dropout { p: *p },
        });
    }
    specs
}

/// Largest `model.json` that [`load`] reads.
pub const MAX_MODEL_JSON_BYTES: u64 = 64 << 20;
/// Largest `model.safetensors` that [`load`] reads, 16 GiB.
pub const MAX_TENSOR_BYTES: u64 = 16 << 30;

/// Serialises named tensors, with optional string metadata, to the bytes of
/// a safetensors file. `path` is the file named in errors.
pub fn serialize_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<Vec<u8>> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, metadata).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("cannot serialise tensors: {e}"),
    })
}

/// Rejects a tensor with a NaN or infinite entry, naming it.
pub fn check_finite(tensor: &Tensor, name: &str, path: &Path) -> Result<()> {
    let values = tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!(
                "tensor {name} contains a non-finite value ({} at flat index {index}); \
                 a model with NaN or infinite parameters cannot be used",
                values[index]
            ),
        });
    }
    Ok(())
}

/// Parses the bytes of a safetensors file into named f32 or f64 tensors.
///
/// The safetensors crate checks the header length and every tensor's byte
/// range against the buffer before anything is allocated, so the largest
/// allocation is the size of `bytes`.
pub fn parse_tensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("cannot read tensors ({e}); the file is damaged or not safetensors"),
    })?;
    for (name, t) in &tensors {
        if !matches!(t.dtype(), DType::F32 | DType::F64) {
            return Err(Error::Model {
                path: path.to_path_buf(),
                message: format!("tensor {name} has type {:?}; only f32 and f64 are supported", t.dtype()),
            });
        }
    }
    Ok(tensors)
}

/// Reads a model directory written by [`save`], validating the schema,
/// every tensor's presence, shape and finiteness, and the layer shapes.
pub fn load(dir: &Path) -> Result<(Model, serde_json::Value)> {
    let json_path = dir.join(MODEL_JSON);
    if !dir.is_dir() {
        return Err(Error::Model {
            path: dir.to_path_buf(),
            message: "not a directory; pass a model directory written by `isonn train` or `isonn transform`".into(),
        });
    }
    if !json_path.exists() {
        return Err(Error::Model {
            path: dir.to_path_buf(),
            message: format!(
                "no {MODEL_JSON} in this directory; pass a model directory written by \
                 `isonn train` or `isonn transform`"
            ),
        });
    }
    let text = fsio::read_capped(&json_path, MAX_MODEL_JSON_BYTES, MODEL_JSON)?;
    let tensor_path = dir.join(MODEL_TENSORS);
    let bytes = fsio::read_capped(&tensor_path, MAX_TENSOR_BYTES, MODEL_TENSORS)?;
    load_bytes(&text, &json_path, &bytes, &tensor_path)
}

/// Parses a model from the bytes of its `model.json` and its
/// `model.safetensors`; the paths are the files named in errors.
pub fn load_bytes(
    text: &[u8],
    json_path: &Path,
    bytes: &[u8],
    tensor_path: &Path,
) -> Result<(Model, serde_json::Value)> {
    let bad = |message: String| Error::Model {
        path: json_path.to_path_buf(),
        message,
    };
    let value: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
        bad(format!("invalid JSON ({e}); the file is truncated or damaged, so write the model again"))
    })?;
    if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
        return Err(bad(format!("not an isonn model (the \"format\" field is not \"{FORMAT}\")")));
    }
    match value.get("schema_version").and_then(|v| v.as_u64()) {
        Some(v) if v == SCHEMA_VERSION as u64 => {}
        Some(v) => {
            return Err(bad(format!(
                "schema_version {v}, but this isonn {} reads schema_version {SCHEMA_VERSION}; \
                 use the isonn version that wrote it, or re-create the model with this one",
                env!("CARGO_PKG_VERSION")
            )))
        }
        None => return Err(bad("missing integer field \"schema_version\"".into())),
    }
    let file: ModelFile =
        serde_json::from_value(value).map_err(|e| bad(format!("invalid model description: {e}")))?;
    if file.input.shape.len() != 3 || file.input.shape.iter().any(|&d| d == 0 || d > 1 << 16) {
        return Err(bad(format!(
            "input shape {:?} is not [channels, height, width] with sizes in 1..=65536",
            file.input.shape
        )));
    }
    Range::new(file.input.range.lo, file.input.range.hi).map_err(|e| bad(format!("input range: {e}")))?;

    let input_shape = file.input.shape.clone();
    crate::model::check_channel_ranges(file.input.range, &file.input.channel_ranges, &input_shape)
        .map_err(|m| bad(format!("input: {m}")))?;

    let mut loader = Loader {
        tensors: parse_tensors(bytes, tensor_path)?,
        json_path,
        tensor_path,
    };
    let model = match file.kind.as_str() {
        "regular" => {
            let layers = loader.regular_layers(&file.layers, "layers")?;
            let mut network = Network::new(&input_shape, file.input.range, layers);
            network.channel_ranges = file.input.channel_ranges.clone();
            network.output_shape().map_err(|e| bad(e.to_string()))?;
            Model::Regular(network)
        }
        "nonneg" => {
            let layers = loader.nonneg_layers(&file.layers, "layers")?;
            let network = NonnegNetwork {
                input_shape,
                input_range: file.input.range,
                channel_ranges: file.input.channel_ranges.clone(),
                layers,
                output_offset: file.output_offset,
            };
            crate::nonneg::inverse(&network)?
                .output_shape()
                .map_err(|e| bad(e.to_string()))?;
            Model::Nonneg(network)
        }
        other => {
            return Err(bad(format!(
                "unknown kind \"{other}\"; expected \"regular\" or \"nonneg\""
            )))
        }
    };
    if let Some(extra) = loader.tensors.keys().next() {
        return Err(Error::Model {
            path: tensor_path.to_path_buf(),
            message: format!("unexpected tensor {extra} that model.json does not describe"),
        });
    }
    Ok((model, file.provenance))
}

/// Builds layers from their descriptions, taking their tensors by name.
struct Loader<'a> {
    tensors: HashMap<String, Tensor>,
    json_path: &'a Path,
    tensor_path: &'a Path,
}

impl Loader<'_> {
    fn bad(&self, message: String) -> Error {
        Error::Model {
            path: self.json_path.to_path_buf(),
            message,
        }
    }

    /// Removes the tensor `name`, checking its shape and finiteness.
    fn take(&mut self, name: String, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(&name).ok_or_else(|| Error::Model {
            path: self.tensor_path.to_path_buf(),
            message: format!("missing tensor {name}; model.json and model.safetensors do not belong together"),
        })?;
        if t.dims() != shape {
            return Err(Error::Model {
                path: self.tensor_path.to_path_buf(),
                message: format!("tensor {name} has shape {:?}, model.json implies {shape:?}", t.dims()),
            });
        }
        check_finite(&t, &name, self.tensor_path)?;
        Ok(t)
    }

    fn conv_shape(&self, c: &ConvSpec) -> Result<Vec<usize>> {
        const LIMIT: usize = 1 << 16;
        let settings = [c.kernel[0], c.kernel[1], c.stride, c.dilation, c.padding, c.in_channels, c.out_channels];
        if settings.iter().any(|&v| v > LIMIT) {
            return Err(self.bad(format!(
                "conv2d settings {settings:?} (kernel, stride, dilation, padding, channels) must each be at most {LIMIT}"
            )));
        }
        if c.kernel.contains(&0) || c.stride == 0 || c.dilation == 0 {
            return Err(self.bad(format!(
                "conv2d kernel size {:?}, stride {} and dilation {} must be at least 1",
                c.kernel, c.stride, c.dilation
            )));
        }
        if c.groups == 0 || c.in_channels % c.groups != 0 || c.out_channels % c.groups != 0 {
            return Err(self.bad(format!(
                "conv2d with {} groups does not divide {} input and {} output channels",
                c.groups, c.in_channels, c.out_channels
            )));
        }
        Ok(vec![c.out_channels, c.in_channels / c.groups, c.kernel[0], c.kernel[1]])
    }

    /// Checks the settings of conv1d layer `path` and returns its kernel
    /// shape `[out, in / groups, k]`.
    fn conv1d_shape(&self, c: &Conv1dSpec, path: &str) -> Result<Vec<usize>> {
        const LIMIT: usize = 1 << 16;
        let settings = [c.kernel, c.stride, c.dilation, c.padding, c.in_channels, c.out_channels];
        if settings.iter().any(|&v| v > LIMIT) {
            return Err(self.bad(format!(
                "layer {path} (conv1d): settings {settings:?} (kernel, stride, dilation, padding, \
                 in and out channels) must each be at most {LIMIT}"
            )));
        }
        if c.kernel == 0 || c.stride == 0 || c.dilation == 0 || c.in_channels == 0 || c.out_channels == 0 {
            return Err(self.bad(format!(
                "layer {path} (conv1d): kernel {}, stride {}, dilation {} and channels {} -> {} \
                 must each be at least 1",
                c.kernel, c.stride, c.dilation, c.in_channels, c.out_channels
            )));
        }
        if c.groups == 0 || c.in_channels % c.groups != 0 || c.out_channels % c.groups != 0 {
            return Err(self.bad(format!(
                "layer {path} (conv1d): groups {} must be at least 1 and divide both {} input and \
                 {} output channels; change groups or the channel counts",
                c.groups, c.in_channels, c.out_channels
            )));
        }
        Ok(vec![c.out_channels, c.in_channels / c.groups, c.kernel])
    }

    /// Rejects sizes that would allocate without bound, before the shape
    /// check runs.
    fn check_sizes(&self, path: &str, sizes: &[usize]) -> Result<()> {
        const LIMIT: usize = 1 << 20;
        if sizes.iter().any(|&v| v == 0 || v > LIMIT) {
            return Err(self.bad(format!("{path}: sizes {sizes:?} must each be in 1..={LIMIT}")));
        }
        Ok(())
    }

    fn regular_layers(&mut self, specs: &[LayerSpec], prefix: &str) -> Result<Vec<Layer>> {
        let mut layers = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let path = format!("{prefix}.{i}");
            let (w, b) = (format!("{path}.weight"), format!("{path}.bias"));
            layers.push(match spec {
                LayerSpec::Linear {
                    in_features,
                    out_features,
                } => Layer::Linear(Linear {
                    weight: self.take(w, &[*out_features, *in_features])?,
                    bias: self.take(b, &[*out_features])?,
                }),
                LayerSpec::Conv2d(c) => {
                    let shape = self.conv_shape(c)?;
                    Layer::Conv2d(Conv2d {
                        weight: self.take(w, &shape)?,
                        bias: self.take(b, &[c.out_channels])?,
                        stride: c.stride,
                        padding: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                        pad_value: c.pad_value.clone(),
                    })
                }
                LayerSpec::Conv1d(c) => {
                    let shape = self.conv1d_shape(c, &path)?;
                    Layer::Conv1d(Conv1d {
                        weight: self.take(w, &shape)?,
                        bias: self.take(b, &[c.out_channels])?,
                        stride: c.stride,
                        padding: c.padding,
                        dilation: c.dilation,
                        groups: c.groups,
                        pad_value: c.pad_value.clone(),
                    })
                }
                LayerSpec::Activation { activation } => Layer::Activation(activation.clone()),
                LayerSpec::AvgPool2d { pool, pad } if pad.is_empty() => Layer::AvgPool2d(*pool),
                LayerSpec::MaxPool2d(p) => Layer::MaxPool2d(*p),
                LayerSpec::Flatten => Layer::Flatten,
                LayerSpec::BatchNorm {
                    channels,
                    eps,
                    momentum,
                } => {
                    self.check_sizes(&path, &[*channels])?;
                    let weight = self.take(w, &[*channels])?;
                    let bias = self.take(b, &[*channels])?;
                    let mean = self.take(format!("{path}.running_mean"), &[*channels])?;
                    let var = self.take(format!("{path}.running_var"), &[*channels])?;
                    let smallest = var.to_dtype(DType::F64)?.min_all()?.to_scalar::<f64>()?;
                    if smallest < 0.0 {
                        return Err(self.bad(format!(
                            "{path}: running variance {smallest} is negative; the model is damaged"
                        )));
                    }
                    Layer::BatchNorm(BatchNorm::from_parts(weight, bias, mean, var, *eps, *momentum))
                }
                LayerSpec::Residual { main, shortcut } => Layer::Residual(Residual {
                    main: self.regular_layers(main, &format!("{path}.main"))?,
                    shortcut: self.regular_layers(shortcut, &format!("{path}.shortcut"))?,
                }),
                LayerSpec::Elman {
                    features,
                    hidden,
                    activation,
                } => {
                    self.check_sizes(&path, &[*features, *hidden])?;
                    Layer::Elman(Elman {
                        input_weight: self.take(format!("{path}.input_weight"), &[*hidden, *features])?,
                        recurrent_weight: self.take(format!("{path}.recurrent_weight"), &[*hidden, *hidden])?,
                        bias: self.take(b, &[*hidden])?,
                        activation: activation.clone(),
                    })
                }
                LayerSpec::GlobalAvgPool => Layer::GlobalAvgPool,
                LayerSpec::AdaptiveAvgPool2d { size } => Layer::AdaptiveAvgPool2d(*size),
                LayerSpec::Dropout { p } => Layer::Dropout(*p),
                other => {
                    return Err(self.bad(format!(
                        "layer {path} is {}, which a regular model cannot contain",
                        layer_type(other)
                    )))
                }
            });
        }
        Ok(layers)
    }

    fn nonneg_affine(&mut self, op: AffineOp, shape: Vec<usize>, spec: &NonnegSpec, path: &str) -> Result<NonnegAffine> {
        check_nonneg_spec(path, spec, shape[1] * op.groups()).map_err(|m| self.bad(m))?;
        Ok(NonnegAffine {
            op,
            positive: self.take(format!("{path}.positive"), &shape)?,
            negative: self.take(format!("{path}.negative"), &shape)?,
            bias: self.take(format!("{path}.bias"), &shape[..1])?,
            lo: spec.lo.clone(),
            alpha: spec.alpha.clone(),
            shift: spec.shift,
            out_max: spec.out_max,
            pad: spec.pad.clone(),
        })
    }

    fn nonneg_layers(&mut self, specs: &[LayerSpec], prefix: &str) -> Result<Vec<NonnegLayer>> {
        let mut layers = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let path = format!("{prefix}.{i}");
            layers.push(match spec {
                LayerSpec::NonnegLinear {
                    in_features,
                    out_features,
                    nonneg,
                } => NonnegLayer::Affine(self.nonneg_affine(
                    AffineOp::Linear,
                    vec![*out_features, *in_features],
                    nonneg,
                    &path,
                )?),
                LayerSpec::NonnegConv2d { conv, nonneg } => {
                    let op = AffineOp::Conv2d {
                        stride: conv.stride,
                        padding: conv.padding,
                        dilation: conv.dilation,
                        groups: conv.groups,
                    };
                    let shape = self.conv_shape(conv)?;
                    NonnegLayer::Affine(self.nonneg_affine(op, shape, nonneg, &path)?)
                }
                LayerSpec::NonnegConv1d { conv, nonneg } => {
                    let op = AffineOp::Conv1d {
                        stride: conv.stride,
                        padding: conv.padding,
                        dilation: conv.dilation,
                        groups: conv.groups,
                    };
                    let shape = self.conv1d_shape(conv, &path)?;
                    NonnegLayer::Affine(self.nonneg_affine(op, shape, nonneg, &path)?)
                }
                LayerSpec::NonnegActivation {
                    activation,
                    input_offset,
                    output_offset,
                } => NonnegLayer::Activation(NonnegActivation {
                    activation: activation.clone(),
                    input_offset: *input_offset,
                    output_offset: *output_offset,
                }),
                LayerSpec::AvgPool2d { pool, pad } if pad.is_empty() => NonnegLayer::AvgPool2d(*pool),
                LayerSpec::AvgPool2d { pool, pad } => {
                    if pad.iter().any(|v| !(v.is_finite() && *v >= 0.0)) || pad.len() > 1 << 16 {
                        return Err(self.bad(format!("{path}: padding values must be finite and >= 0")));
                    }
                    NonnegLayer::PaddedAvgPool2d {
                        pool: *pool,
                        pad: pad.clone(),
                    }
                }
                LayerSpec::MaxPool2d(p) => NonnegLayer::MaxPool2d(*p),
                LayerSpec::Flatten => NonnegLayer::Flatten,
                LayerSpec::Residual { main, shortcut } => NonnegLayer::Residual(NonnegResidual {
                    main: self.nonneg_layers(main, &format!("{path}.main"))?,
                    shortcut: self.nonneg_layers(shortcut, &format!("{path}.shortcut"))?,
                }),
                LayerSpec::NonnegElman {
                    features,
                    hidden,
                    activation,
                    nonneg,
                    input_offset,
                    output_offset,
                    initial_state,
                } => {
                    self.check_sizes(&path, &[*features, *hidden])?;
                    if !(initial_state.is_finite() && *initial_state >= 0.0) {
                        return Err(self.bad(format!("{path}: initial_state {initial_state} must be finite and >= 0")));
                    }
                    let shape = vec![*hidden, features + hidden];
                    let affine = self.nonneg_affine(AffineOp::Linear, shape, nonneg, &format!("{path}.affine"))?;
                    NonnegLayer::Elman(NonnegElman {
                        affine,
                        activation: NonnegActivation {
                            activation: activation.clone(),
                            input_offset: *input_offset,
                            output_offset: *output_offset,
                        },
                        initial_state: *initial_state,
                    })
                }
                LayerSpec::GlobalAvgPool => NonnegLayer::GlobalAvgPool,
                LayerSpec::AdaptiveAvgPool2d { size } => NonnegLayer::AdaptiveAvgPool2d(*size),
                LayerSpec::Dropout { p } => NonnegLayer::Dropout(*p),
                other => {
                    return Err(self.bad(format!(
                        "layer {path} is {}, which a non-negative model cannot contain",
                        layer_type(other)
                    )))
                }
            });
        }
        Ok(layers)
    }
}

fn check_nonneg_spec(layer: &str, spec: &NonnegSpec, in_channels: usize) -> std::result::Result<(), String> {
    let fits = |v: &[f64]| v.len() == 1 || v.len() == in_channels;
    if !fits(&spec.lo) || !fits(&spec.alpha) {
        return Err(format!(
            "layer {layer}: lo and alpha need 1 or {in_channels} values, got {} and {}",
            spec.lo.len(),
            spec.alpha.len()
        ));
    }
    let finite = spec.lo.iter().chain(&spec.alpha).chain([&spec.shift, &spec.out_max]).all(|v| v.is_finite());
    if !finite || spec.alpha.iter().any(|&a| a < 0.0) || spec.shift < 0.0 {
        return Err(format!(
            "layer {layer}: lo, alpha, shift and out_max must be finite, alpha and shift >= 0"
        ));
    }
    if !(spec.pad.is_empty() || fits(&spec.pad)) {
        return Err(format!("layer {layer}: pad needs 0, 1 or {in_channels} values, got {}", spec.pad.len()));
    }
    let at = |v: &[f64], c: usize| v[c.min(v.len() - 1)];
    for (c, &q) in spec.pad.iter().enumerate() {
        let (lo, alpha) = (at(&spec.lo, c), at(&spec.alpha, c));
        // Allow the rounding of lo + alpha when a pad lies on a bound.
        let slack = 1e-9 * (1.0 + lo.abs() + alpha);
        if !(q.is_finite() && lo - slack <= q && q <= lo + alpha + slack) {
            return Err(format!(
                "layer {layer}: padding value {q} of channel {c} is outside the input range \
                 [{lo}, {}], so a physical pad would be negative",
                lo + alpha
            ));
        }
    }
    Ok(())
}

fn layer_type(spec: &LayerSpec) -> String {
    serde_json::to_value(spec)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from))
        .unwrap_or_default()
}
