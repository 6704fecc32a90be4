//! Accuracy sweeps over one device parameter, with their Markdown, JSON and
//! PNG reports.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::effects::{Effects, MAX_BITS};
use super::eval::{evaluate, HardwareAccuracy};
use super::mapping::GainGranularity;
use crate::data::Images;
use crate::error::{Error, Result};
use crate::nonneg::NonnegNetwork;
use crate::progress::Progress;
use crate::{fsio, report};

/// Points of a real-valued sweep without an explicit `:steps`.
pub const DEFAULT_STEPS: usize = 6;
/// Largest accepted number of sweep points.
pub const MAX_STEPS: usize = 1000;

/// The device parameter a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepParameter {
    /// DAC bits.
    InputBits,
    /// Bits of the transmission settings.
    WeightBits,
    /// ADC bits.
    AdcBits,
    /// Extinction ratio in dB.
    ExtinctionDb,
    /// Weight noise relative to full transmission.
    WeightNoise,
    /// Additive detector noise relative to full scale.
    DetectorNoise,
    /// Shot-like detector noise at full scale.
    ShotNoise,
}

impl SweepParameter {
    const ALL: [SweepParameter; 7] = [
        SweepParameter::InputBits,
        SweepParameter::WeightBits,
        SweepParameter::AdcBits,
        SweepParameter::ExtinctionDb,
        SweepParameter::WeightNoise,
        SweepParameter::DetectorNoise,
        SweepParameter::ShotNoise,
    ];

    /// Returns the name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            SweepParameter::InputBits => "input-bits",
            SweepParameter::WeightBits => "weight-bits",
            SweepParameter::AdcBits => "adc-bits",
            SweepParameter::ExtinctionDb => "extinction-db",
            SweepParameter::WeightNoise => "weight-noise",
            SweepParameter::DetectorNoise => "detector-noise",
            SweepParameter::ShotNoise => "shot-noise",
        }
    }

    /// Returns the axis label with the unit.
    pub fn axis_label(self) -> &'static str {
        match self {
            SweepParameter::InputBits => "DAC bits",
            SweepParameter::WeightBits => "weight bits",
            SweepParameter::AdcBits => "ADC bits",
            SweepParameter::ExtinctionDb => "extinction ratio (dB)",
            SweepParameter::WeightNoise => "weight noise (std, fraction of full transmission)",
            SweepParameter::DetectorNoise => "detector noise (std, fraction of full scale)",
            SweepParameter::ShotNoise => "shot-like noise (std at full scale, fraction)",
        }
    }

    fn is_bits(self) -> bool {
        matches!(self, SweepParameter::InputBits | SweepParameter::WeightBits | SweepParameter::AdcBits)
    }

    /// Returns `base` with this parameter set to `value`.
    pub fn apply(self, base: &Effects, value: f64) -> Effects {
        let mut e = *base;
        match self {
            SweepParameter::InputBits => e.input_bits = Some(value as u32),
            SweepParameter::WeightBits => e.weight_bits = Some(value as u32),
            SweepParameter::AdcBits => e.adc_bits = Some(value as u32),
            SweepParameter::ExtinctionDb => e.extinction_db = Some(value),
            SweepParameter::WeightNoise => e.weight_noise = value,
            SweepParameter::DetectorNoise => e.detector_noise = value,
            SweepParameter::ShotNoise => e.shot_noise = value,
        }
        e
    }
}

/// A parameter and the values it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// The swept parameter.
    pub parameter: SweepParameter,
    /// The values, in order.
    pub values: Vec<f64>,
}

impl FromStr for Sweep {
    type Err = Error;

    /// Parses `NAME=A..B` (every integer from `A` to `B` for bit widths, or
    /// [`DEFAULT_STEPS`] evenly spaced values otherwise) or `NAME=A..B:STEPS`.
    fn from_str(text: &str) -> Result<Self> {
        let names: Vec<&str> = SweepParameter::ALL.iter().map(|p| p.name()).collect();
        let usage = format!(
            "expected NAME=A..B or NAME=A..B:STEPS with NAME one of {}, e.g. weight-bits=2..8 or \
             detector-noise=0..0.05:6",
            names.join(", ")
        );
        let invalid = |why: &str| Error::config("--sweep", text, format!("{why}; {usage}"));
        let (name, range) = text.split_once('=').ok_or_else(|| invalid("missing '='"))?;
        let parameter = SweepParameter::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| invalid(&format!("unknown parameter {name:?}")))?;
        let (range, steps) = match range.split_once(':') {
            Some((r, s)) => {
                let steps: usize = s.parse().map_err(|_| invalid(&format!("steps {s:?} is not a whole number")))?;
                (r, Some(steps))
            }
            None => (range, None),
        };
        let (a, b) = range.split_once("..").ok_or_else(|| invalid("missing '..'"))?;
        let parse = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite());
        let (Some(start), Some(end)) = (parse(a), parse(b)) else {
            return Err(invalid("the bounds must be finite numbers"));
        };
        if start > end {
            return Err(invalid("the first bound must not exceed the second"));
        }
        let values: Vec<f64> = if parameter.is_bits() && steps.is_none() {
            if start.fract() != 0.0 || end.fract() != 0.0 || start < 1.0 || end > MAX_BITS as f64 {
                return Err(invalid(&format!("bit widths must be whole numbers from 1 to {MAX_BITS}")));
            }
            (start as u32..=end as u32).map(f64::from).collect()
        } else {
            let steps = steps.unwrap_or(DEFAULT_STEPS);
            if !(1..=MAX_STEPS).contains(&steps) || (steps == 1 && start != end) {
                return Err(invalid(&format!(
                    "steps must be from 2 to {MAX_STEPS} (or 1 when both bounds are equal)"
                )));
            }
            let mut values: Vec<f64> = (0..steps)
                .map(|k| if steps == 1 { start } else { start + (end - start) * k as f64 / (steps - 1) as f64 })
                .map(round_to_significant)
                .collect();
            if parameter.is_bits() {
                values = values.iter().map(|v| v.round()).collect();
                values.dedup();
            }
            values
        };
        for v in &values {
            parameter.apply(&Effects::default(), *v).validate().map_err(|e| invalid(&e.to_string()))?;
        }
        Ok(Sweep { parameter, values })
    }
}

/// Rounds to 12 significant digits, so that `0..0.05:6` gives 0.03 and
/// not 0.030000000000000006.
fn round_to_significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(11 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// The accuracy of one swept value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The parameter's value.
    pub value: f64,
    /// Accuracy over the seeds.
    pub accuracy: HardwareAccuracy,
}

/// The sweep of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSeries {
    /// Label of the model (its directory name on the command line).
    pub label: String,
    /// Accuracy without any effect: the ideal non-negative network.
    pub ideal_accuracy: f64,
    /// One point per swept value.
    pub points: Vec<SweepPoint>,
}

/// A finished sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// The swept parameter and its values.
    pub sweep: Sweep,
    /// The other effects, fixed during the sweep.
    pub base_effects: Effects,
    /// The gain granularity of the mapping.
    pub granularity: GainGranularity,
    /// The noise seeds.
    pub seeds: Vec<u64>,
    /// Test images evaluated per point and seed.
    pub test_images: usize,
    /// One series per model.
    pub series: Vec<SweepSeries>,
}

/// Evaluates every model at every swept value.
pub fn run_sweep(
    models: &[(String, NonnegNetwork)],
    base: &Effects,
    sweep: &Sweep,
    granularity: GainGranularity,
    images: &Images,
    seeds: &[u64],
    progress: &Progress,
) -> Result<SweepReport> {
    let mut series = Vec::with_capacity(models.len());
    for (label, network) in models {
        let ideal = evaluate(network, granularity, &Effects::default(), images, &[0], progress)?;
        let mut points = Vec::with_capacity(sweep.values.len());
        for &value in &sweep.values {
            let effects = sweep.parameter.apply(base, value);
            let accuracy = evaluate(network, granularity, &effects, images, seeds, progress)?;
            tracing::info!(
                "{label}: {}={value} accuracy {:.4} +- {:.4} over {} seed(s)",
                sweep.parameter.name(),
                accuracy.mean,
                accuracy.std,
                accuracy.accuracies.len()
            );
            points.push(SweepPoint { value, accuracy });
        }
        series.push(SweepSeries {
            label: label.clone(),
            ideal_accuracy: ideal.mean,
            points,
        });
    }
    Ok(SweepReport {
        sweep: sweep.clone(),
        base_effects: *base,
        granularity,
        seeds: seeds.to_vec(),
        test_images: images.len(),
        series,
    })
}

impl SweepReport {
    /// Renders the table: one row per value, one mean ± std column per model.
    pub fn to_markdown(&self) -> String {
        let name = self.sweep.parameter.name();
        let mut out = format!("| {name} |");
        let mut rule = String::from("|---:|");
        for s in &self.series {
            out.push_str(&format!(" {} accuracy (%) |", s.label));
            rule.push_str("---:|");
        }
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        for (k, value) in self.sweep.values.iter().enumerate() {
            out.push_str(&format!("| {value} |"));
            for s in &self.series {
                let a = &s.points[k].accuracy;
                out.push_str(&format!(" {:.2} ± {:.2} |", 100.0 * a.mean, 100.0 * a.std));
            }
            out.push('\n');
        }
        out.push_str("| ideal |");
        for s in &self.series {
            out.push_str(&format!(" {:.2} |", 100.0 * s.ideal_accuracy));
        }
        out.push('\n');
        out
    }

    /// Writes `sweep.json`, `sweep.md` and `sweep.png` into `dir`.
    pub fn write(&self, dir: &Path, title: &str) -> Result<()> {
        fsio::create_dir_all(dir)?;
        fsio::write_json_atomic(&dir.join("sweep.json"), self)?;
        fsio::write_atomic(&dir.join("sweep.md"), self.to_markdown().as_bytes())?;
        let series: Vec<report::Series> = self
            .series
            .iter()
            .map(|s| report::Series {
                label: s.label.clone(),
                points: s.points.iter().map(|p| (p.value, 100.0 * p.accuracy.mean)).collect(),
            })
            .collect();
        let references: Vec<(String, f64)> = self
            .series
            .iter()
            .map(|s| (format!("ideal: {}", s.label), 100.0 * s.ideal_accuracy))
            .collect();
        report::line_chart(
            &dir.join("sweep.png"),
            title,
            self.sweep.parameter.axis_label(),
            "test accuracy (%)",
            &series,
            &references,
        )
    }
}
