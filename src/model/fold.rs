//! Folding batch normalisation into the adjacent affine layer.
//!
//! At inference a normalisation is the per-channel map `y = g x + beta`
//! with `g = weight / sqrt(var + eps)` and `beta = bias - g mean`
//! ([`BatchNorm::inference_affine`]). After an affine layer `z = W x + b` it
//! folds into `W' = diag(g) W`, `b' = g b + beta`; before one it folds into
//! `W' = W diag(g)`, `b' = b + W beta`. Both are exact. A zero-padded
//! convolution after the normalisation pads `y` with 0, which is the input
//! `x = -beta / g`, so the folded convolution pads channel `c` with
//! `-beta_c / g_c` ([`Conv2d::pad_value`](super::Conv2d::pad_value), and
//! likewise for [`Conv1d`](super::Conv1d)).

use candle_core::{DType, Tensor};

use super::{BatchNorm, Conv1d, Conv2d, Layer, Network};
use crate::error::{Error, Result};

/// Returns `network` with every batch normalisation folded into the affine
/// layer it follows or, failing that, the one it precedes, inside residual
/// branches too. A normalisation with no adjacent linear or convolution
/// layer in its chain is an error that names it.
pub fn fold_batchnorm(network: &Network) -> Result<Network> {
    let mut out = network.detached();
    out.layers = fold_chain(&out.layers, "layers")?;
    let mut count = 0;
    network.visit(&mut |_, layer| count += matches!(layer, Layer::BatchNorm(_)) as usize);
    if count > 0 {
        tracing::info!("folded {count} batch normalisations into the adjacent affine layers");
    }
    Ok(out)
}

fn fold_chain(layers: &[Layer], path: &str) -> Result<Vec<Layer>> {
    let mut out: Vec<Layer> = Vec::with_capacity(layers.len());
    let mut pending: Option<(usize, BatchNorm)> = None;
    for (i, layer) in layers.iter().enumerate() {
        let mut layer = layer.clone();
        for (name, chain) in layer.chains_mut() {
            *chain = fold_chain(chain, &format!("{path}.{i}.{name}"))?;
        }
        if let Some((index, bn)) = pending.take() {
            if layer.weight_and_bias().is_none() {
                return Err(unfoldable(path, index, &format!("it is followed by a {} layer", layer.kind())));
            }
            fold_before(&bn, &mut layer).map_err(|m| unfoldable(path, index, &m))?;
            out.push(layer);
            continue;
        }
        match layer {
            Layer::BatchNorm(bn) => match out.last_mut() {
                Some(previous) if previous.weight_and_bias().is_some() => {
                    fold_after(&bn, previous).map_err(|m| unfoldable(path, i, &m))?;
                }
                _ => pending = Some((i, bn)),
            },
            other => out.push(other),
        }
    }
    if let Some((index, _)) = pending {
        return Err(unfoldable(path, index, "no linear or convolution layer is next to it"));
    }
    Ok(out)
}

fn unfoldable(path: &str, index: usize, reason: &str) -> Error {
    Error::Transform {
        layer: index,
        message: format!(
            "{path}.{index} (batch-norm) cannot be folded: {reason}. A normalisation must sit \
             directly before or after a linear or convolution layer, with no pooling or \
             activation between them"
        ),
    }
}

/// Folds `bn` into the affine layer before it: `W' = diag(g) W`, `b' = g b + beta`.
fn fold_after(bn: &BatchNorm, layer: &mut Layer) -> std::result::Result<(), String> {
    let (scale, offset) = bn.inference_affine().map_err(|e| e.to_string())?;
    let (weight, bias) = layer.weight_and_bias_mut().expect("the caller checked for an affine layer");
    let out_units = weight.dims()[0];
    if out_units != scale.len() {
        return Err(format!("it normalises {} channels, the layer produces {out_units}", scale.len()));
    }
    let mut run = || -> Result<()> {
        let dtype = weight.dtype();
        let mut rows: Vec<Vec<f64>> = weight.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
        let mut b: Vec<f64> = bias.to_dtype(DType::F64)?.to_vec1()?;
        for (i, row) in rows.iter_mut().enumerate() {
            row.iter_mut().for_each(|w| *w *= scale[i]);
            b[i] = scale[i] * b[i] + offset[i];
        }
        let flat: Vec<f64> = rows.concat();
        *weight = Tensor::from_vec(flat, weight.dims(), weight.device())?.to_dtype(dtype)?;
        *bias = Tensor::new(b.as_slice(), bias.device())?.to_dtype(dtype)?;
        Ok(())
    };
    run().map_err(|e| e.to_string())
}

/// Folds `bn` into the affine layer after it: `W' = W diag(g)`,
/// `b' = b + W beta`, where input entry `j` of row `i` reads the channel
/// of its group (per feature for a linear layer).
fn fold_before(bn: &BatchNorm, layer: &mut Layer) -> std::result::Result<(), String> {
    let (scale, offset) = bn.inference_affine().map_err(|e| e.to_string())?;
    match layer {
        Layer::Conv2d(Conv2d { padding, pad_value, .. }) | Layer::Conv1d(Conv1d { padding, pad_value, .. })
            if *padding > 0 =>
        {
            *pad_value = input_pad(pad_value, &scale, &offset)?;
        }
        _ => {}
    }
    let groups = match layer {
        Layer::Conv2d(c) => c.groups,
        Layer::Conv1d(c) => c.groups,
        _ => 1,
    };
    let (weight, bias) = layer.weight_and_bias_mut().expect("the caller checked for an affine layer");
    let dims = weight.dims().to_vec();
    let (out_units, group_inputs) = (dims[0], dims[1]);
    if group_inputs * groups != scale.len() {
        return Err(format!(
            "it normalises {} channels, the layer reads {}",
            scale.len(),
            group_inputs * groups
        ));
    }
    let receptive: usize = dims[2..].iter().product();
    let mut run = || -> Result<()> {
        let dtype = weight.dtype();
        let mut rows: Vec<Vec<f64>> = weight.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
        let mut b: Vec<f64> = bias.to_dtype(DType::F64)?.to_vec1()?;
        for (i, row) in rows.iter_mut().enumerate() {
            let group = i / (out_units / groups);
            for (j, w) in row.iter_mut().enumerate() {
                let channel = group * group_inputs + j / receptive;
                b[i] += *w * offset[channel];
                *w *= scale[channel];
            }
        }
        let flat: Vec<f64> = rows.concat();
        *weight = Tensor::from_vec(flat, dims.as_slice(), weight.device())?.to_dtype(dtype)?;
        *bias = Tensor::new(b.as_slice(), bias.device())?.to_dtype(dtype)?;
        Ok(())
    };
    run().map_err(|e| e.to_string())
}

/// Returns the inputs `x_c = (v_c - offset_c) / scale_c` that the
/// normalisation maps to the padding values `v` (zeros when empty).
fn input_pad(values: &[f64], scale: &[f64], offset: &[f64]) -> std::result::Result<Vec<f64>, String> {
    (0..scale.len())
        .map(|c| {
            let v = if values.is_empty() { 0.0 } else { values[c.min(values.len() - 1)] };
            let (g, beta) = (scale[c], offset[c]);
            if g == 0.0 {
                // The channel is the constant beta, so any input gives a
                // pad equal to beta and no input gives another pad.
                return if beta == v {
                    Ok(0.0)
                } else {
                    Err(format!(
                        "channel {c} has scale 0, so no input gives the padded convolution's pad {v}"
                    ))
                };
            }
            Ok((v - beta) / g)
        })
        .collect()
}
