//! Per-layer report of a non-negative network: how each weight is routed,
//! the shift and bias of every layer, the detector's full scale and, on
//! data, the physical signals the detectors and modulators see.
//!
//! # Swing ratio
//!
//! A detector is scaled to the largest signal it receives, and the
//! common-mode offset (the bias `c + s` and the complement terms) fills the
//! bottom of that range on every sample. For unit `i` (an output feature of
//! a linear layer, or an output channel of a convolution pooled over all
//! positions, because the positions share the channel's bias) the report
//! takes, over every sample,
//!
//! ```text
//! hi_i = max z'_i,   lo_i = min z'_i,   r_i = (hi_i - lo_i) / hi_i
//! ```
//!
//! `r_i` is the fraction of the detector's range that the signal swings
//! through, and `1 - r_i = lo_i / hi_i` is the fraction the common-mode
//! floor takes. A layer reports the mean of `r_i` over its units with
//! `hi_i > 0` and the smallest `r_i` (the worst detector). The input
//! modulators use the same formula on `v = x - lo`, one unit per input
//! channel.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Images;
use crate::error::Result;
use crate::nonneg::{transform, AffineOp, NonnegAffine, NonnegNetwork, ShiftPolicy, TransformOptions};
use crate::progress::Progress;
use crate::store::Model;
use crate::verify::json_f64;

/// Label of the input modulators in the report.
pub const MODULATOR_LABEL: &str = "input";

/// Returns the label of the layer at `index`, the key of its report row.
pub fn layer_label(index: usize) -> String {
    format!("layers.{index}")
}

/// The smallest and largest of a set of values (per-channel settings, or
/// the entries of a bias vector).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Span {
    /// Returns the span of `values`, or `[0, 0]` when there are none.
    pub fn of(values: &[f64]) -> Span {
        if values.is_empty() {
            return Span { min: 0.0, max: 0.0 };
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Span { min, max }
    }
}

/// Counts of the entries of `W = P - N` by route: the modulator's signal
/// port (non-zero in `P`), its complement port (non-zero in `N`), or
/// neither (zero in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightRouting {
    /// Non-zero entries of `P`.
    pub signal: usize,
    /// Non-zero entries of `N`.
    pub complement: usize,
    /// Entries that are zero in both `P` and `N`.
    pub zero: usize,
    /// Entries non-zero in both, which projected SGD can produce; 0 after
    /// the transformation, whose `P` and `N` have disjoint support.
    pub both: usize,
    /// Entries of `P` (equal to those of `N`):
    /// `signal + complement + zero - both`.
    pub total: usize,
}

/// Settings of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSettings {
    /// Step between output positions.
    pub stride: usize,
    /// Pixels added on every side (conv2d), or samples at both ends of
    /// each row (conv1d).
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
}

/// The physical signal of one layer over the samples; see the module
/// documentation for the swing ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Largest value over every unit and sample, `max z'`.
    #[serde(with = "json_f64")]
    pub max: f64,
    /// Smallest value over every unit and sample, `min z'`.
    #[serde(with = "json_f64")]
    pub min: f64,
    /// Mean of `r_i = (max z'_i - min z'_i) / max z'_i` over the units
    /// with `max z'_i > 0`; `None` when no unit was lit.
    pub swing_ratio: Option<f64>,
    /// Smallest `r_i`, the detector whose range the common mode fills most.
    pub swing_ratio_min: Option<f64>,
    /// `max / full scale`: the share of the interval-arithmetic bound that
    /// the data reaches.
    pub full_scale_use: Option<f64>,
    /// Number of units (detectors or modulators).
    pub units: usize,
    /// Units whose signal stayed at 0 on every sample, left out of the
    /// swing figures.
    pub dark_units: usize,
}

/// Figures of one non-negative affine layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Row key: the parameter path of the layer (`layers.3`, or `layers.4.main.0` inside a block).
    pub label: String,
    /// `linear`, `conv2d` or `conv1d`.
    pub kind: String,
    /// Weight shape: `[out, in]` or `[out, in / groups, k, k]`.
    pub shape: Vec<usize>,
    /// Convolution settings; `None` for a linear layer.
    pub conv: Option<ConvSettings>,
    /// Lower bound `lo` of the true input, over its channels.
    pub input_lo: Span,
    /// Width `alpha` of the input range, over its channels.
    pub input_alpha: Span,
    /// Number of stored `lo` values: 1 for one range per layer, else one
    /// per input channel.
    pub input_channels: usize,
    /// Activation shift `s`; the true output is `z' - s`.
    pub shift: f64,
    /// Routing of the weights.
    pub weights: WeightRouting,
    /// Stored bias `c + s` over the units.
    pub bias: Span,
    /// Detector full scale: `max_i alpha * sum_j |W_ij| + (c_i + s)`, the
    /// interval-arithmetic bound on `z'`.
    pub full_scale: f64,
    /// The detector signal `z'` on data, when data was given.
    pub observed: Option<Observed>,
}

/// Figures of the input modulators, which emit `v = x - lo` in `[0, alpha]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModulatorReport {
    /// Row key, [`MODULATOR_LABEL`].
    pub label: String,
    /// Lower bound of the true input.
    pub lo: f64,
    /// Width of the input range, the modulators' full scale.
    pub alpha: f64,
    /// The modulator level `v` on data, when data was given.
    pub observed: Option<Observed>,
}

/// The per-layer report of one non-negative network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// Samples the observed figures cover (0 without data).
    pub samples: usize,
    /// The input modulators.
    pub modulators: ModulatorReport,
    /// One entry per affine layer, in order.
    pub layers: Vec<LayerReport>,
}

/// The report of a network made with one shift policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// The policy; `None` when the model does not record it.
    pub policy: Option<ShiftPolicy>,
    /// The figures.
    pub network: NetworkReport,
}

/// The report `isonn inspect --json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InspectReport {
    /// The model directory.
    pub model: String,
    /// `regular` or `nonneg`.
    pub kind: String,
    /// The data set the signals were observed on, if any.
    pub dataset: Option<String>,
    /// One report per shift policy: `minimal` then `published` for a
    /// regular model, the model's own for a non-negative one.
    pub policies: Vec<PolicyReport>,
}

/// Per-unit extremes of one signal over the samples seen so far.
#[derive(Debug, Clone, Default)]
struct UnitExtremes {
    min: Vec<f64>,
    max: Vec<f64>,
}

/// Accumulates, from the observer of
/// [`NonnegNetwork::forward_observed`], the per-unit extremes of the
/// modulator levels and of every affine layer's output `z'`.
#[derive(Debug, Clone)]
pub struct SignalStats {
    /// Top-level index and signal-name prefix of every affine layer.
    affine: Vec<(usize, String)>,
    signals: HashMap<Option<(usize, String)>, UnitExtremes>,
    samples: usize,
}

impl SignalStats {
    /// Starts empty statistics for `network`.
    pub fn new(network: &NonnegNetwork) -> Self {
        SignalStats {
            affine: network.affines().into_iter().map(|(i, prefix, _)| (i, prefix)).collect(),
            signals: HashMap::new(),
            samples: 0,
        }
    }

    /// Records one observed signal; signals other than the modulator
    /// levels and the affine outputs are ignored.
    ///
    /// # Shapes
    /// `t`: `[batch, units]` or `[batch, channels, h, w]`.
    pub fn observe(&mut self, layer: Option<usize>, name: &str, t: &Tensor) -> Result<()> {
        let key = match layer {
            None if name == "modulator" => None,
            Some(i) => {
                let found = self.affine.iter().find(|(j, prefix)| *j == i && name.strip_prefix(prefix.as_str()) == Some("output"));
                match found {
                    Some(key) => Some(key.clone()),
                    None => return Ok(()),
                }
            }
            None => return Ok(()),
        };
        if key.is_none() {
            self.samples += t.dims()[0];
        }
        let (min, max) = unit_extremes(t)?;
        let entry = self.signals.entry(key).or_default();
        if entry.min.is_empty() {
            *entry = UnitExtremes { min, max };
            return Ok(());
        }
        for (old, new) in entry.min.iter_mut().zip(&min) {
            *old = old.min(*new);
        }
        for (old, new) in entry.max.iter_mut().zip(&max) {
            *old = old.max(*new);
        }
        Ok(())
    }

    /// Returns the number of samples observed.
    pub fn samples(&self) -> usize {
        self.samples
    }
}

/// Returns the minimum and maximum of each unit (dimension 1) over every
/// other dimension.
fn unit_extremes(t: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut low, mut high) = (t.clone(), t.clone());
    for dim in (2..t.rank()).rev() {
        low = low.min(dim)?;
        high = high.max(dim)?;
    }
    let low = low.min(0)?.to_dtype(DType::F64)?.to_vec1()?;
    let high = high.max(0)?.to_dtype(DType::F64)?.to_vec1()?;
    Ok((low, high))
}

/// Summarises per-unit extremes, with `full_scale` the bound of the signal.
fn summarise(extremes: &UnitExtremes, full_scale: f64) -> Observed {
    let max = extremes.max.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = extremes.min.iter().copied().fold(f64::INFINITY, f64::min);
    let ratios: Vec<f64> = extremes
        .min
        .iter()
        .zip(&extremes.max)
        .filter(|(_, &hi)| hi > 0.0)
        .map(|(&lo, &hi)| (hi - lo) / hi)
        .collect();
    let swing_ratio = (!ratios.is_empty()).then(|| ratios.iter().sum::<f64>() / ratios.len() as f64);
    let swing_ratio_min = ratios.iter().copied().reduce(f64::min);
    Observed {
        max,
        min,
        swing_ratio,
        swing_ratio_min,
        full_scale_use: (full_scale > 0.0).then(|| max / full_scale),
        units: extremes.max.len(),
        dark_units: extremes.max.len() - ratios.len(),
    }
}

/// Counts where the weights of `layer` are routed.
fn weight_routing(layer: &NonnegAffine) -> Result<WeightRouting> {
    let p: Vec<f64> = layer.positive.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let n: Vec<f64> = layer.negative.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let mut routing = WeightRouting {
        signal: 0,
        complement: 0,
        zero: 0,
        both: 0,
        total: p.len(),
    };
    for (&pj, &nj) in p.iter().zip(&n) {
        match (pj != 0.0, nj != 0.0) {
            (true, true) => {
                routing.signal += 1;
                routing.complement += 1;
                routing.both += 1;
            }
            (true, false) => routing.signal += 1,
            (false, true) => routing.complement += 1,
            (false, false) => routing.zero += 1,
        }
    }
    Ok(routing)
}

/// Builds the figures of one affine layer.
fn layer_report(label: String, layer: &NonnegAffine, observed: Option<Observed>) -> Result<LayerReport> {
    let (kind, conv) = match layer.op {
        AffineOp::Linear => ("linear", None),
        AffineOp::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => (
            "conv2d",
            Some(ConvSettings {
                stride,
                padding,
                dilation,
                groups,
            }),
        ),
        AffineOp::Conv1d {
            stride,
            padding,
            dilation,
            groups,
        } => (
            "conv1d",
            Some(ConvSettings {
                stride,
                padding,
                dilation,
                groups,
            }),
        ),
    };
    let bias: Vec<f64> = layer.bias.to_dtype(DType::F64)?.to_vec1()?;
    Ok(LayerReport {
        label,
        kind: kind.into(),
        shape: layer.positive.dims().to_vec(),
        conv,
        input_lo: Span::of(&layer.lo),
        input_alpha: Span::of(&layer.alpha),
        input_channels: layer.lo.len().max(layer.alpha.len()),
        shift: layer.shift,
        weights: weight_routing(layer)?,
        bias: Span::of(&bias),
        full_scale: layer.out_max,
        observed,
    })
}

/// Builds the report of `network`, with the observed figures from `stats`
/// when given.
pub fn report(network: &NonnegNetwork, stats: Option<&SignalStats>) -> Result<NetworkReport> {
    let observed = |layer: Option<(usize, String)>, full_scale: f64| {
        stats
            .and_then(|s| s.signals.get(&layer))
            .map(|e| summarise(e, full_scale))
    };
    let alpha = network.input_range.width();
    let modulators = ModulatorReport {
        label: MODULATOR_LABEL.into(),
        lo: network.input_range.lo,
        alpha,
        observed: observed(None, alpha),
    };
    let mut layers = Vec::new();
    for ((i, prefix, layer), (path, _)) in network.affines().into_iter().zip(network.affine_paths()) {
        layers.push(layer_report(path, layer, observed(Some((i, prefix)), layer.out_max))?);
    }
    Ok(NetworkReport {
        samples: stats.map_or(0, SignalStats::samples),
        modulators,
        layers,
    })
}

/// Builds the report of `network`, running it on every sample of `images`
/// (in batches of `batch_size`, in the network's data type) when given.
pub fn inspect(
    network: &NonnegNetwork,
    images: Option<&Images>,
    batch_size: usize,
    progress: &Progress,
) -> Result<NetworkReport> {
    let Some(images) = images else {
        return report(network, None);
    };
    crate::verify::check_images(&network.input_shape, images)?;
    let dtype = network.dtype();
    let mut stats = SignalStats::new(network);
    let bar = progress.bar(images.len() as u64, "inspect");
    let indices: Vec<usize> = (0..images.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, _) = images.batch(chunk, &Device::Cpu)?;
        let x = x.to_dtype(dtype)?;
        network.forward_observed(&x, &mut |layer, name, t| stats.observe(layer, name, t))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    report(network, Some(&stats))
}

/// Returns the shift policy recorded in a model's provenance by
/// `isonn transform`, if any.
pub fn recorded_policy(provenance: &serde_json::Value) -> Option<ShiftPolicy> {
    let shift = provenance.get("transform")?.get("shift")?;
    serde_json::from_value(shift.clone()).ok()
}

/// Builds the reports of a model directory's contents: a regular model is
/// transformed in memory with each shift policy (activation ranges as in
/// [`TransformOptions::default`]), a non-negative one is reported as it is,
/// with the policy its provenance records.
pub fn inspect_model(
    model: &Model,
    provenance: &serde_json::Value,
    images: Option<&Images>,
    batch_size: usize,
    progress: &Progress,
) -> Result<Vec<PolicyReport>> {
    match model {
        Model::Regular(network) => {
            let mut out = Vec::new();
            for policy in [ShiftPolicy::Minimal, ShiftPolicy::Published] {
                let options = TransformOptions {
                    shift: policy,
                    ..TransformOptions::default()
                };
                let nonneg = transform(network, &options)?;
                out.push(PolicyReport {
                    policy: Some(policy),
                    network: inspect(&nonneg, images, batch_size, progress)?,
                });
            }
            Ok(out)
        }
        Model::Nonneg(network) => Ok(vec![PolicyReport {
            policy: recorded_policy(provenance),
            network: inspect(network, images, batch_size, progress)?,
        }]),
    }
}

/// Formats a value with about four significant digits.
fn format_value(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() || v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.3e}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// Formats a span as one value, or `min..max` when they differ.
fn format_span(span: Span) -> String {
    if span.min == span.max {
        format_value(span.min)
    } else {
        format!("{}..{}", format_value(span.min), format_value(span.max))
    }
}

fn format_option(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), format_value)
}

/// Formats the kind and shape of a layer, e.g. `conv2d 32x1x3x3 s2 p1`.
fn format_kind(layer: &LayerReport) -> String {
    let shape: Vec<String> = layer.shape.iter().map(usize::to_string).collect();
    let mut text = format!("{} {}", layer.kind, shape.join("x"));
    if let Some(c) = layer.conv {
        text.push_str(&format!(" s{} p{}", c.stride, c.padding));
        if c.dilation != 1 {
            text.push_str(&format!(" d{}", c.dilation));
        }
        if c.groups != 1 {
            text.push_str(&format!(" g{}", c.groups));
        }
    }
    text
}

/// Formats the structure of a network as a Markdown table: kind and shape,
/// input range and weight routing of every affine layer. These figures do
/// not depend on the shift policy.
pub fn format_structure(report: &NetworkReport) -> String {
    let mut out = String::from(
        "| layer | kind | input lo | input alpha | P (signal) | N (complement) | zero | weights |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let m = &report.modulators;
    out.push_str(&format!(
        "| {} | modulators | {} | {} | - | - | - | - |\n",
        m.label,
        format_value(m.lo),
        format_value(m.alpha)
    ));
    for layer in &report.layers {
        let w = &layer.weights;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            layer.label,
            format_kind(layer),
            format_span(layer.input_lo),
            format_span(layer.input_alpha),
            w.signal,
            w.complement,
            w.zero,
            w.total
        ));
    }
    out
}

/// Formats the shift, bias, full scale and observed signals of one or more
/// reports of the same network as a Markdown table, the rows of each layer
/// next to each other. The policy column is left out when every name is
/// empty.
pub fn format_signals(reports: &[(&str, &NetworkReport)]) -> String {
    let named = reports.iter().any(|(name, _)| !name.is_empty());
    let header = "| shift s | bias c + s | full scale | max z' | min z' | swing ratio | worst swing | max / full scale |";
    let mut out = String::new();
    if named {
        out.push_str(&format!("| layer | policy {header}\n| --- | --- "));
    } else {
        out.push_str(&format!("| layer {header}\n| --- "));
    }
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let row = |label: &str, name: &str, cells: [String; 8]| {
        let policy = if named { format!(" {name} |") } else { String::new() };
        format!("| {label} |{policy} {} |\n", cells.join(" | "))
    };
    let observed_cells = |o: Option<&Observed>| match o {
        Some(o) => [
            format_value(o.max),
            format_value(o.min),
            format_option(o.swing_ratio),
            format_option(o.swing_ratio_min),
            format_option(o.full_scale_use),
        ],
        None => std::array::from_fn(|_| "-".to_string()),
    };
    for (name, report) in reports {
        let m = &report.modulators;
        let [max, min, swing, worst, used] = observed_cells(m.observed.as_ref());
        let cells = ["-".into(), "-".into(), format_value(m.alpha), max, min, swing, worst, used];
        out.push_str(&row(&m.label, name, cells));
    }
    let layer_count = reports.first().map_or(0, |(_, r)| r.layers.len());
    for index in 0..layer_count {
        for (name, report) in reports {
            let Some(layer) = report.layers.get(index) else {
                continue;
            };
            let [max, min, swing, worst, used] = observed_cells(layer.observed.as_ref());
            let cells = [
                format_value(layer.shift),
                format_span(layer.bias),
                format_value(layer.full_scale),
                max,
                min,
                swing,
                worst,
                used,
            ];
            out.push_str(&row(&layer.label, name, cells));
        }
    }
    out
}

/// Returns the name of a policy as the command line spells it, or
/// `not recorded`.
pub fn policy_name(policy: Option<ShiftPolicy>) -> &'static str {
    match policy {
        Some(ShiftPolicy::Minimal) => "minimal",
        Some(ShiftPolicy::Published) => "published",
        None => "not recorded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::model::{Layer, Linear, Network, Range};

    /// Tolerance of the f64 comparisons: the hand values are exact decimal
    /// fractions, so only f64 rounding separates the two sides.
    const TOLERANCE: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= TOLERANCE * (1.0 + b.abs())
    }

    fn tensor(values: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// `x in [0, 1]^2 -> linear 2->2 -> relu-1 -> linear 2->1`, in f64, with
    /// `W1 = [[1, -2], [0, 0.5]]`, `b1 = [0.5, 0.25]`, `W2 = [[2, -1]]`,
    /// `b2 = [0.25]`.
    fn hand_network() -> Network {
        Network {
            input_shape: vec![1, 1, 2],
            input_range: Range { lo: 0.0, hi: 1.0 },
            channel_ranges: Vec::new(),
            layers: vec![
                Layer::Flatten,
                Layer::Linear(Linear {
                    weight: tensor(&[1.0, -2.0, 0.0, 0.5], &[2, 2]),
                    bias: tensor(&[0.5, 0.25], &[2]),
                }),
                Layer::Activation(Activation::ReluN { n: 1.0 }),
                Layer::Linear(Linear {
                    weight: tensor(&[2.0, -1.0], &[1, 2]),
                    bias: tensor(&[0.25], &[1]),
                }),
            ],
        }
    }

    /// Returns the four samples `[1, 0]`, `[0, 1]`, `[0.5, 0.5]`, `[1, 1]`.
    fn hand_inputs() -> Tensor {
        tensor(&[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 1.0], &[4, 1, 1, 2])
    }

    fn observed_report(policy: ShiftPolicy) -> NetworkReport {
        let options = TransformOptions {
            shift: policy,
            ..TransformOptions::default()
        };
        let nonneg = transform(&hand_network(), &options).unwrap();
        let mut stats = SignalStats::new(&nonneg);
        nonneg
            .forward_observed(&hand_inputs(), &mut |layer, name, t| stats.observe(layer, name, t))
            .unwrap();
        report(&nonneg, Some(&stats)).unwrap()
    }

    #[test]
    fn routing_counts_match_weights() {
        let report = observed_report(ShiftPolicy::Minimal);
        let first = report.layers[0].weights;
        assert_eq!((first.signal, first.complement, first.zero, first.both), (2, 1, 1, 0));
        assert_eq!(first.total, 4);
        let second = report.layers[1].weights;
        assert_eq!((second.signal, second.complement, second.zero, second.both), (1, 1, 0, 0));
        assert_eq!(second.total, 2);
        assert_eq!(report.layers[0].label, "layers.1");
        assert_eq!(report.layers[1].label, "layers.3");
        assert_eq!(report.layers[0].kind, "linear");
        assert_eq!(report.layers[0].shape, vec![2, 2]);
    }

    /// Layer 1: `c = b - alpha N 1 = [0.5 - 2, 0.25] = [-1.5, 0.25]`.
    /// Minimal: `s = 1.5 + 0.01 * 1.5 = 1.515`, bias `[0.015, 1.765]`, full
    /// scale `max(3 + 0.015, 0.5 + 1.765) = 3.015`. Published: `s = 1.5`,
    /// bias `[0, 1.75]`, full scale 3. Layer 3 reads `relu-1` outputs in
    /// `[0, 1]`: `c = 0.25 - 1 = -0.75`; minimal `s = 0.7575`, bias 0.0075,
    /// full scale 3.0075; published `s = 0.75`, bias 0, full scale 3.
    #[test]
    fn shift_bias_and_full_scale_match_hand_values() {
        let cases = [
            (ShiftPolicy::Minimal, [1.515, 0.7575], [(0.015, 1.765), (0.0075, 0.0075)], [3.015, 3.0075]),
            (ShiftPolicy::Published, [1.5, 0.75], [(0.0, 1.75), (0.0, 0.0)], [3.0, 3.0]),
        ];
        for (policy, shifts, biases, full_scales) in cases {
            let report = observed_report(policy);
            for (k, layer) in report.layers.iter().enumerate() {
                assert!(close(layer.shift, shifts[k]), "{policy:?} {}: shift {}", layer.label, layer.shift);
                assert!(close(layer.bias.min, biases[k].0), "{policy:?} {}: bias {:?}", layer.label, layer.bias);
                assert!(close(layer.bias.max, biases[k].1), "{policy:?} {}: bias {:?}", layer.label, layer.bias);
                assert!(
                    close(layer.full_scale, full_scales[k]),
                    "{policy:?} {}: full scale {}",
                    layer.label,
                    layer.full_scale
                );
                assert_eq!(layer.input_lo, Span { min: 0.0, max: 0.0 });
                assert_eq!(layer.input_alpha, Span { min: 1.0, max: 1.0 });
            }
        }
    }

    /// With the minimal policy, `z'_1 = u_1 + 2 (1 - u_2) + 0.015` is
    /// `[3.015, 0.015, 1.515, 1.015]` on the four samples and
    /// `z'_2 = 0.5 u_2 + 1.765` is `[1.765, 2.265, 2.015, 2.265]`. The relu-1
    /// outputs are `y_1 = [1, 0, 0, 0]` and `y_2 = [0.25, 0.75, 0.5, 0.75]`, so
    /// layer 3 gives `z' = 2 y_1 + (1 - y_2) + 0.0075 =
    /// [2.7575, 0.2575, 0.5075, 0.2575]`.
    #[test]
    fn observed_signals_match_hand_values() {
        let report = observed_report(ShiftPolicy::Minimal);
        assert_eq!(report.samples, 4);

        let first = report.layers[0].observed.as_ref().unwrap();
        assert!(close(first.max, 3.015), "max {}", first.max);
        assert!(close(first.min, 0.015), "min {}", first.min);
        let ratios = [3.0 / 3.015, 0.5 / 2.265];
        let mean = (ratios[0] + ratios[1]) / 2.0;
        assert!(close(first.swing_ratio.unwrap(), mean), "swing {:?}", first.swing_ratio);
        assert!(close(first.swing_ratio_min.unwrap(), ratios[1]), "worst {:?}", first.swing_ratio_min);
        assert!(close(first.full_scale_use.unwrap(), 1.0), "use {:?}", first.full_scale_use);
        assert_eq!((first.units, first.dark_units), (2, 0));

        let second = report.layers[1].observed.as_ref().unwrap();
        assert!(close(second.max, 2.7575), "max {}", second.max);
        assert!(close(second.min, 0.2575), "min {}", second.min);
        assert!(close(second.swing_ratio.unwrap(), 2.5 / 2.7575), "swing {:?}", second.swing_ratio);
        assert!(close(second.full_scale_use.unwrap(), 2.7575 / 3.0075), "use {:?}", second.full_scale_use);

        for layer in &report.layers {
            let o = layer.observed.as_ref().unwrap();
            for ratio in [o.swing_ratio.unwrap(), o.swing_ratio_min.unwrap()] {
                assert!(ratio > 0.0, "{}: swing ratio {ratio} not above 0", layer.label);
                assert!(ratio <= 1.0, "{}: swing ratio {ratio} above 1", layer.label);
            }
        }

        let modulators = report.modulators.observed.as_ref().unwrap();
        assert_eq!((modulators.max, modulators.min), (1.0, 0.0));
        assert_eq!(modulators.swing_ratio, Some(1.0));
        assert_eq!(modulators.units, 1);
    }

    /// Layer 3 has one unit, so the published `s = |c|` is the smallest exact
    /// shift and leaves a zero bias: its `z' = 2 y_1 + (1 - y_2)` has minimum
    /// 0.25 and swing ratio `2.5 / 2.75`, above the minimal policy's
    /// `2.5 / 2.7575`, which adds the margin.
    #[test]
    fn published_policy_figures() {
        let report = observed_report(ShiftPolicy::Published);
        let second = report.layers[1].observed.as_ref().unwrap();
        assert!(close(second.max, 2.75), "max {}", second.max);
        assert!(close(second.min, 0.25), "min {}", second.min);
        assert!(close(second.swing_ratio.unwrap(), 2.5 / 2.75), "swing {:?}", second.swing_ratio);
    }

    #[test]
    fn conv_units_pool_positions() {
        // [batch 2, channels 2, 1, 2]: channel 0 contains 1, 3 | 0, 2 and
        // channel 1 contains 5, 5 | 5, 5.
        let t = tensor(&[1.0, 3.0, 5.0, 5.0, 0.0, 2.0, 5.0, 5.0], &[2, 2, 1, 2]);
        let (min, max) = unit_extremes(&t).unwrap();
        assert_eq!(min, vec![0.0, 5.0]);
        assert_eq!(max, vec![3.0, 5.0]);
        let observed = summarise(&UnitExtremes { min, max }, 10.0);
        assert_eq!(observed.swing_ratio_min, Some(0.0));
        assert_eq!(observed.swing_ratio, Some(0.5));
        assert_eq!(observed.full_scale_use, Some(0.5));
    }

    #[test]
    fn dark_units_are_left_out() {
        let observed = summarise(&UnitExtremes { min: vec![0.0, 1.0], max: vec![0.0, 2.0] }, 4.0);
        assert_eq!(observed.dark_units, 1);
        assert_eq!(observed.swing_ratio, Some(0.5));
    }

    #[test]
    fn report_without_data_has_no_observations() {
        let nonneg = transform(&hand_network(), &TransformOptions::default()).unwrap();
        let report = report(&nonneg, None).unwrap();
        assert_eq!(report.samples, 0);
        assert!(report.modulators.observed.is_none());
        assert!(report.layers.iter().all(|l| l.observed.is_none()));
        let table = format_signals(&[("", &report)]);
        assert!(table.starts_with("| layer | shift s |"), "{table}");
        assert!(table.contains("| layers.3 | 0.7575 |"), "{table}");
    }

    #[test]
    fn recorded_policy_reads_transform_record() {
        let provenance = serde_json::json!({ "transform": { "shift": "published", "activation_range": "method" } });
        assert_eq!(recorded_policy(&provenance), Some(ShiftPolicy::Published));
        assert_eq!(recorded_policy(&serde_json::json!({ "source_model": "m" })), None);
    }

    #[test]
    fn values_format_with_four_digits() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(1.515), "1.515");
        assert_eq!(format_value(2.5), "2.500");
        assert_eq!(format_value(123.456), "123.5");
        assert_eq!(format_value(2e-5), "2.000e-5");
        assert_eq!(format_span(Span { min: 0.0, max: 1.75 }), "0..1.750");
    }
}
