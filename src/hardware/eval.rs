//! Hardware evaluation: the physical forward pass of a non-negative network
//! with its weights realised on devices and its signals passing through
//! DACs, detectors and ADCs.

use std::sync::{Mutex, MutexGuard};

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::effects::Effects;
use super::mapping::{DeviceMapping, GainGranularity};
use crate::data::Images;
use crate::error::Result;
use crate::nonneg::{NonnegAffine, NonnegLayer, NonnegNetwork};
use crate::progress::Progress;
use crate::verify;

/// An affine layer as the devices realise it.
#[derive(Debug, Clone)]
pub struct RealisedAffine {
    /// The layer with the effective `P`, `N` of the realised transmissions.
    pub affine: NonnegAffine,
    /// The layer's modulation width `alpha` (one value or per channel).
    pub alpha: Vec<f64>,
    /// Full scale `F` of the detector readings, in units of `z'`.
    pub full_scale: f64,
}

/// A non-negative network with every affine layer realised on devices.
#[derive(Debug, Clone)]
pub struct RealisedNetwork<'a> {
    /// The ideal network; non-affine layers are taken from it.
    pub network: &'a NonnegNetwork,
    /// Realised layers, `Some` at the index of every affine layer.
    pub layers: Vec<Option<RealisedAffine>>,
    /// The effects on signals (DAC, detector, ADC).
    pub effects: Effects,
}

/// The seeded generator of the per-reading noise, shared by the forward
/// calls of one evaluation. A mutex, not a cell, so that training can run
/// the forward pass on one of rayon's threads.
#[derive(Debug)]
pub struct NoiseSource(Mutex<StdRng>);

impl NoiseSource {
    /// Wraps a generator.
    pub fn new(rng: StdRng) -> Self {
        NoiseSource(Mutex::new(rng))
    }

    /// Runs `f` with the generator, for draws outside a forward pass.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.lock())
    }

    /// Locks the generator. A panic while it was held leaves the generator
    /// in a valid (if unknown) state, so a poisoned lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, StdRng> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Settings of noise-aware training through the hardware model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HardwareTraining {
    /// The effects in the forward pass.
    pub effects: Effects,
    /// The gain granularity of the mapping.
    pub granularity: GainGranularity,
    /// Seed of the noise.
    pub seed: u64,
}

/// Realises every affine layer of `network` on devices: maps it onto
/// transmissions with `mapping`, applies the weight effects (quantisation,
/// extinction floor, weight noise drawn from `rng`) and converts back to
/// effective `P` and `N`. Autograd flows from the realised weights to
/// `network`'s parameters, with straight-through quantisation.
pub fn realise<'a>(
    network: &'a NonnegNetwork,
    mapping: &DeviceMapping,
    effects: &Effects,
    rng: &mut StdRng,
) -> Result<RealisedNetwork<'a>> {
    effects.validate()?;
    let mut layers = vec![None; network.layers.len()];
    let mapped = mapping.map(network)?;
    for ((i, a), device) in network.affine_layers().zip(mapped) {
        let m = mapping.layer(i).expect("map() checked every affine layer");
        // Even without effects the weights go through the transmissions
        // and back, so evaluation tests the mapping's rounding too.
        let signal = effects.apply_to_weights(&device.signal, rng)?;
        let complement = effects.apply_to_weights(&device.complement, rng)?;
        let (positive, negative, _) = m.parameters_of(a, &signal, &complement, &device.offsets)?;
        let mut affine = a.clone();
        affine.positive = positive;
        affine.negative = negative;
        layers[i] = Some(RealisedAffine {
            affine,
            alpha: m.alpha.clone(),
            full_scale: m.full_scale,
        });
    }
    Ok(RealisedNetwork {
        network,
        layers,
        effects: *effects,
    })
}

impl RealisedNetwork<'_> {
    /// Computes the logits for a batch of true inputs `x`, drawing detector
    /// noise from `noise`.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
    pub fn forward(&self, x: &Tensor, noise: &NoiseSource) -> Result<Tensor> {
        let mut rng = noise.lock();
        let mut v = x.affine(1.0, -self.network.input_range.lo)?;
        for (layer, realised) in self.network.layers.iter().zip(&self.layers) {
            v = match (layer, realised) {
                (NonnegLayer::Affine(_), Some(r)) => {
                    let u = self.modulate(&v, r)?;
                    let z = r.affine.forward(&u, &mut |_, _| Ok(()))?;
                    self.effects.apply_to_detector(&z, r.full_scale, &mut rng)?
                }
                (NonnegLayer::Affine(a), None) => a.forward(&v, &mut |_, _| Ok(()))?,
                (NonnegLayer::Activation(a), _) => a.forward(&v)?,
                (NonnegLayer::AvgPool2d(p), _) => v.avg_pool2d_with_stride(p.kernel, p.stride)?,
                (NonnegLayer::MaxPool2d(p), _) => v.max_pool2d_with_stride(p.kernel, p.stride)?,
                (NonnegLayer::Flatten, _) => v.flatten_from(1)?,
                (other, _) => other.forward(&v, "", &mut |_, _| Ok(()))?,
            };
        }
        Ok(v.affine(1.0, self.network.output_offset)?)
    }

    /// Passes the physical signal `u` through the modulator DACs: `m = u /
    /// alpha` is quantised and `alpha m` returned.
    fn modulate(&self, u: &Tensor, r: &RealisedAffine) -> Result<Tensor> {
        if self.effects.input_bits.is_none() {
            return Ok(u.clone());
        }
        let alpha = channel_values(&r.alpha, u)?;
        let m = u.broadcast_div(&alpha)?;
        Ok(self.effects.apply_to_inputs(&m)?.broadcast_mul(&alpha)?)
    }
}

/// Broadcasts one value or one value per channel (dimension 1) to `like`.
fn channel_values(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let t = Tensor::new(values, like.device())?.to_dtype(like.dtype())?;
    if values.len() == 1 {
        return Ok(t.reshape(())?);
    }
    let mut shape = vec![1usize; like.rank()];
    shape[1] = values.len();
    Ok(t.reshape(shape)?)
}

/// Test accuracy of a network on hardware, over noise seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareAccuracy {
    /// The seeds, one per realisation; a single entry when no effect is random.
    pub seeds: Vec<u64>,
    /// Accuracy in `[0, 1]` for each seed.
    pub accuracies: Vec<f64>,
    /// Mean of `accuracies`.
    pub mean: f64,
    /// Sample standard deviation of `accuracies` (0 for one seed).
    pub std: f64,
}

/// Evaluates `network` on `images` with the `effects`, once per seed (or
/// once when no effect is random). Each seed draws one realisation of the
/// weight noise, used for every image, and a stream of detector noise.
pub fn evaluate(
    network: &NonnegNetwork,
    granularity: GainGranularity,
    effects: &Effects,
    images: &Images,
    seeds: &[u64],
    progress: &Progress,
) -> Result<HardwareAccuracy> {
    effects.validate()?;
    let mapping = DeviceMapping::new(network, granularity)?;
    for m in &mapping.layers {
        let largest_gain = m.gains.iter().fold(0.0f64, |a, g| a.max(*g));
        tracing::debug!(layer = m.layer, full_scale = m.full_scale, largest_gain, "device mapping");
    }
    let seeds: Vec<u64> = if effects.is_random() {
        seeds.to_vec()
    } else {
        seeds.iter().take(1).copied().collect()
    };
    let mut accuracies = Vec::with_capacity(seeds.len());
    for &seed in &seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let realised = realise(network, &mapping, effects, &mut rng)?;
        let noise = NoiseSource::new(rng);
        let forward = |x: &Tensor| realised.forward(x, &noise);
        let dtype = network.dtype();
        accuracies.push(verify::accuracy(&forward, &network.input_shape, images, 1000, dtype, progress)?);
    }
    let (mean, std) = mean_and_std(&accuracies);
    Ok(HardwareAccuracy {
        seeds,
        accuracies,
        mean,
        std,
    })
}

/// Returns the mean and the sample standard deviation (0 for fewer than two values).
pub(crate) fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}
