//! The mapping of a non-negative network onto devices.
//!
//! An affine layer computes `z' = P u + N (alpha - u) + bias` with its input
//! `u` in `[0, alpha]`. On hardware, a modulator sets the level `m = u /
//! alpha` in `[0, 1]` on one port and `1 - m` on its second port, a weight
//! element of transmission `t` in `[0, 1]` passes `t` times the light it
//! receives, and a photodetector sums what reaches it. With the gain `g` of
//! the output (one value per layer or per output),
//!
//! `T+ = P alpha / g`, `T- = N alpha / g`, `o = bias / g`,
//! `r = T+ m + T- (1 - m) + o`, and `z' = g r`.
//!
//! `g` is the largest entry of `P alpha` and `N alpha` in its layer or row,
//! so the largest transmission is exactly 1 and every other lies in `[0, 1]`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nonneg::{NonnegAffine, NonnegNetwork};

/// How many gains a layer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GainGranularity {
    /// One gain for the whole layer: one transimpedance setting.
    #[default]
    PerLayer,
    /// One gain per output: each row uses the full transmission range.
    PerOutput,
}

/// The device settings of one affine layer, in the units of `docs/HARDWARE.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMapping {
    /// Index of the layer in the network.
    pub layer: usize,
    /// Gains `g`, one for the layer or one per output: `z' = g r`.
    pub gains: Vec<f64>,
    /// Modulation width `alpha` of the layer's input, one value or one per
    /// input channel: `m = u / alpha`.
    pub alpha: Vec<f64>,
    /// Full scale `F` of the layer's detector readings in units of `z'`:
    /// the largest `z'` any input in range can produce, common-mode offset
    /// included. The ADC range is `[0, F]`.
    pub full_scale: f64,
}

/// The mapping of every affine layer of a network onto devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceMapping {
    /// The gain granularity the mapping was built with.
    pub granularity: GainGranularity,
    /// One entry per affine layer, in order.
    pub layers: Vec<LayerMapping>,
}

/// The device values of one affine layer.
#[derive(Debug, Clone)]
pub struct MappedLayer {
    /// Transmissions `T+` on the signal port, shaped like `P`.
    pub signal: Tensor,
    /// Transmissions `T-` on the complement port, shaped like `N`.
    pub complement: Tensor,
    /// Detector offsets `o = bias / g`, `[out]`.
    pub offsets: Tensor,
}

impl DeviceMapping {
    /// Computes the gains and full scales of every affine layer of `network`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when a layer's input width `alpha` is not a finite
    /// number > 0 (a modulator cannot encode an empty range) or a parameter
    /// is not finite.
    pub fn new(network: &NonnegNetwork, granularity: GainGranularity) -> Result<Self> {
        if !network.is_chain() {
            // NOTE: residual blocks, recurrent cells and per-channel input
            // ranges are not modelled on devices yet.
            return Err(Error::Shape(
                "the hardware model reads plain chains of layers with one input range; this \
                 network has a residual block, a recurrent cell or per-channel input ranges"
                    .into(),
            ));
        }
        let layers = network
            .affine_layers()
            .map(|(i, a)| layer_mapping(i, a, granularity))
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceMapping { granularity, layers })
    }

    /// Returns the mapping of the affine layer at network index `layer`.
    pub fn layer(&self, layer: usize) -> Option<&LayerMapping> {
        self.layers.iter().find(|m| m.layer == layer)
    }

    /// Computes the transmissions and offsets of every affine layer, in order.
    pub fn map(&self, network: &NonnegNetwork) -> Result<Vec<MappedLayer>> {
        network
            .affine_layers()
            .map(|(i, a)| {
                let m = self.checked_layer(i)?;
                let scale = m.transmission_scale(a)?; // alpha / g
                Ok(MappedLayer {
                    signal: a.positive.mul(&scale)?,
                    complement: a.negative.mul(&scale)?,
                    offsets: a.bias.mul(&m.bias_scale(a)?)?,
                })
            })
            .collect()
    }

    /// Builds the network whose parameters the device values `mapped` of
    /// [`map`](Self::map) implement: `P = g T+ / alpha`, `N = g T- / alpha`,
    /// `bias = g o`. Every other field is copied from `template`.
    pub fn unmap(&self, template: &NonnegNetwork, mapped: &[MappedLayer]) -> Result<NonnegNetwork> {
        let indices: Vec<usize> = template.affine_layers().map(|(i, _)| i).collect();
        if indices.len() != mapped.len() {
            return Err(Error::Shape(format!(
                "{} mapped layers for a network with {} affine layers",
                mapped.len(),
                indices.len()
            )));
        }
        let mut out = template.clone();
        for (i, device) in indices.into_iter().zip(mapped) {
            let m = self.checked_layer(i)?;
            let crate::nonneg::NonnegLayer::Affine(a) = &mut out.layers[i] else {
                unreachable!("affine_layers returned index {i}");
            };
            let (positive, negative, bias) = m.parameters_of(a, &device.signal, &device.complement, &device.offsets)?;
            a.positive = positive;
            a.negative = negative;
            a.bias = bias;
        }
        Ok(out)
    }

    fn checked_layer(&self, layer: usize) -> Result<&LayerMapping> {
        self.layer(layer)
            .ok_or_else(|| Error::Shape(format!("the device mapping has no entry for layer {layer}")))
    }
}

impl LayerMapping {
    /// Returns `alpha / g` for every weight entry, shaped like the weights.
    pub fn transmission_scale(&self, a: &NonnegAffine) -> Result<Tensor> {
        let dims = a.positive.dims().to_vec();
        let alpha = weight_alpha(a)?;
        let out = dims[0];
        let row = alpha.len() / out.max(1);
        let scale: Vec<f64> = alpha
            .iter()
            .enumerate()
            .map(|(k, alpha)| alpha / self.gain_of(k / row.max(1)))
            .collect();
        Ok(Tensor::from_vec(scale, dims, a.positive.device())?.to_dtype(a.positive.dtype())?)
    }

    /// Returns `1 / g` per output, `[out]`.
    pub fn bias_scale(&self, a: &NonnegAffine) -> Result<Tensor> {
        let out = a.bias.dims()[0];
        let scale: Vec<f64> = (0..out).map(|i| 1.0 / self.gain_of(i)).collect();
        Ok(Tensor::new(scale.as_slice(), a.bias.device())?.to_dtype(a.bias.dtype())?)
    }

    /// Converts device values back to `(P, N, bias)` of layer `a`.
    pub fn parameters_of(
        &self,
        a: &NonnegAffine,
        signal: &Tensor,
        complement: &Tensor,
        offsets: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let inverse = self.transmission_scale(a)?.recip()?;
        let bias_inverse = self.bias_scale(a)?.recip()?;
        Ok((signal.mul(&inverse)?, complement.mul(&inverse)?, offsets.mul(&bias_inverse)?))
    }

    fn gain_of(&self, output: usize) -> f64 {
        self.gains[output.min(self.gains.len() - 1)]
    }
}

/// Computes gains and the full scale of one layer in f64.
fn layer_mapping(index: usize, a: &NonnegAffine, granularity: GainGranularity) -> Result<LayerMapping> {
    for alpha in &a.alpha {
        if !(alpha.is_finite() && *alpha > 0.0) {
            return Err(Error::Shape(format!(
                "layer {index}: input width alpha = {alpha} cannot be mapped onto a modulator; \
                 it must be a finite number > 0"
            )));
        }
    }
    let out = a.positive.dims()[0];
    let alpha = weight_alpha(a)?;
    let p = to_rows(&a.positive, out)?;
    let n = to_rows(&a.negative, out)?;
    let bias: Vec<f64> = a.bias.to_dtype(DType::F64)?.to_vec1()?;
    let row_len = alpha.len() / out.max(1);
    let mut row_peaks = vec![0.0f64; out];
    let mut full_scale = 0.0f64;
    for i in 0..out {
        let mut reach = bias[i];
        for j in 0..row_len {
            let scale = alpha[i * row_len + j];
            let (sp, sn) = (p[i][j] * scale, n[i][j] * scale);
            if !(sp.is_finite() && sn.is_finite() && bias[i].is_finite()) {
                return Err(Error::Shape(format!(
                    "layer {index}: a parameter of output {i} is not finite, so it has no transmission"
                )));
            }
            row_peaks[i] = row_peaks[i].max(sp).max(sn);
            // The largest reading over m in [0, 1] takes the larger port.
            reach += sp.max(sn);
        }
        full_scale = full_scale.max(reach);
    }
    // A row (or layer) of zeros keeps gain 1: every transmission is 0 anyway.
    let positive_or_one = |g: f64| if g > 0.0 { g } else { 1.0 };
    let gains = match granularity {
        GainGranularity::PerLayer => vec![positive_or_one(row_peaks.iter().fold(0.0, |m, v| m.max(*v)))],
        GainGranularity::PerOutput => row_peaks.into_iter().map(positive_or_one).collect(),
    };
    Ok(LayerMapping {
        layer: index,
        gains,
        alpha: a.alpha.clone(),
        full_scale,
    })
}

fn to_rows(t: &Tensor, out: usize) -> Result<Vec<Vec<f64>>> {
    Ok(t.reshape((out, ()))?.to_dtype(DType::F64)?.to_vec2()?)
}

/// Returns the input width `alpha_j` that each weight entry reads, in the
/// row-major order of the weights, using the channel indexing of the inverse
/// transformation (grouped convolutions read channel
/// `group * group_inputs + j / receptive`).
fn weight_alpha(a: &NonnegAffine) -> Result<Vec<f64>> {
    let dims = a.positive.dims();
    let (out, group_inputs) = (dims[0], dims[1]);
    let receptive: usize = dims[2..].iter().product();
    let row_len = group_inputs * receptive;
    let groups = a.op.groups();
    if a.alpha.is_empty() || out % groups.max(1) != 0 {
        return Err(Error::Shape(format!(
            "affine layer with {out} outputs, {groups} groups and {} alpha values cannot be mapped",
            a.alpha.len()
        )));
    }
    let per_group = out / groups.max(1);
    let mut values = Vec::with_capacity(out * row_len);
    for i in 0..out {
        let group = i / per_group;
        for j in 0..row_len {
            let channel = group * group_inputs + j / receptive;
            values.push(a.alpha[channel.min(a.alpha.len() - 1)]);
        }
    }
    Ok(values)
}
