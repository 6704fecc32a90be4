//! Bounds for unbounded activations: every ReLU of a regular network is
//! replaced by a ReLU-N, `min(max(z, 0), N)`, and every GELU by a GELU-N,
//! `min(gelu(z), N)`, so that the transformation has an input range for the
//! next layer.
//!
//! The bound is either fixed by the user ([`BoundMode::Fixed`]) or
//! calibrated on data ([`BoundMode::Calibrate`]): the largest activation
//! output seen, or a percentile of them, times `1 + margin`, for the whole
//! layer or for each channel. A bounded network computes a different
//! function from the unbounded one wherever an output exceeds its bound, so
//! [`bound_network`] reports that clip rate on the calibration and the test
//! images, and the accuracy of both networks.
//!
//! Per-channel bounds are carried by the weights ([`apply_bounds`]): ReLU-N
//! is positively homogeneous, `min(max(z, 0), N) = N min(max(z / N, 0), 1)`,
//! so the layer keeps a single ReLU-1. GELU is not, so its bounds are per
//! layer only.

mod calibrate;
mod rescale;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use calibrate::{calibrate, clip_rates, forward_clipped, ClipRates, LayerClipRate};
pub use rescale::{apply_bounds, check_per_channel, Rescaling};


use crate::data::Images;
use crate::error::{Error, Result};
use crate::fsio;
use crate::model::{Layer, Network};
use crate::progress::Progress;

/// File name of the bound record in a bounded model directory.
pub const BOUND_JSON: &str = "bound.json";
/// The `format` tag of every `bound.json`.
pub const FORMAT: &str = "isonn-bound";
/// The schema version of `bound.json` this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The statistic of the pre-activations that a calibrated bound starts from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Statistic {
    /// The largest value seen.
    Max,
    /// The nearest-rank percentile `P` in `(0, 100]`: with the `n` values
    /// sorted ascending, the value of rank `ceil(P / 100 * n)`, so at most a
    /// fraction `1 - P / 100` of the values lies above it. `P = 100` is the
    /// maximum.
    Percentile(f64),
}

impl fmt::Display for Statistic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statistic::Max => f.write_str("max"),
            Statistic::Percentile(p) => write!(f, "percentile:{p}"),
        }
    }
}

impl FromStr for Statistic {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "max" {
            return Ok(Statistic::Max);
        }
        let Some(text) = s.strip_prefix("percentile:") else {
            return Err(Error::config("--calibrate", s, "expected max or percentile:P, e.g. percentile:99.9"));
        };
        match text.parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => Ok(Statistic::Percentile(p)),
            _ => Err(Error::config(
                "--calibrate",
                s,
                "the percentile P of percentile:P must be a number with 0 < P <= 100, e.g. percentile:99.9",
            )),
        }
    }
}

impl From<Statistic> for String {
    fn from(statistic: Statistic) -> String {
        statistic.to_string()
    }
}

impl TryFrom<String> for Statistic {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// Whether a calibrated layer gets one bound or one bound per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// One bound for every value of the layer.
    Layer,
    /// One bound per channel: per output channel after a convolution, per
    /// unit after a linear layer.
    Channel,
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Granularity::Layer => "layer",
            Granularity::Channel => "channel",
        })
    }
}

/// The rule that sets the bound of each ReLU layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum BoundMode {
    /// Every ReLU becomes ReLU-N with the same `n`.
    Fixed {
        /// The bound `N`, > 0.
        n: f64,
    },
    /// Each bound is `statistic * (1 + margin)` of the pre-activations the
    /// ReLU network produces on calibration images.
    Calibrate {
        /// The statistic of the pre-activations.
        statistic: Statistic,
        /// Relative margin, >= 0.
        margin: f64,
        /// One bound per layer or per channel.
        granularity: Granularity,
    },
}

impl BoundMode {
    /// Checks the parameters, naming the offending flag and value.
    pub fn validate(&self) -> Result<()> {
        match *self {
            BoundMode::Fixed { n } if !(n.is_finite() && n > 0.0) => Err(Error::config(
                "--relu-n",
                n,
                "the bound N must be a finite number > 0, e.g. --relu-n 6",
            )),
            BoundMode::Calibrate { margin, .. } if !(margin.is_finite() && margin >= 0.0) => Err(
                Error::config("--margin", margin, "the margin must be a finite number >= 0, e.g. --margin 0.05"),
            ),
            BoundMode::Calibrate {
                statistic: Statistic::Percentile(p),
                ..
            } if !(p > 0.0 && p <= 100.0) => Err(Error::config(
                "--calibrate",
                Statistic::Percentile(p),
                "the percentile P must satisfy 0 < P <= 100",
            )),
            _ => Ok(()),
        }
    }

    /// Describes the network a bounded model implements, for the
    /// equivalence report: "bounded network (ReLU and GELU replaced by ...)".
    pub fn reference(&self) -> String {
        match self {
            BoundMode::Fixed { n } => {
                format!("bounded network (ReLU and GELU replaced by ReLU-N and GELU-N with N = {n})")
            }
            BoundMode::Calibrate {
                statistic,
                margin,
                granularity,
            } => {
                let statistic = match statistic {
                    Statistic::Max => "max".to_string(),
                    Statistic::Percentile(p) => format!("percentile {p}"),
                };
                format!(
                    "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N, calibrated \
                     {statistic} per {granularity}, margin {margin})"
                )
            }
        }
    }
}

/// The bounds of one unbounded activation layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerBounds {
    /// Index of the top-level layer that is, or contains, the activation.
    pub layer: usize,
    /// Path of the activation layer: `layers.{i}` at the top level,
    /// `layers.{i}.main.{j}` or `layers.{i}.shortcut.{j}` inside a residual
    /// block, as the tensors of `model.safetensors` are named.
    pub path: String,
    /// One bound for the whole layer, or one per channel. Every bound is
    /// finite and > 0.
    pub bounds: Vec<f64>,
    /// Channels whose calibrated statistic was not positive (the unit never
    /// fired on the calibration images) and that got the largest bound of
    /// their layer instead.
    pub fallback_channels: Vec<usize>,
}

impl LayerBounds {
    /// Returns whether the layer has one bound per channel.
    pub fn is_per_channel(&self) -> bool {
        self.bounds.len() > 1
    }

    /// Returns the bounds as a tensor that broadcasts against the layer's
    /// pre-activations `z`: `[1, C]` for `[batch, C]`, `[1, C, 1, 1]` for
    /// `[batch, C, h, w]`, and a single value for a per-layer bound.
    pub fn broadcastable(&self, z: &Tensor) -> Result<Tensor> {
        let mut shape = vec![1usize; z.rank()];
        if self.is_per_channel() {
            shape[1] = self.bounds.len();
        }
        let t = Tensor::from_vec(self.bounds.clone(), shape, z.device())?;
        Ok(t.to_dtype(z.dtype())?)
    }
}

/// An unbounded activation layer (ReLU or GELU) of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Index of the top-level layer that is, or contains, the activation.
    pub layer: usize,
    /// Path of the activation layer, as [`LayerBounds::path`].
    pub path: String,
}

impl Site {
    /// Returns whether the activation is a top-level layer, not one inside
    /// a residual block.
    pub fn is_top_level(&self) -> bool {
        self.path == top_level_path(self.layer)
    }
}

/// Returns the path of top-level layer `i`.
pub fn top_level_path(i: usize) -> String {
    format!("layers.{i}")
}

/// Returns the unbounded activation layers (ReLU or GELU) of `network` in
/// the order the forward pass meets them, including those inside residual
/// blocks.
pub fn unbounded_sites(network: &Network) -> Vec<Site> {
    fn walk(layers: &[Layer], top: Option<usize>, prefix: &str, sites: &mut Vec<Site>) {
        for (i, layer) in layers.iter().enumerate() {
            let path = format!("{prefix}.{i}");
            let top = top.unwrap_or(i);
            match layer {
                Layer::Activation(a) if a.is_unbounded() => sites.push(Site { layer: top, path }),
                other => {
                    for (name, chain) in other.chains() {
                        walk(chain, Some(top), &format!("{path}.{name}"), sites);
                    }
                }
            }
        }
    }
    let mut sites = Vec::new();
    walk(&network.layers, None, "layers", &mut sites);
    sites
}

/// Returns the layer at `path` (as [`LayerBounds::path`]) of `layers`, or
/// `None` when no layer has that path.
pub fn layer_at_mut<'a>(layers: &'a mut [Layer], path: &str) -> Option<&'a mut Layer> {
    let mut steps = path.strip_prefix("layers.")?.split('.');
    let mut layer = layers.get_mut(steps.next()?.parse::<usize>().ok()?)?;
    while let Some(name) = steps.next() {
        let index = steps.next()?.parse::<usize>().ok()?;
        let chain = layer.chains_mut().into_iter().find(|(n, _)| *n == name)?.1;
        layer = chain.get_mut(index)?;
    }
    Some(layer)
}

/// Returns the indices of the top-level layers that are an unbounded
/// activation (ReLU or GELU); activations inside residual blocks are in
/// [`unbounded_sites`].
pub fn relu_layers(network: &Network) -> Vec<usize> {
    unbounded_sites(network)
        .into_iter()
        .filter(Site::is_top_level)
        .map(|site| site.layer)
        .collect()
}

/// Rejects a network without an unbounded activation: there is nothing to
/// bound.
pub fn check_has_relu(network: &Network) -> Result<Vec<Site>> {
    let sites = unbounded_sites(network);
    if sites.is_empty() {
        return Err(Error::config(
            "model",
            "without relu or gelu layers",
            "bounding replaces ReLU and GELU activations and this network has none; \
             its activations are bounded already, so transform it directly",
        ));
    }
    Ok(sites)
}

/// Returns the bound `n` for every ReLU layer of `network`.
pub fn fixed_bounds(network: &Network, n: f64) -> Result<Vec<LayerBounds>> {
    BoundMode::Fixed { n }.validate()?;
    Ok(check_has_relu(network)?
        .into_iter()
        .map(|site| LayerBounds {
            layer: site.layer,
            path: site.path,
            bounds: vec![n],
            fallback_channels: Vec::new(),
        })
        .collect())
}

/// One bounded activation layer in `bound.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Index of the top-level layer that is, or contains, the activation.
    pub layer: usize,
    /// Path of the activation layer, as [`LayerBounds::path`]; records
    /// written before nested layers could be bounded have none, and their
    /// activation is the top-level layer `layer`.
    #[serde(default)]
    pub path: String,
    /// `layer` for one bound, `channel` for one bound per channel.
    pub granularity: Granularity,
    /// The bound of the layer, or the bound of each channel.
    pub bounds: Vec<f64>,
    /// Channels that never fired on the calibration images and got the
    /// layer's largest bound.
    pub fallback_channels: Vec<usize>,
    /// The layers whose weights carry the per-channel bounds.
    pub rescaling: Option<Rescaling>,
    /// Clip rate on the calibration images.
    pub calibration: LayerClipRate,
    /// Clip rate on the test images.
    pub test: LayerClipRate,
}

/// The contents of `bound.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoundRecord {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`SCHEMA_VERSION`] when written by this build.
    pub schema_version: u32,
    /// The mode and its parameters.
    pub mode: BoundMode,
    /// Description of the network the bounded model implements.
    pub reference: String,
    /// Number of calibration images: the first images of the training split.
    pub calibration_samples: usize,
    /// Number of test images the clip rates and accuracies are measured on.
    pub test_samples: usize,
    /// The ReLU layers, in network order.
    pub layers: Vec<LayerRecord>,
    /// Fraction of all ReLU pre-activation values above their bound on the
    /// calibration images.
    pub clip_rate_calibration: f64,
    /// The same on the test images.
    pub clip_rate_test: f64,
    /// Test accuracy of the unbounded ReLU network.
    pub accuracy_unbounded: f64,
    /// Test accuracy of the bounded network.
    pub accuracy_bounded: f64,
}

impl BoundRecord {
    /// Writes the record to `dir/bound.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fsio::write_json_atomic(&dir.join(BOUND_JSON), self)
    }

    /// Reads `dir/bound.json`, or returns `None` when the model directory has
    /// none (a model that was not bounded).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(BOUND_JSON);
        if !path.exists() {
            return Ok(None);
        }
        let record: BoundRecord = fsio::read_json(&path, BOUND_JSON)?;
        if record.format != FORMAT || record.schema_version != SCHEMA_VERSION {
            return Err(Error::data(
                &path,
                format!(
                    "format {:?} version {}, but this build reads format {FORMAT:?} version {SCHEMA_VERSION}; \
                     run `isonn bound` again",
                    record.format, record.schema_version
                ),
            ));
        }
        Ok(Some(record))
    }
}

/// A bounded network with its record.
#[derive(Debug, Clone)]
pub struct Bounded {
    /// The network with every ReLU replaced by ReLU-N; per-channel bounds
    /// are folded into the weights and the layer uses ReLU-1.
    pub network: Network,
    /// The bounds of each ReLU layer, before folding.
    pub bounds: Vec<LayerBounds>,
    /// The contents of `bound.json`.
    pub record: BoundRecord,
}

/// Samples per forward pass of calibration and clip counting.
pub const BATCH_SIZE: usize = 256;

/// Bounds every ReLU and GELU of `network` as `mode` sets, calibrating on
/// `calibration` when the mode calibrates, and measures the clip rates on
/// `calibration` and `test` and the test accuracy of both networks.
pub fn bound_network(
    network: &Network,
    mode: &BoundMode,
    calibration: &Images,
    test: &Images,
    progress: &Progress,
) -> Result<Bounded> {
    mode.validate()?;
    check_has_relu(network)?;
    let bounds = match *mode {
        BoundMode::Fixed { n } => fixed_bounds(network, n)?,
        BoundMode::Calibrate {
            statistic,
            margin,
            granularity,
        } => calibrate(network, calibration, statistic, margin, granularity, BATCH_SIZE)?,
    };
    for b in &bounds {
        tracing::info!(
            "{}: {} bound(s), min {:.4}, max {:.4}, {} fallback channel(s)",
            b.path,
            b.bounds.len(),
            b.bounds.iter().copied().fold(f64::INFINITY, f64::min),
            b.bounds.iter().copied().fold(0.0, f64::max),
            b.fallback_channels.len()
        );
    }
    let (bounded, rescalings) = apply_bounds(network, &bounds)?;
    let on_calibration = clip_rates(network, &bounds, calibration, BATCH_SIZE)?;
    let on_test = clip_rates(network, &bounds, test, BATCH_SIZE)?;

    let dtype = network.dtype();
    let unbounded_logits = |x: &Tensor| network.forward(x);
    let bounded_logits = |x: &Tensor| bounded.forward(x);
    let shape = &network.input_shape;
    let accuracy_unbounded = crate::verify::accuracy(&unbounded_logits, shape, test, BATCH_SIZE, dtype, progress)?;
    let accuracy_bounded = crate::verify::accuracy(&bounded_logits, shape, test, BATCH_SIZE, dtype, progress)?;

    let layers = bounds
        .iter()
        .zip(&on_calibration.layers)
        .zip(&on_test.layers)
        .map(|((b, c), t)| LayerRecord {
            layer: b.layer,
            path: b.path.clone(),
            granularity: if b.is_per_channel() { Granularity::Channel } else { Granularity::Layer },
            bounds: b.bounds.clone(),
            fallback_channels: b.fallback_channels.clone(),
            rescaling: rescalings.iter().find(|r| b.is_per_channel() && r.layer == b.layer).cloned(),
            calibration: c.clone(),
            test: t.clone(),
        })
        .collect();
    let record = BoundRecord {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        mode: *mode,
        reference: mode.reference(),
        calibration_samples: calibration.len(),
        test_samples: test.len(),
        layers,
        clip_rate_calibration: on_calibration.rate,
        clip_rate_test: on_test.rate,
        accuracy_unbounded,
        accuracy_bounded,
    };
    Ok(Bounded {
        network: bounded,
        bounds,
        record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistic_parses_and_rejects() {
        assert_eq!("max".parse::<Statistic>().unwrap(), Statistic::Max);
        assert_eq!("percentile:99.9".parse::<Statistic>().unwrap(), Statistic::Percentile(99.9));
        assert_eq!("percentile:100".parse::<Statistic>().unwrap(), Statistic::Percentile(100.0));
        for bad in ["percentile:0", "percentile:101", "percentile:-5", "percentile:nan", "percentile:", "min"] {
            let message = bad.parse::<Statistic>().unwrap_err().to_string();
            assert!(message.contains(bad), "{message}");
            assert!(message.contains("--calibrate"), "{message}");
        }
    }

    #[test]
    fn statistic_round_trips_json() {
        for statistic in [Statistic::Max, Statistic::Percentile(99.9)] {
            let text = serde_json::to_string(&statistic).unwrap();
            assert_eq!(serde_json::from_str::<Statistic>(&text).unwrap(), statistic);
        }
        assert!(serde_json::from_str::<Statistic>("\"percentile:0\"").is_err());
    }

    #[test]
    fn mode_validation_names_flag() {
        let cases = [
            (BoundMode::Fixed { n: -1.0 }, "--relu-n -1"),
            (BoundMode::Fixed { n: 0.0 }, "--relu-n 0"),
            (BoundMode::Fixed { n: f64::INFINITY }, "--relu-n inf"),
            (
                BoundMode::Calibrate {
                    statistic: Statistic::Max,
                    margin: -0.1,
                    granularity: Granularity::Layer,
                },
                "--margin -0.1",
            ),
        ];
        for (mode, expected) in cases {
            let message = mode.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn reference_names_mode() {
        let calibrated = BoundMode::Calibrate {
            statistic: Statistic::Max,
            margin: 0.05,
            granularity: Granularity::Channel,
        };
        assert_eq!(
            calibrated.reference(),
            "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N, calibrated max per channel, \
             margin 0.05)"
        );
        assert_eq!(
            BoundMode::Fixed { n: 4.0 }.reference(),
            "bounded network (ReLU and GELU replaced by ReLU-N and GELU-N with N = 4)"
        );
    }
}
