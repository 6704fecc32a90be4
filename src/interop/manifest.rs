//! The hardware manifest: a non-negative network as a hardware toolchain
//! reads it, `manifest.json` (layers, ranges, shifts, activations) beside
//! `manifest.safetensors` (weights, biases and routing masks). The schema
//! is in docs/MANIFEST.md; [`read_manifest`] validates all of it.
//! Exported with [`DeviceSettings`], the manifest also carries the device
//! mapping of `src/hardware` in its optional `mapping` section.

mod layers;
mod mapping;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::model::{Pool, Range};
use crate::nonneg::{AffineOp, NonnegActivation, NonnegAffine, NonnegLayer, NonnegNetwork};

pub use mapping::{DeviceSettings, ManifestLayerMapping, ManifestMapping, ReadMapping};

/// The `format` tag of `manifest.json`.
pub const MANIFEST_FORMAT: &str = "isonn-hardware-manifest";
/// The newest schema version, which this build writes for a network with
/// a residual block, an Elman cell or a conv1d layer. A plain chain of the
/// other layers is written as version 1, which older readers accept, and
/// both versions are read.
pub const MANIFEST_VERSION: u32 = 2;
/// File name of the description.
pub const MANIFEST_JSON: &str = "manifest.json";
/// File name of the tensors.
pub const MANIFEST_TENSORS: &str = "manifest.safetensors";

/// Routing mask bit of an entry that taps the signal (`P > 0`).
pub const ROUTE_SIGNAL: u8 = 1;
/// Routing mask bit of an entry that taps the complement (`N > 0`).
pub const ROUTE_COMPLEMENT: u8 = 2;

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// 1, or 2 when a layer needs it ([`ManifestLayer::min_version`]).
    pub schema_version: u32,
    /// The true input and its modulators.
    pub input: ManifestInput,
    /// The layers, in order.
    pub layers: Vec<ManifestLayer>,
    /// The logits are the last layer's physical output plus this.
    pub output_offset: f64,
    /// The device mapping and effect settings. The key is absent unless the
    /// manifest was exported with them, so files without it keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<ManifestMapping>,
}

/// The network input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestInput {
    /// One sample, `[channels, height, width]`.
    pub shape: Vec<usize>,
    /// Range of the true input, one or one per channel; the modulator of
    /// channel `c` emits `x - ranges[c].lo`, in `[0, hi - lo]`.
    pub ranges: Vec<Range>,
}

/// A physical signal's range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRange {
    /// Smallest value.
    pub lo: f64,
    /// Largest value.
    pub hi: f64,
}

/// One layer of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ManifestLayer {
    /// `z' = P u + N (alpha - u) + bias`, fully connected.
    Linear {
        /// Tensor-name prefix: `{name}.positive`, `.negative`, `.bias`, `.routing`.
        name: String,
        /// Inputs.
        in_features: usize,
        /// Outputs.
        out_features: usize,
        /// The affine parameters.
        #[serde(flatten)]
        affine: AffineSpec,
    },
    /// `z' = P * u + N * (alpha - u) + bias`, a 2-D convolution.
    Conv2d {
        /// Tensor-name prefix.
        name: String,
        /// Kernel `[kh, kw]`.
        kernel: [usize; 2],
        /// Step between output positions.
        stride: usize,
        /// Pixels added on every side.
        padding: usize,
        /// Spacing between kernel taps.
        dilation: usize,
        /// Channel groups.
        groups: usize,
        /// True padding value, one or one per input channel; empty for 0.
        pad: Vec<f64>,
        /// The affine parameters.
        #[serde(flatten)]
        affine: AffineSpec,
    },
    /// An activation device: emits `f(v + input_offset) - output_offset`.
    Activation {
        /// The response and its parameters.
        activation: Activation,
        /// Added to the physical input: minus the shift of the layer before.
        input_offset: f64,
        /// Subtracted from the response.
        output_offset: f64,
        /// Range of the physical output; `None` for an unbounded response.
        output_range: Option<SignalRange>,
    },
    /// Average pooling without padding.
    AvgPool2d {
        /// Window, stride and padding (0).
        #[serde(flatten)]
        pool: Pool,
    },
    /// Max pooling; padding is never selected.
    MaxPool2d {
        /// Window, stride and padding.
        #[serde(flatten)]
        pool: Pool,
    },
    /// Average pooling whose padding is the physical value `pad`.
    PaddedAvgPool2d {
        /// Window, stride and padding.
        #[serde(flatten)]
        pool: Pool,
        /// Physical value of a true 0, one or one per channel.
        pad: Vec<f64>,
    },
    /// `[c, h, w]` to `[c * h * w]`.
    Flatten,
    /// The mean of each channel.
    GlobalAvgPool,
    /// Adaptive average pooling to `size`.
    AdaptiveAvgPool2d {
        /// Output `[h, w]`.
        size: [usize; 2],
    },
    /// The identity at inference.
    Dropout {
        /// Drop probability in training.
        p: f64,
    },
    /// `z' = P * u + N * (alpha - u) + bias`, a 1-D convolution over each
    /// row (schema version 2).
    Conv1d {
        /// Tensor-name prefix.
        name: String,
        /// Kernel size along the row.
        kernel: usize,
        /// Step between output positions.
        stride: usize,
        /// Samples added at both ends of each row.
        padding: usize,
        /// Spacing between kernel taps.
        dilation: usize,
        /// Channel groups.
        groups: usize,
        /// True padding value, one or one per input channel; empty for 0.
        pad: Vec<f64>,
        /// The affine parameters.
        #[serde(flatten)]
        affine: AffineSpec,
    },
    /// A residual block: the physical outputs of two branches reading the
    /// same signal, added (schema version 2).
    Residual {
        /// The main branch.
        main: Vec<ManifestLayer>,
        /// The shortcut; empty for the identity.
        shortcut: Vec<ManifestLayer>,
    },
    /// An Elman cell (schema version 2). Each step the affine layer `name`
    /// reads `[u_t; v]`, the step's `features` physical inputs and the
    /// `hidden` physical state values, and the `state` device turns `z'`
    /// into the next state. The state starts at `initial_state`.
    Elman {
        /// Tensor-name prefix of the affine layer, `[hidden, features + hidden]`.
        name: String,
        /// Inputs per step, `channels * width` of a `[channels, steps, width]` sample.
        features: usize,
        /// Size of the state.
        hidden: usize,
        /// Physical value of the initial state `h_0 = 0`.
        initial_state: f64,
        /// The activation device that produces the state.
        state: ActivationSpec,
        /// The affine parameters, `lo` and `alpha` one or one per input.
        #[serde(flatten)]
        affine: AffineSpec,
    },
}

impl ManifestLayer {
    /// Returns the oldest schema version that has this layer (and every
    /// layer inside it).
    pub fn min_version(&self) -> u32 {
        match self {
            ManifestLayer::Conv1d { .. } | ManifestLayer::Residual { .. } | ManifestLayer::Elman { .. } => 2,
            _ => 1,
        }
    }
}

/// An activation device inside an Elman cell: emits
/// `f(v + input_offset) - output_offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationSpec {
    /// The response and its parameters.
    pub activation: Activation,
    /// Added to the physical input: minus the shift of the affine layer.
    pub input_offset: f64,
    /// Subtracted from the response.
    pub output_offset: f64,
    /// Range of the physical output; `None` for an unbounded response.
    pub output_range: Option<SignalRange>,
}

impl ActivationSpec {
    fn new(a: &NonnegActivation) -> Self {
        let output_range = a.activation.output_bounds().map(|(lo, hi)| SignalRange {
            lo: lo - a.output_offset,
            hi: hi - a.output_offset,
        });
        ActivationSpec {
            activation: a.activation.clone(),
            input_offset: a.input_offset,
            output_offset: a.output_offset,
            output_range,
        }
    }

    /// Checks the activation and offsets and returns the device.
    pub(super) fn read(&self) -> std::result::Result<NonnegActivation, String> {
        self.activation.validate()?;
        if !(self.input_offset.is_finite() && self.output_offset.is_finite()) {
            return Err("input_offset and output_offset must be finite".into());
        }
        Ok(NonnegActivation {
            activation: self.activation.clone(),
            input_offset: self.input_offset,
            output_offset: self.output_offset,
        })
    }
}

/// The settings of a non-negative affine layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffineSpec {
    /// Lower bound of the true input, one or one per input channel.
    pub lo: Vec<f64>,
    /// Width of the input range, one or one per input channel; the
    /// complement port emits `alpha - u`.
    pub alpha: Vec<f64>,
    /// The shift `s` the next device subtracts.
    pub shift: f64,
    /// Range of the physical input `u`: `[0, max alpha]`.
    pub input_range: SignalRange,
    /// Range of `z'`: `[0, out_max]`, the detector's full scale.
    pub output_range: SignalRange,
}

/// Builds the manifest of `network` and its named tensors, with the
/// mapping section when `settings` is given. The mapping section covers
/// chains of layers only, so `settings` with a residual block or an Elman
/// cell is an error.
pub fn build_manifest(
    network: &NonnegNetwork,
    settings: Option<&DeviceSettings>,
) -> Result<(Manifest, Vec<(String, Tensor)>)> {
    let mut tensors = Vec::new();
    let layers = build_layers(&network.layers, "layers.", &mut tensors)?;
    let schema_version = layers.iter().map(ManifestLayer::min_version).max().unwrap_or(1);
    let ranges = if network.channel_ranges.is_empty() { vec![network.input_range] } else { network.channel_ranges.clone() };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        schema_version,
        input: ManifestInput { shape: network.input_shape.clone(), ranges },
        layers,
        output_offset: network.output_offset,
        mapping: settings.map(|s| mapping::build_mapping(network, s, &mut tensors)).transpose()?,
    };
    Ok((manifest, tensors))
}

/// Builds the manifest layers of `layers`, named `{prefix}{index}`.
fn build_layers(layers: &[NonnegLayer], prefix: &str, tensors: &mut Vec<(String, Tensor)>) -> Result<Vec<ManifestLayer>> {
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("{prefix}{i}");
        out.push(match layer {
            NonnegLayer::Affine(a) => affine_layer(&name, a, tensors)?,
            NonnegLayer::Activation(a) => {
                let spec = ActivationSpec::new(a);
                ManifestLayer::Activation {
                    activation: spec.activation,
                    input_offset: spec.input_offset,
                    output_offset: spec.output_offset,
                    output_range: spec.output_range,
                }
            }
            NonnegLayer::AvgPool2d(pool) => ManifestLayer::AvgPool2d { pool: *pool },
            NonnegLayer::MaxPool2d(pool) => ManifestLayer::MaxPool2d { pool: *pool },
            NonnegLayer::PaddedAvgPool2d { pool, pad } => ManifestLayer::PaddedAvgPool2d { pool: *pool, pad: pad.clone() },
            NonnegLayer::Flatten => ManifestLayer::Flatten,
            NonnegLayer::GlobalAvgPool => ManifestLayer::GlobalAvgPool,
            NonnegLayer::AdaptiveAvgPool2d(size) => ManifestLayer::AdaptiveAvgPool2d { size: *size },
            NonnegLayer::Dropout(p) => ManifestLayer::Dropout { p: *p },
            NonnegLayer::Residual(r) => ManifestLayer::Residual {
                main: build_layers(&r.main, &format!("{name}.main."), tensors)?,
                shortcut: build_layers(&r.shortcut, &format!("{name}.shortcut."), tensors)?,
            },
            NonnegLayer::Elman(e) => {
                let ManifestLayer::Linear { name, affine, .. } = affine_layer(&format!("{name}.affine"), &e.affine, tensors)? else {
                    unreachable!("an Elman cell's affine layer is linear");
                };
                ManifestLayer::Elman {
                    name,
                    features: e.features(),
                    hidden: e.hidden(),
                    initial_state: e.initial_state,
                    state: ActivationSpec::new(&e.activation),
                    affine,
                }
            }
        });
    }
    Ok(out)
}

fn affine_layer(name: &str, a: &NonnegAffine, tensors: &mut Vec<(String, Tensor)>) -> Result<ManifestLayer> {
    let positive = a.positive.to_dtype(DType::F32)?;
    let negative = a.negative.to_dtype(DType::F32)?;
    let routing = positive
        .gt(0.0)?
        .to_dtype(DType::U8)?
        .add(&negative.gt(0.0)?.to_dtype(DType::U8)?.affine(ROUTE_COMPLEMENT as f64, 0.0)?)?;
    tensors.push((format!("{name}.positive"), positive));
    tensors.push((format!("{name}.negative"), negative));
    tensors.push((format!("{name}.bias"), a.bias.to_dtype(DType::F32)?));
    tensors.push((format!("{name}.routing"), routing));
    let affine = AffineSpec {
        lo: a.lo.clone(),
        alpha: a.alpha.clone(),
        shift: a.shift,
        input_range: SignalRange { lo: 0.0, hi: a.alpha.iter().cloned().fold(0.0, f64::max) },
        output_range: SignalRange { lo: 0.0, hi: a.out_max },
    };
    let dims = a.positive.dims();
    Ok(match a.op {
        AffineOp::Linear => ManifestLayer::Linear { name: name.into(), in_features: dims[1], out_features: dims[0], affine },
        AffineOp::Conv2d { stride, padding, dilation, groups } => ManifestLayer::Conv2d {
            name: name.into(),
            kernel: [dims[2], dims[3]],
            stride,
            padding,
            dilation,
            groups,
            pad: a.pad.clone(),
            affine,
        },
        AffineOp::Conv1d { stride, padding, dilation, groups } => ManifestLayer::Conv1d {
            name: name.into(),
            kernel: dims[2],
            stride,
            padding,
            dilation,
            groups,
            pad: a.pad.clone(),
            affine,
        },
    })
}

/// Writes the manifest of `network` into `dir`, with the mapping section
/// when `settings` is given: the tensors first, then `manifest.json`, each
/// atomically.
pub fn write_manifest(dir: &Path, network: &NonnegNetwork, settings: Option<&DeviceSettings>) -> Result<()> {
    let (manifest, tensors) = build_manifest(network, settings)?;
    crate::fsio::create_dir_all(dir)?;
    let tensors_path = dir.join(MANIFEST_TENSORS);
    let bytes = crate::store::serialize_tensors(&tensors, None, &tensors_path)?;
    crate::fsio::write_atomic(&tensors_path, &bytes)?;
    crate::fsio::write_json_atomic(&dir.join(MANIFEST_JSON), &manifest)
}

/// Reads and validates the manifest in `dir` and returns the network it
/// describes.
///
/// Errors name the file and the field or tensor that fails. The checks
/// cover the format tag and schema version, unknown fields, the input
/// shape and ranges, and every named tensor's presence, type (f32, routing
/// u8), shape and values (finite, `>= 0`). Each routing mask must be
/// `(P > 0) + 2 (N > 0)`, `lo`, `alpha` and `shift` valid, and the layers
/// must fit the shapes they read. A mapping section is validated as in
/// [`read_manifest_with_mapping`] and dropped.
pub fn read_manifest(dir: &Path) -> Result<NonnegNetwork> {
    Ok(read_manifest_with_mapping(dir)?.0)
}

/// Reads and validates the manifest in `dir` like [`read_manifest`] and
/// returns the network with its mapping section, if the file has one.
///
/// The mapping checks name the field or tensor that fails: one entry per
/// affine layer in order, gains finite and `> 0`, full scales finite and
/// `>= 0`, transmissions in `[0, 1]` that equal `P alpha / g` and
/// `N alpha / g` within 1e-5, offsets equal to `bias / g`, and effect
/// settings in the ranges `isonn hardware` accepts.
pub fn read_manifest_with_mapping(dir: &Path) -> Result<(NonnegNetwork, Option<ReadMapping>)> {
    let json_path = dir.join(MANIFEST_JSON);
    let manifest: Manifest = crate::fsio::read_json(&json_path, "hardware manifest")?;
    let invalid = |message: String| Error::Model { path: json_path.clone(), message };
    if manifest.format != MANIFEST_FORMAT {
        return Err(invalid(format!("format is {:?}, expected {MANIFEST_FORMAT:?}", manifest.format)));
    }
    if !(1..=MANIFEST_VERSION).contains(&manifest.schema_version) {
        return Err(invalid(format!(
            "schema_version {} is not supported; this isonn reads versions 1 to {MANIFEST_VERSION}",
            manifest.schema_version
        )));
    }
    let shape = &manifest.input.shape;
    if shape.len() != 3 || shape.iter().any(|&d| d == 0 || d > 65536) {
        return Err(invalid(format!("input.shape {shape:?} must be three sizes in 1..=65536")));
    }
    let ranges = &manifest.input.ranges;
    if !(ranges.len() == 1 || ranges.len() == shape[0]) || ranges.iter().any(|r| Range::new(r.lo, r.hi).is_err()) {
        return Err(invalid(format!("input.ranges must be one or {} finite ranges with lo <= hi", shape[0])));
    }
    if !manifest.output_offset.is_finite() {
        return Err(invalid("output_offset must be finite".into()));
    }

    let tensors_path = dir.join(MANIFEST_TENSORS);
    let bytes = crate::fsio::read_capped(&tensors_path, crate::store::MAX_TENSOR_BYTES, "manifest.safetensors")?;
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| Error::Model {
        path: tensors_path.clone(),
        message: format!("cannot read tensors ({e}); the file is damaged or not safetensors"),
    })?;
    let mut affine_names = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        if let ManifestLayer::Linear { name, .. } | ManifestLayer::Conv2d { name, .. } | ManifestLayer::Conv1d { name, .. } = layer {
            affine_names.push((i, name.clone()));
        }
    }
    let mut reader = layers::LayerReader { version: manifest.schema_version, tensors: &mut tensors, tensors_path: &tensors_path };
    let layers = reader.read_layers(&manifest.layers, "layers").map_err(invalid)?;
    let (input_range, channel_ranges) = match ranges.as_slice() {
        [r] => (*r, Vec::new()),
        _ => {
            let lo = ranges.iter().map(|r| r.lo).fold(f64::INFINITY, f64::min);
            let hi = ranges.iter().map(|r| r.hi).fold(f64::NEG_INFINITY, f64::max);
            (Range { lo, hi }, ranges.clone())
        }
    };
    let network = NonnegNetwork {
        input_shape: shape.clone(),
        input_range,
        channel_ranges,
        layers,
        output_offset: manifest.output_offset,
    };
    let device = match &manifest.mapping {
        Some(_) if !network.is_chain() => {
            return Err(invalid("the mapping section describes chains of layers, but the layers contain a residual block or an Elman cell".into()))
        }
        Some(section) => Some(mapping::read_mapping(section, &affine_names, &network, &mut tensors).map_err(invalid)?),
        None => None,
    };
    if let Some(name) = tensors.keys().next() {
        return Err(Error::Model { path: tensors_path, message: format!("tensor {name} belongs to no layer of {MANIFEST_JSON}") });
    }
    // Running one zero sample checks that every layer fits the shape the
    // previous one produces, with candle's own shape checks.
    let mut dims = vec![1];
    dims.extend_from_slice(shape);
    let probe = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
    network
        .forward(&probe)
        .map_err(|e| invalid(format!("the layers do not fit together or the input shape: {e}")))?;
    Ok((network, device))
}
