//! The non-ideal effects of photonic devices, as tensor operations that keep
//! autograd working: quantisation passes its gradient straight through, and
//! noise is drawn from a seeded generator and added as a constant.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest accepted bit width of a DAC, weight setting or ADC.
pub const MAX_BITS: u32 = 24;

/// The device effects applied during hardware evaluation, each off when
/// `None` or 0. Every noise level is a standard deviation relative to the
/// full scale of the quantity it perturbs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Effects {
    /// Bits of the modulator DACs: levels `k / (2^b - 1)` of the modulation.
    pub input_bits: Option<u32>,
    /// Bits of each transmission setting: levels `k / (2^b - 1)`.
    pub weight_bits: Option<u32>,
    /// Bits of the detector ADCs, over `[0, F]` with `F` the layer's full scale.
    pub adc_bits: Option<u32>,
    /// Extinction ratio of a weight element in dB: a setting of 0 transmits
    /// `10^(-ER/10)`.
    pub extinction_db: Option<f64>,
    /// Standard deviation of the Gaussian error of each transmission, as a
    /// fraction of full transmission (1).
    pub weight_noise: f64,
    /// Standard deviation of the additive Gaussian detector noise, as a
    /// fraction of the layer's full scale `F`.
    pub detector_noise: f64,
    /// Shot-like noise: a reading `z` gets a standard deviation of
    /// `shot_noise * sqrt(F z)`, which is `shot_noise * F` at full scale.
    pub shot_noise: f64,
}

impl Effects {
    /// Rejects bit widths outside `1..=MAX_BITS`, a non-positive or
    /// non-finite extinction ratio and negative or non-finite noise levels.
    /// The error names the command-line option, e.g. `--weight-bits`.
    pub fn validate(&self) -> Result<()> {
        match self.first_invalid() {
            Some(invalid) => Err(Error::config(
                format!("--{}", invalid.field.replace('_', "-")),
                invalid.value,
                invalid.reason,
            )),
            None => Ok(()),
        }
    }

    /// Returns the first setting that [`validate`](Self::validate) rejects,
    /// named by its field (`weight_bits`), or `None` when all are valid.
    pub fn first_invalid(&self) -> Option<InvalidEffect> {
        let bits = [
            ("input_bits", self.input_bits),
            ("weight_bits", self.weight_bits),
            ("adc_bits", self.adc_bits),
        ];
        for (field, value) in bits {
            if let Some(b) = value {
                if !(1..=MAX_BITS).contains(&b) {
                    let reason = format!("must be between 1 and {MAX_BITS} bits");
                    return Some(InvalidEffect { field, value: b.to_string(), reason });
                }
            }
        }
        if let Some(db) = self.extinction_db {
            if !(db.is_finite() && db > 0.0) {
                let reason = "must be a finite ratio > 0 dB, e.g. 30".to_string();
                return Some(InvalidEffect { field: "extinction_db", value: db.to_string(), reason });
            }
        }
        let noises = [
            ("weight_noise", self.weight_noise),
            ("detector_noise", self.detector_noise),
            ("shot_noise", self.shot_noise),
        ];
        for (field, value) in noises {
            if !(value.is_finite() && value >= 0.0) {
                let reason = "must be a finite standard deviation >= 0, relative to full scale".to_string();
                return Some(InvalidEffect { field, value: value.to_string(), reason });
            }
        }
        None
    }

    /// Returns `true` when no effect is switched on.
    pub fn is_ideal(&self) -> bool {
        *self == Effects::default()
    }

    /// Returns `true` when an effect draws random numbers, so that results
    /// depend on the seed.
    pub fn is_random(&self) -> bool {
        self.weight_noise > 0.0 || self.detector_noise > 0.0 || self.shot_noise > 0.0
    }

    /// Returns the transmission of a weight element set to 0,
    /// `10^(-ER/10)`, or 0 without an extinction ratio.
    pub fn extinction_floor(&self) -> f64 {
        self.extinction_db.map_or(0.0, |db| 10f64.powf(-db / 10.0))
    }

    /// Applies the weight effects to transmissions `t` in `[0, 1]`: the
    /// setting is quantised to `weight_bits`, the element transmits
    /// `floor + (1 - floor) t`, and Gaussian noise is added and clipped to
    /// the passive range `[0, 1]`.
    pub fn apply_to_weights(&self, t: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
        let mut t = t.clone();
        if let Some(bits) = self.weight_bits {
            t = quantise(&t, bits)?;
        }
        let floor = self.extinction_floor();
        if floor > 0.0 {
            t = t.affine(1.0 - floor, floor)?;
        }
        if self.weight_noise > 0.0 {
            let noise = standard_normal_like(&t, rng)?.affine(self.weight_noise, 0.0)?;
            t = t.add(&noise)?.clamp(0.0, 1.0)?;
        }
        Ok(t)
    }

    /// Applies the detector effects to readings `z` of a layer whose full
    /// scale is `full_scale`: additive and shot-like noise, then the ADC,
    /// which clips to `[0, full_scale]` and quantises to `adc_bits`.
    pub fn apply_to_detector(&self, z: &Tensor, full_scale: f64, rng: &mut StdRng) -> Result<Tensor> {
        let mut z = z.clone();
        if self.detector_noise > 0.0 {
            let noise = standard_normal_like(&z, rng)?.affine(self.detector_noise * full_scale, 0.0)?;
            z = z.add(&noise)?;
        }
        if self.shot_noise > 0.0 {
            // Standard deviation shot_noise * sqrt(F z), with z >= 0 for the
            // square root; the noise is a constant for autograd.
            let sigma = z
                .detach()
                .relu()?
                .affine(full_scale, 0.0)?
                .sqrt()?
                .affine(self.shot_noise, 0.0)?;
            z = z.add(&standard_normal_like(&z, rng)?.mul(&sigma)?)?;
        }
        if let Some(bits) = self.adc_bits {
            if full_scale > 0.0 {
                let level = quantise(&z.affine(1.0 / full_scale, 0.0)?, bits)?;
                z = level.affine(full_scale, 0.0)?;
            }
        }
        Ok(z)
    }

    /// Applies the DAC to modulation levels `m`: clips to `[0, 1]` and
    /// quantises to `input_bits`; the identity when the DAC is ideal.
    pub fn apply_to_inputs(&self, m: &Tensor) -> Result<Tensor> {
        match self.input_bits {
            Some(bits) => quantise(m, bits),
            None => Ok(m.clone()),
        }
    }
}

/// An effect setting that [`Effects::validate`] rejects.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidEffect {
    /// The field of [`Effects`], e.g. `weight_bits`.
    pub field: &'static str,
    /// The rejected value, as written.
    pub value: String,
    /// The range it must lie in.
    pub reason: String,
}

/// Clips `x` to `[0, 1]` and rounds it to the nearest of the `2^bits` levels
/// `k / (2^bits - 1)`. The gradient passes straight through the rounding
/// (and is zero where the clip is active).
pub fn quantise(x: &Tensor, bits: u32) -> Result<Tensor> {
    let levels = ((1u64 << bits) - 1) as f64;
    let clipped = x.clamp(0.0, 1.0)?;
    let rounded = clipped.affine(levels, 0.0)?.round()?.affine(1.0 / levels, 0.0)?;
    Ok(clipped.add(&rounded.sub(&clipped)?.detach())?)
}

/// Draws a tensor of independent standard normal values with the shape,
/// dtype and device of `like`.
pub fn standard_normal_like(like: &Tensor, rng: &mut StdRng) -> Result<Tensor> {
    let n = like.elem_count();
    let values: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    let t = Tensor::from_vec(values, like.shape(), like.device())?;
    Ok(if like.dtype() == DType::F64 { t } else { t.to_dtype(like.dtype())? })
}
