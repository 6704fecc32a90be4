//! The optional `mapping` section of the hardware manifest: the device
//! mapping of `src/hardware` (gains, transmissions, detector offsets and
//! full scales of every affine layer) and the effect settings it was
//! exported with. docs/MANIFEST.md lists the fields and their units.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::hardware::{DeviceMapping, Effects, GainGranularity, LayerMapping, MappedLayer};
use crate::nonneg::{NonnegAffine, NonnegNetwork};

/// Largest difference, in transmission units, between a stored
/// transmission and the one its layer's `P`, `N`, `alpha` and gains give.
/// Both sides are f32 values in `[0, 1]`, so rounding stays below 1e-6.
const TRANSMISSION_TOLERANCE: f32 = 1e-5;

/// The device settings a manifest is exported with.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceSettings {
    /// One gain per layer or one per output.
    pub granularity: GainGranularity,
    /// The effects of the devices, recorded as settings. The stored
    /// transmissions are the ideal ones, before any effect.
    pub effects: Effects,
}

/// The `mapping` section of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestMapping {
    /// The gain granularity: `per-layer` or `per-output`.
    pub gain: GainGranularity,
    /// One entry per affine layer, in the order of `layers`.
    pub layers: Vec<ManifestLayerMapping>,
    /// The effect settings, in the units of docs/HARDWARE.md.
    pub effects: Effects,
}

/// The device values of one affine layer. The tensors are f32 entries of
/// `manifest.safetensors`, named here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLayerMapping {
    /// Name of the affine layer in `layers`.
    pub name: String,
    /// The gain `g` of a `per-layer` mapping: `z' = g r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain: Option<f64>,
    /// Tensor of the gains of a `per-output` mapping, `[out]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gains: Option<String>,
    /// Full scale `F` of the detector readings in units of `z'`: the ADC
    /// range is `[0, F]` and detector noise is relative to it.
    pub full_scale: f64,
    /// Tensor of `T+ = P alpha / g`, shaped like `P`, in `[0, 1]`.
    pub signal_transmission: String,
    /// Tensor of `T- = N alpha / g`, shaped like `N`, in `[0, 1]`.
    pub complement_transmission: String,
    /// Tensor of the detector offsets `o = bias / g`, `[out]`.
    pub offsets: String,
}

/// The mapping section of a manifest, read back and validated.
#[derive(Debug, Clone)]
pub struct ReadMapping {
    /// Gains, `alpha` and full scale of every affine layer.
    pub mapping: DeviceMapping,
    /// The stored transmissions and offsets, one entry per affine layer.
    pub transmissions: Vec<MappedLayer>,
    /// The recorded effect settings.
    pub effects: Effects,
}

/// Maps `network` onto devices and returns the mapping section; the
/// gains (per output), transmissions and offsets go into `tensors`.
pub(super) fn build_mapping(
    network: &NonnegNetwork,
    settings: &DeviceSettings,
    tensors: &mut Vec<(String, Tensor)>,
) -> Result<ManifestMapping> {
    settings.effects.validate()?;
    let mapping = DeviceMapping::new(network, settings.granularity)?;
    let mapped = mapping.map(network)?;
    let mut layers = Vec::with_capacity(mapping.layers.len());
    for (m, device) in mapping.layers.iter().zip(mapped) {
        let name = format!("layers.{}", m.layer);
        let (gain, gains) = match settings.granularity {
            GainGranularity::PerLayer => (Some(m.gains[0]), None),
            GainGranularity::PerOutput => {
                let gains_name = format!("{name}.gains");
                let values = Tensor::new(m.gains.as_slice(), &Device::Cpu)?.to_dtype(DType::F32)?;
                tensors.push((gains_name.clone(), values));
                (None, Some(gains_name))
            }
        };
        let signal_transmission = format!("{name}.signal_transmission");
        let complement_transmission = format!("{name}.complement_transmission");
        let offsets = format!("{name}.offsets");
        // The largest transmission is 1 in f64; rounding to f32 can push it
        // a few ulp above, so the stored values are clipped to [0, 1].
        tensors.push((
            signal_transmission.clone(),
            device.signal.to_dtype(DType::F32)?.clamp(0f32, 1f32)?,
        ));
        tensors.push((
            complement_transmission.clone(),
            device.complement.to_dtype(DType::F32)?.clamp(0f32, 1f32)?,
        ));
        tensors.push((offsets.clone(), device.offsets.to_dtype(DType::F32)?));
        layers.push(ManifestLayerMapping {
            name,
            gain,
            gains,
            full_scale: m.full_scale,
            signal_transmission,
            complement_transmission,
            offsets,
        });
    }
    Ok(ManifestMapping {
        gain: settings.granularity,
        layers,
        effects: settings.effects,
    })
}

/// Takes and checks the tensors of the mapping section. `affine` lists
/// each affine layer of `network` as its index and manifest name.
///
/// Errors name the field (`mapping.layers[1].gain`) or the tensor.
pub(super) fn read_mapping(
    section: &ManifestMapping,
    affine: &[(usize, String)],
    network: &NonnegNetwork,
    tensors: &mut HashMap<String, Tensor>,
) -> std::result::Result<ReadMapping, String> {
    if let Some(invalid) = section.effects.first_invalid() {
        return Err(format!(
            "mapping.effects.{} is {}; it {}",
            invalid.field, invalid.value, invalid.reason
        ));
    }
    if section.layers.len() != affine.len() {
        return Err(format!(
            "mapping.layers has {} entries; expected {}, one per affine layer",
            section.layers.len(),
            affine.len()
        ));
    }
    let mut layers = Vec::with_capacity(affine.len());
    let mut transmissions = Vec::with_capacity(affine.len());
    for (k, (entry, (index, name))) in section.layers.iter().zip(affine).enumerate() {
        let field = format!("mapping.layers[{k}]");
        if &entry.name != name {
            return Err(format!(
                "{field}.name is {:?}; expected {name:?}, the affine layers in order",
                entry.name
            ));
        }
        let crate::nonneg::NonnegLayer::Affine(a) = &network.layers[*index] else {
            unreachable!("layer {index} was listed as affine");
        };
        let out = a.positive.dims()[0];
        let gains = read_gains(section.gain, entry, &field, out, tensors)?;
        if !(entry.full_scale.is_finite() && entry.full_scale >= 0.0) {
            return Err(format!(
                "{field}.full_scale is {}; it must be finite and >= 0",
                entry.full_scale
            ));
        }
        let layer = LayerMapping {
            layer: *index,
            gains,
            alpha: a.alpha.clone(),
            full_scale: entry.full_scale,
        };
        let device = read_device_values(entry, &field, &layer, a, tensors)?;
        layers.push(layer);
        transmissions.push(device);
    }
    Ok(ReadMapping {
        mapping: DeviceMapping {
            granularity: section.gain,
            layers,
        },
        transmissions,
        effects: section.effects,
    })
}

/// Returns the checked gains of one layer: one value, or `out` values
/// from the named tensor.
fn read_gains(
    granularity: GainGranularity,
    entry: &ManifestLayerMapping,
    field: &str,
    out: usize,
    tensors: &mut HashMap<String, Tensor>,
) -> std::result::Result<Vec<f64>, String> {
    let gains = match (granularity, entry.gain, &entry.gains) {
        (GainGranularity::PerLayer, Some(g), None) => vec![g],
        (GainGranularity::PerOutput, None, Some(tensor)) => {
            let values = take_f32(tensors, tensor, &format!("{field}.gains"), &[out])?;
            values.into_iter().map(f64::from).collect()
        }
        (GainGranularity::PerLayer, ..) => {
            return Err(format!(
                "{field}: a per-layer mapping needs gain (a number) and no gains tensor"
            ))
        }
        (GainGranularity::PerOutput, ..) => {
            return Err(format!(
                "{field}: a per-output mapping needs gains (a tensor name) and no gain"
            ))
        }
    };
    let label = if entry.gains.is_some() {
        "gains"
    } else {
        "gain"
    };
    if let Some(g) = gains.iter().find(|g| !(g.is_finite() && **g > 0.0)) {
        return Err(format!(
            "{field}.{label} contains {g}; every gain must be finite and > 0"
        ));
    }
    Ok(gains)
}

/// Takes the transmissions and offsets of one layer and checks them against
/// its parameters: `T = P alpha / g` within [`TRANSMISSION_TOLERANCE`] and
/// `o = bias / g` within 1e-5 relative.
fn read_device_values(
    entry: &ManifestLayerMapping,
    field: &str,
    layer: &LayerMapping,
    a: &NonnegAffine,
    tensors: &mut HashMap<String, Tensor>,
) -> std::result::Result<MappedLayer, String> {
    let dims = a.positive.dims().to_vec();
    let out = dims[0];
    let scale = layer
        .transmission_scale(a)
        .map_err(|e| format!("{field}: {e}"))?; // alpha / g
    let mut take_transmission = |tensor: &str, part: &str, weights: &Tensor| {
        let values = take_f32(tensors, tensor, &format!("{field}.{part}"), &dims)?;
        if let Some(t) = values.iter().find(|t| !(0.0..=1.0).contains(*t)) {
            return Err(format!(
                "tensor {tensor} ({field}.{part}) contains {t}; a transmission lies in [0, 1]"
            ));
        }
        let stored =
            Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
        let error = max_abs_difference(&weights.mul(&scale).map_err(|e| e.to_string())?, &stored)?;
        if error > TRANSMISSION_TOLERANCE {
            return Err(format!(
                "tensor {tensor} ({field}.{part}) differs from the weights times alpha / gain by up to \
                 {error}; the mapping does not belong to these weights, export the manifest again"
            ));
        }
        Ok(stored)
    };
    let signal = take_transmission(
        &entry.signal_transmission,
        "signal_transmission",
        &a.positive,
    )?;
    let complement = take_transmission(
        &entry.complement_transmission,
        "complement_transmission",
        &a.negative,
    )?;

    let values = take_f32(tensors, &entry.offsets, &format!("{field}.offsets"), &[out])?;
    let bias: Vec<f32> = a.bias.to_vec1().map_err(|e| e.to_string())?;
    for (i, (o, b)) in values.iter().zip(&bias).enumerate() {
        let expected = *b as f64 / layer.gains[i.min(layer.gains.len() - 1)];
        if !(o.is_finite() && (*o as f64 - expected).abs() <= 1e-5 * expected.abs().max(1.0)) {
            return Err(format!(
                "tensor {} ({field}.offsets) has {o} at output {i}; bias / gain is {expected}, so \
                 export the manifest again",
                entry.offsets
            ));
        }
    }
    let offsets = Tensor::from_vec(values, out, &Device::Cpu).map_err(|e| e.to_string())?;
    Ok(MappedLayer {
        signal,
        complement,
        offsets,
    })
}

/// Removes the f32 tensor `name` with shape `dims` from `tensors` and
/// returns its values; `field` names the JSON field that refers to it.
fn take_f32(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    field: &str,
    dims: &[usize],
) -> std::result::Result<Vec<f32>, String> {
    let tensor = tensors
        .remove(name)
        .ok_or_else(|| format!("tensor {name} ({field}) is missing from the safetensors file"))?;
    if tensor.dtype() != DType::F32 || tensor.dims() != dims {
        return Err(format!(
            "tensor {name} ({field}) is {:?} {:?}; expected f32 {dims:?}",
            tensor.dtype(),
            tensor.dims()
        ));
    }
    tensor
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> std::result::Result<f32, String> {
    a.sub(b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .map_err(|e| e.to_string())
}
