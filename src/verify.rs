//! Equivalence of a regular network and its non-negative counterpart,
//! measured on every sample, and the non-negativity audit.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Images;
use crate::error::{Error, Result};
use crate::inspect::{self, NetworkReport, SignalStats};
use crate::model::Network;
use crate::nonneg::NonnegNetwork;
use crate::progress::Progress;

/// The precision both networks are run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// The models' own data type (f32 after training).
    #[default]
    Model,
    /// Both networks converted to f64.
    F64,
}

/// The smallest and largest value of one physical signal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerSignals {
    /// Layer index, or `None` for the input modulators.
    pub layer: Option<usize>,
    /// `modulator`, `signal`, `complement` or `output`.
    pub name: String,
    /// Smallest value over every sample.
    #[serde(with = "json_f64")]
    pub min: f64,
    /// Largest value.
    #[serde(with = "json_f64")]
    pub max: f64,
}

/// JSON has no infinity or NaN (serde_json writes them as `null`, which
/// reads back as an error): these figures are written as numbers when
/// finite and as the strings `"inf"`, `"-inf"` and `"NaN"` otherwise.
pub(crate) mod json_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        match *value {
            v if v.is_finite() => serializer.serialize_f64(v),
            v if v.is_nan() => serializer.serialize_str("NaN"),
            v if v > 0.0 => serializer.serialize_str("inf"),
            _ => serializer.serialize_str("-inf"),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        match Repr::deserialize(deserializer)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\", \"-inf\" or \"NaN\", found \"{other}\""
                ))),
            },
        }
    }
}

/// The result of running both networks on the same samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EquivalenceReport {
    /// Largest `|logit_regular - logit_nonneg|` over every sample and class,
    /// the non-negative logits taken with the output shift removed.
    #[serde(with = "json_f64")]
    pub max_abs_diff: f64,
    /// `max_abs_diff` divided by the largest `|logit_regular|` over the set.
    #[serde(with = "json_f64")]
    pub max_rel_diff: f64,
    /// Fraction of samples where both networks predict the same class.
    pub argmax_agreement: f64,
    /// Accuracy of the regular network.
    pub accuracy_original: f64,
    /// Accuracy of the non-negative network.
    pub accuracy_isomorphic: f64,
    /// Negative (or non-finite) entries in `P` and `N` of every layer.
    pub negative_weights: usize,
    /// Negative (or non-finite) entries in the stored biases.
    pub negative_biases: usize,
    /// Smallest physical signal (modulator levels, signals, complements,
    /// detector outputs, activation outputs) over every sample.
    #[serde(with = "json_f64")]
    pub min_signal: f64,
    /// Number of samples compared.
    pub samples: usize,
    /// `"f32"` or `"f64"`: the precision the comparison ran in.
    pub precision: String,
    /// Affine layers whose input signal exceeded the range `[0, alpha]`
    /// the transformation assumed, as happens for inputs outside the data
    /// range. The complement of such a signal is clipped, so the layer is
    /// not exact.
    pub range_violations: Vec<usize>,
    /// Per-layer signal extremes.
    pub layers: Vec<LayerSignals>,
    /// The function the regular model implements when it is not the network
    /// as trained, such as a ReLU network bounded by `isonn bound`: the
    /// comparison is with that network. `None` for a model as trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The data compared on: a data set's name and files, or the `.npy`
    /// inputs (and labels) by path, with their checksums. `None` when the
    /// caller does not record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::provenance::DataRecord>,
    /// The per-layer report of the non-negative network on the same
    /// samples: routing, shift, bias, full scale and swing ratio of every
    /// affine layer. `None` in reports written before it was added.
    #[serde(default)]
    pub inspection: Option<NetworkReport>,
}

impl EquivalenceReport {
    /// Returns whether the report shows an exact, physical transformation: every
    /// prediction agrees, the relative logit error is below `tolerance`,
    /// and nothing is negative.
    pub fn passes(&self, tolerance: f64) -> bool {
        self.failures(tolerance).is_empty()
    }

    /// Returns one line for each criterion the report fails.
    pub fn failures(&self, tolerance: f64) -> Vec<String> {
        let mut out = Vec::new();
        if self.argmax_agreement != 1.0 {
            out.push(format!("argmax agreement {} < 1", self.argmax_agreement));
        }
        if !(self.max_rel_diff <= tolerance) {
            out.push(format!("max_rel_diff {:.3e} above {tolerance:e}", self.max_rel_diff));
        }
        if self.negative_weights > 0 {
            out.push(format!("{} negative weights", self.negative_weights));
        }
        if self.negative_biases > 0 {
            out.push(format!("{} negative biases", self.negative_biases));
        }
        if !(self.min_signal >= 0.0) {
            out.push(format!("physical signal {:.3e} < 0 (an input below its range?)", self.min_signal));
        }
        if !self.range_violations.is_empty() {
            out.push(format!("layers {:?} received signals above their range", self.range_violations));
        }
        out
    }

    /// Formats the report as aligned lines for the terminal.
    pub fn summary(&self) -> String {
        let reference = match &self.reference {
            Some(r) => format!("reference          {r}\n"),
            None => String::new(),
        };
        format!(
            "{reference}samples            {}\n\
             precision          {}\n\
             max_abs_diff       {:.3e}\n\
             max_rel_diff       {:.3e}\n\
             argmax_agreement   {:.6}\n\
             accuracy_original  {:.4}\n\
             accuracy_isomorphic {:.4}\n\
             negative_weights   {}\n\
             negative_biases    {}\n\
             min_signal         {:.3e}\n\
             range_violations   {:?}",
            self.samples,
            self.precision,
            self.max_abs_diff,
            self.max_rel_diff,
            self.argmax_agreement,
            self.accuracy_original,
            self.accuracy_isomorphic,
            self.negative_weights,
            self.negative_biases,
            self.min_signal,
            self.range_violations
        )
    }

    /// Formats the per-layer signals of the non-negative network (shift,
    /// bias, full scale, observed `z'` and swing ratio) as a Markdown table,
    /// or returns `None` for a report without them.
    pub fn layer_table(&self) -> Option<String> {
        self.inspection
            .as_ref()
            .map(|report| inspect::format_signals(&[("", report)]))
    }
}

/// Runs `regular` and `nonneg` on every sample of `images` and compares
/// their logits, predictions and physical signals.
pub fn verify(
    regular: &Network,
    nonneg: &NonnegNetwork,
    images: &Images,
    batch_size: usize,
    precision: Precision,
    progress: &Progress,
) -> Result<EquivalenceReport> {
    if regular.input_shape != nonneg.input_shape {
        return Err(Error::Shape(format!(
            "the regular model reads {:?} inputs but the non-negative one reads {:?}; \
             pass the non-negative model made from this regular model",
            regular.input_shape, nonneg.input_shape
        )));
    }
    check_images(&regular.input_shape, images)?;
    let dtype = match precision {
        Precision::Model => regular.dtype(),
        Precision::F64 => DType::F64,
    };
    let regular = regular.to_dtype(dtype)?;
    let nonneg = nonneg.to_dtype(dtype)?;
    let (negative_weights, negative_biases) = nonneg.count_negative()?;

    let mut max_abs_diff = 0.0f64;
    let mut max_abs_logit = 0.0f64;
    let (mut agree, mut correct_regular, mut correct_nonneg) = (0usize, 0usize, 0usize);
    let mut signals: Vec<LayerSignals> = Vec::new();
    let mut stats = SignalStats::new(&nonneg);
    let bar = progress.bar(images.len() as u64, "verify");
    let indices: Vec<usize> = (0..images.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = images.batch(chunk, &Device::Cpu)?;
        let x = x.to_dtype(dtype)?;
        let a = regular.forward(&x)?;
        let b = nonneg.forward_observed(&x, &mut |layer, name, t| {
            stats.observe(layer, name, t)?;
            let min = t.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let max = t.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            match signals.iter_mut().find(|s| s.layer == layer && s.name == name) {
                Some(s) => {
                    s.min = s.min.min(min);
                    s.max = s.max.max(max);
                }
                None => signals.push(LayerSignals {
                    layer,
                    name: name.to_string(),
                    min,
                    max,
                }),
            }
            Ok(())
        })?;
        let diff = a.sub(&b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let largest = a.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        max_abs_diff = max_abs_diff.max(if diff.is_nan() { f64::INFINITY } else { diff });
        max_abs_logit = max_abs_logit.max(largest);
        let pa: Vec<u32> = a.argmax(1)?.to_vec1()?;
        let pb: Vec<u32> = b.argmax(1)?.to_vec1()?;
        let labels: Vec<u32> = y.to_vec1()?;
        for ((p, q), l) in pa.iter().zip(&pb).zip(&labels) {
            agree += (p == q) as usize;
            correct_regular += (p == l) as usize;
            correct_nonneg += (q == l) as usize;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let n = images.len().max(1) as f64;
    let min_signal = signals.iter().map(|s| s.min).fold(f64::INFINITY, f64::min);
    let range_violations = nonneg
        .affines()
        .into_iter()
        .filter(|(i, prefix, a)| {
            let alpha = a.alpha.iter().copied().fold(0.0f64, f64::max);
            let signal = format!("{prefix}signal");
            let largest = signals
                .iter()
                .find(|s| s.layer == Some(*i) && s.name == signal)
                .map_or(0.0, |s| s.max);
            // Allow the rounding of the model's precision.
            // NOTE: with per-channel ranges this compares against the widest
            // channel, so a narrow channel's overflow goes unreported.
            largest > alpha * (1.0 + 1e-5) + 1e-6
        })
        .map(|(i, _, _)| i)
        .collect();
    Ok(EquivalenceReport {
        max_abs_diff,
        max_rel_diff: if max_abs_logit > 0.0 { max_abs_diff / max_abs_logit } else { max_abs_diff },
        argmax_agreement: agree as f64 / n,
        accuracy_original: correct_regular as f64 / n,
        accuracy_isomorphic: correct_nonneg as f64 / n,
        negative_weights,
        negative_biases,
        min_signal,
        samples: images.len(),
        range_violations,
        precision: format!("{dtype:?}").to_lowercase(),
        layers: signals,
        reference: None,
        data: None,
        inspection: Some(inspect::report(&nonneg, Some(&stats))?),
    })
}

/// Checks that the images have the shape a model reads.
pub fn check_images(input_shape: &[usize], images: &Images) -> Result<()> {
    let shape = images.sample_shape();
    if input_shape != shape.as_slice() {
        return Err(Error::Shape(format!(
            "the model reads samples of shape {input_shape:?} but the data set has {shape:?}; \
             use the data set the model was trained on"
        )));
    }
    if images.is_empty() {
        return Err(Error::Shape("the data set has no samples to compare".into()));
    }
    Ok(())
}

/// Returns the fraction of `images` that `logits_of` classifies correctly.
pub fn accuracy(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    input_shape: &[usize],
    images: &Images,
    batch_size: usize,
    dtype: DType,
    progress: &Progress,
) -> Result<f64> {
    check_images(input_shape, images)?;
    let bar = progress.bar(images.len() as u64, "evaluate");
    let indices: Vec<usize> = (0..images.len()).collect();
    let mut correct = 0usize;
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = images.batch(chunk, &Device::Cpu)?;
        let predicted = logits_of(&x.to_dtype(dtype)?)?.argmax(1)?;
        let hits = predicted.eq(&y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        correct += hits as usize;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(correct as f64 / images.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_figures_survive_json() {
        let report = EquivalenceReport {
            max_abs_diff: f64::INFINITY,
            max_rel_diff: f64::NAN,
            argmax_agreement: 0.5,
            accuracy_original: 0.5,
            accuracy_isomorphic: 0.25,
            negative_weights: 0,
            negative_biases: 0,
            min_signal: f64::NEG_INFINITY,
            samples: 4,
            precision: "f32".into(),
            range_violations: vec![],
            layers: vec![LayerSignals { layer: Some(1), name: "signal".into(), min: -0.5, max: f64::INFINITY }],
            reference: None,
            data: None,
            inspection: None,
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#""max_abs_diff":"inf""#), "{text}");
        let back: EquivalenceReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back.max_abs_diff, f64::INFINITY);
        assert!(back.max_rel_diff.is_nan());
        assert_eq!(back.min_signal, f64::NEG_INFINITY);
        assert_eq!((back.layers[0].min, back.layers[0].max), (-0.5, f64::INFINITY));
        let wrong = text.replace(r#""max_abs_diff":"inf""#, r#""max_abs_diff":"large""#);
        let error = serde_json::from_str::<EquivalenceReport>(&wrong).unwrap_err().to_string();
        assert!(error.contains("found \"large\""), "{error}");
    }
}
