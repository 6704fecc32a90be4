//! Samples to verify an imported network on when no labelled data set is
//! given: user inputs from a `.npy` file, or values drawn from the input
//! range. Their labels are the regular network's predictions, so the
//! accuracies of a report on them measure agreement with that network.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::data::Images;
use crate::error::{Error, Result};
use crate::model::Network;
use crate::store::Model;

/// Reads float inputs `[n, channels, height, width]` for `network` from a
/// `.npy` file, labelled with the network's predictions.
pub fn images_from_npy(path: &Path, network: &Network) -> Result<Images> {
    let mut data = super::user_data::UserData::read_inputs(path, &network.input_shape)?;
    data.label_with(network)?;
    Ok(data.images)
}

/// Computes the logits of `model` on the inputs in `data`, read from
/// `path` (named in errors), in batches of 256; returns the number of
/// inputs and the logits, row-major `[n, classes]`.
pub fn predict(model: &Model, data: &super::tensor::TensorData, path: &Path) -> Result<(usize, Vec<f32>)> {
    let shape = model.input_shape();
    let [n, sample @ ..] = data.dims.as_slice() else {
        return Err(Error::data(path, "the array is a scalar; save inputs as [n, channels, height, width]"));
    };
    if sample != shape {
        return Err(Error::data(
            path,
            format!("the array has shape {:?} but the model reads [n, {}]; save the inputs in that layout", data.dims, join(shape)),
        ));
    }
    let per_sample: usize = shape.iter().product();
    super::user_data::check_finite(&data.values, per_sample).map_err(|m| Error::data(path, m))?;
    let mut logits = Vec::new();
    for start in (0..*n).step_by(256) {
        let count = (n - start).min(256);
        let values = &data.values[start * per_sample..(start + count) * per_sample];
        let mut dims = vec![count];
        dims.extend_from_slice(shape);
        let x = Tensor::from_slice(values, dims, &Device::Cpu)?.to_dtype(model.dtype())?;
        let y = model.forward(&x)?.to_dtype(candle_core::DType::F32)?.flatten_all()?;
        logits.extend(y.to_vec1::<f32>()?);
    }
    Ok((*n, logits))
}

fn join(dims: &[usize]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// Draws `n` samples uniformly from the network's input range (per
/// channel where it has channel ranges), one value in seven at a bound.
pub fn uniform_images(network: &Network, n: usize, seed: u64) -> Result<Images> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ranges = network.input_ranges();
    let per_channel: usize = network.input_shape[1..].iter().product();
    let mut pixels = Vec::with_capacity(n * network.input_shape.iter().product::<usize>());
    for _ in 0..n {
        for c in 0..network.input_shape[0] {
            let range = ranges[c.min(ranges.len() - 1)];
            for i in 0..per_channel {
                let v = match i % 7 {
                    0 => range.lo,
                    1 => range.hi,
                    _ => rng.gen_range(range.lo..=range.hi),
                };
                pixels.push(v as f32);
            }
        }
    }
    labelled(network, n, pixels)
}

fn labelled(network: &Network, n: usize, pixels: Vec<f32>) -> Result<Images> {
    let [channels, rows, cols] = network.input_shape[..] else {
        return Err(Error::Shape(format!("expected a [c, h, w] input shape, got {:?}", network.input_shape)));
    };
    let labels = predictions(network, &pixels, n)?;
    Ok(Images {
        n,
        channels,
        rows,
        cols,
        pixels,
        labels,
        normalisation: None,
    })
}

/// Returns the class `network` predicts for each of the `n` samples in
/// `pixels` (`[n, c, h, w]`, row-major), in batches of 256.
pub fn predictions(network: &Network, pixels: &[f32], n: usize) -> Result<Vec<u8>> {
    let [channels, rows, cols] = network.input_shape[..] else {
        return Err(Error::Shape(format!("expected a [c, h, w] input shape, got {:?}", network.input_shape)));
    };
    check_label_classes(network).map_err(Error::Shape)?;
    let mut labels = Vec::with_capacity(n);
    let per_sample = channels * rows * cols;
    for start in (0..n).step_by(256) {
        let count = (n - start).min(256);
        let x = Tensor::from_slice(&pixels[start * per_sample..(start + count) * per_sample], (count, channels, rows, cols), &Device::Cpu)?
            .to_dtype(network.dtype())?;
        let predicted: Vec<u32> = network.forward(&x)?.argmax(1)?.to_vec1()?;
        for p in predicted {
            labels.push(u8::try_from(p).map_err(|_| Error::Shape(format!("class {p} does not fit isonn's 8-bit labels")))?);
        }
    }
    Ok(labels)
}

/// Most classes whose indices fit isonn's 8-bit labels.
pub const MAX_LABEL_CLASSES: usize = 256;

/// Checks that the predictions of `network` fit isonn's 8-bit labels,
/// which a verification on unlabelled inputs uses as its labels.
pub fn check_label_classes(network: &Network) -> std::result::Result<(), String> {
    let classes: usize = network.output_shape().map_err(|e| e.to_string())?.iter().product();
    if classes > MAX_LABEL_CLASSES {
        return Err(format!(
            "the model has {classes} classes, but isonn labels unlabelled inputs with the model's \
             predictions as 8-bit class indices, which allow at most {MAX_LABEL_CLASSES} classes; \
             compare the models' outputs with `isonn predict` on each model instead"
        ));
    }
    Ok(())
}
