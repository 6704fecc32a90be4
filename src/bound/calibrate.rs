//! Calibration of the bounds of ReLU and GELU layers on data, and the clip
//! rate of a bounded network.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{check_has_relu, check_per_channel, Granularity, LayerBounds, Site, Statistic};
use crate::data::Images;
use crate::error::{Error, Result};
use crate::model::{Layer, Network};

/// Maximum number of pre-activation values a percentile calibration keeps in
/// memory over all layers and channels, 2^25 (256 MiB as f64).
pub const MAX_KEPT_VALUES: usize = 1 << 25;

/// The callback of [`forward_observed`]: the path of an unbounded
/// activation layer, its output before any bound, and its bounds if any.
type Observer<'a> = dyn FnMut(&str, &Tensor, Option<&LayerBounds>) -> Result<()> + 'a;

/// Runs `network` on `x`, calling `observe(path, y, bound)` with the output
/// `y = f(z)` of every unbounded activation layer (ReLU, GELU) before any
/// bound, inside residual blocks too. A layer listed in `bounds` is applied
/// as `min(f(z), N)` with its per-layer or per-channel bounds; an unlisted
/// one stays `f(z)`.
///
/// For ReLU, `min(max(z, 0), N)` is ReLU-N, and a statistic or a clip count
/// of the outputs `max(z, 0)` equals that of the pre-activations wherever
/// it is positive, since `max(., 0)` keeps the order of positive values.
fn forward_observed(network: &Network, bounds: &[LayerBounds], x: &Tensor, observe: &mut Observer) -> Result<Tensor> {
    chain_observed(&network.layers, "layers", bounds, x, observe)
}

/// Applies `layers`, whose paths start with `prefix`, as [`forward_observed`].
fn chain_observed(
    layers: &[Layer],
    prefix: &str,
    bounds: &[LayerBounds],
    x: &Tensor,
    observe: &mut Observer,
) -> Result<Tensor> {
    let mut h = x.clone();
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        h = match layer {
            Layer::Activation(activation) if activation.is_unbounded() => {
                let bound = bounds.iter().find(|b| b.path == path);
                let y = activation.forward(&h)?;
                observe(&path, &y, bound)?;
                match bound {
                    Some(b) => y.broadcast_minimum(&b.broadcastable(&y)?)?,
                    None => y,
                }
            }
            Layer::Residual(r) => {
                let main = chain_observed(&r.main, &format!("{path}.main"), bounds, &h, observe)?;
                let shortcut = chain_observed(&r.shortcut, &format!("{path}.shortcut"), bounds, &h, observe)?;
                main.add(&shortcut)?
            }
            other => other.forward(&h)?,
        };
    }
    Ok(h)
}

/// Computes the logits of the network whose unbounded activation layers are
/// clipped by `bounds`: `min(f(z_c), N_c)` per channel `c` (or with one `N`
/// per layer), which is `min(max(z_c, 0), N_c)` for ReLU. This is the
/// function a bounded network implements; the network
/// from [`super::apply_bounds`] computes the same with the bounds folded into
/// its weights.
///
/// # Shapes
/// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
pub fn forward_clipped(network: &Network, bounds: &[LayerBounds], x: &Tensor) -> Result<Tensor> {
    forward_observed(network, bounds, x, &mut |_, _, _| Ok(()))
}

/// Runs `observe` over the batches of `images` in the network's precision.
fn for_each_batch(
    network: &Network,
    bounds: &[LayerBounds],
    images: &Images,
    batch_size: usize,
    observe: &mut Observer,
) -> Result<()> {
    crate::verify::check_images(&network.input_shape, images)?;
    let dtype = network.dtype();
    let indices: Vec<usize> = (0..images.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, _) = images.batch(chunk, &Device::Cpu)?;
        forward_observed(network, bounds, &x.to_dtype(dtype)?, observe)?;
    }
    Ok(())
}

/// An f64 with the total order of [`f64::total_cmp`], for the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ordered(f64);

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Streaming statistic of the values of one layer or channel.
#[derive(Debug, Clone)]
enum Accumulator {
    /// The largest value so far.
    Max(f64),
    /// The `keep` largest values so far, smallest on top: once all values
    /// are seen, the top is the value of rank `n - keep + 1`.
    Top { keep: usize, heap: BinaryHeap<Reverse<Ordered>> },
}

impl Accumulator {
    /// Builds the accumulator of `statistic` over `count` values.
    fn new(statistic: Statistic, count: usize) -> Self {
        match statistic {
            Statistic::Max => Accumulator::Max(f64::NEG_INFINITY),
            Statistic::Percentile(p) => {
                // Nearest rank k = ceil(P / 100 * n), clamped to 1..=n.
                let rank = ((p * count as f64 / 100.0).ceil() as usize).clamp(1, count.max(1));
                Accumulator::Top {
                    keep: count.max(1) - rank + 1,
                    heap: BinaryHeap::new(),
                }
            }
        }
    }

    /// Returns how many values the accumulator keeps at most.
    fn kept(&self) -> usize {
        match self {
            Accumulator::Max(_) => 1,
            Accumulator::Top { keep, .. } => *keep,
        }
    }

    fn push(&mut self, value: f64) {
        match self {
            Accumulator::Max(m) => *m = m.max(value),
            Accumulator::Top { keep, heap } => {
                if heap.len() < *keep {
                    heap.push(Reverse(Ordered(value)));
                } else if let Some(mut top) = heap.peek_mut() {
                    if value > top.0 .0 {
                        *top = Reverse(Ordered(value));
                    }
                }
            }
        }
    }

    /// Returns the statistic, `-inf` when no value was pushed.
    fn value(&self) -> f64 {
        match self {
            Accumulator::Max(m) => *m,
            Accumulator::Top { heap, .. } => heap.peek().map_or(f64::NEG_INFINITY, |top| top.0 .0),
        }
    }
}

/// Returns the channel count and the values per channel and sample of a
/// pre-activation of one sample's `shape` (`[C]` or `[C, h, w]`).
fn channels_and_positions(shape: &[usize]) -> (usize, usize) {
    let channels = shape.first().copied().unwrap_or(1);
    (channels, shape.iter().skip(1).product())
}

/// Returns the shape of one sample of the input of every layer.
pub(super) fn input_shapes(network: &Network) -> Result<Vec<Vec<usize>>> {
    let mut shapes = Vec::with_capacity(network.layers.len());
    let mut shape = network.input_shape.clone();
    for (i, layer) in network.layers.iter().enumerate() {
        shapes.push(shape.clone());
        shape = layer
            .output_shape(&shape)
            .map_err(|message| Error::Shape(format!("layer {i} ({}): {message}", layer.kind())))?;
    }
    Ok(shapes)
}

/// Calibrates the bound of every unbounded activation layer (ReLU, GELU) of
/// `network` on `images`: `statistic * (1 + margin)` of the activation
/// outputs that the unbounded network produces, over the whole layer or per
/// channel. For ReLU the statistic of the outputs is that of the positive
/// pre-activations.
///
/// Every layer is calibrated on the unbounded network, so a bound does not depend
/// on the clipping of the layers before it. A channel whose statistic is not
/// positive (it never fired) gets the largest bound of its layer and is
/// listed in [`LayerBounds::fallback_channels`]; a layer with no positive
/// statistic at all is an error, and so is a per-channel calibration of a
/// ReLU that [`check_per_channel`] rejects.
pub fn calibrate(
    network: &Network,
    images: &Images,
    statistic: Statistic,
    margin: f64,
    granularity: Granularity,
    batch_size: usize,
) -> Result<Vec<LayerBounds>> {
    let sites = check_has_relu(network)?;
    if granularity == Granularity::Channel {
        check_per_channel(network)?;
    }
    if images.is_empty() {
        return Err(Error::config("--calibration-samples", 0, "calibration needs at least one image"));
    }
    let shapes = site_shapes(network, images)?;
    let mut accumulators: Vec<Vec<Accumulator>> = Vec::new();
    for shape in &shapes {
        let (channels, positions) = channels_and_positions(shape);
        let groups = match granularity {
            Granularity::Layer => 1,
            Granularity::Channel => channels,
        };
        let count = images.len() * channels * positions / groups;
        accumulators.push(vec![Accumulator::new(statistic, count); groups]);
    }
    let kept: usize = accumulators.iter().flatten().map(Accumulator::kept).sum();
    if kept > MAX_KEPT_VALUES {
        return Err(Error::config(
            "--calibrate",
            statistic,
            format!(
                "this percentile keeps {kept} activation values in memory, more than the limit of \
                 {MAX_KEPT_VALUES}; pass fewer --calibration-samples or a percentile closer to 100"
            ),
        ));
    }

    for_each_batch(network, &[], images, batch_size, &mut |path, y, _| {
        let index = sites
            .iter()
            .position(|site| site.path == path)
            .expect("only unbounded activation layers are observed");
        let (channels, positions) = channels_and_positions(&y.dims()[1..]);
        let values = y.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let group = &mut accumulators[index];
        for (flat, value) in values.into_iter().enumerate() {
            let slot = if group.len() == 1 { 0 } else { (flat / positions) % channels };
            group[slot].push(value);
        }
        Ok(())
    })?;

    sites
        .into_iter()
        .zip(&accumulators)
        .map(|(site, group)| finish_layer(site, group, statistic, margin))
        .collect()
}

/// Returns the shape of one sample of the output of every unbounded
/// activation layer, in the order of [`super::unbounded_sites`], from a
/// forward pass over the first image.
fn site_shapes(network: &Network, images: &Images) -> Result<Vec<Vec<usize>>> {
    let mut shapes = Vec::new();
    for_each_batch(network, &[], &images.take(1), 1, &mut |_, y, _| {
        shapes.push(y.dims()[1..].to_vec());
        Ok(())
    })?;
    Ok(shapes)
}

/// Turns one layer's statistics into bounds, with the fallback for
/// channels that never fired.
fn finish_layer(site: Site, group: &[Accumulator], statistic: Statistic, margin: f64) -> Result<LayerBounds> {
    let layer = &site.path;
    let raw: Vec<f64> = group.iter().map(|a| a.value() * (1.0 + margin)).collect();
    if let Some(bad) = raw.iter().find(|v| v.is_nan() || **v == f64::INFINITY) {
        return Err(Error::Shape(format!(
            "{layer} (unbounded activation): the calibrated bound is {bad}; the network \
             produces non-finite activations on the calibration images"
        )));
    }
    let largest = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(largest > 0.0) {
        return Err(Error::config(
            "--calibrate",
            statistic,
            format!(
                "{layer} (unbounded activation): the {statistic} of its outputs is {largest}, \
                 not > 0, so the activation outputs 0 or less on (almost) every calibration image; use \
                 --calibrate max, a higher percentile or more --calibration-samples"
            ),
        ));
    }
    let mut fallback_channels = Vec::new();
    let bounds = raw
        .iter()
        .enumerate()
        .map(|(c, &v)| {
            if v > 0.0 {
                v
            } else {
                fallback_channels.push(c);
                largest
            }
        })
        .collect();
    Ok(LayerBounds {
        layer: site.layer,
        path: site.path,
        bounds,
        fallback_channels,
    })
}

/// Clipped values of one bounded activation layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerClipRate {
    /// Index of the top-level layer that is, or contains, the activation.
    pub layer: usize,
    /// Path of the activation layer, as [`LayerBounds::path`].
    #[serde(default)]
    pub path: String,
    /// Activation outputs above their bound.
    pub clipped: u64,
    /// All activation outputs of the layer (samples times units).
    pub values: u64,
    /// `clipped / values`.
    pub rate: f64,
}

/// Clipped values of every bounded activation layer and over all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipRates {
    /// Per layer, in network order.
    pub layers: Vec<LayerClipRate>,
    /// Clipped values of all layers.
    pub clipped: u64,
    /// Values of all layers.
    pub values: u64,
    /// `clipped / values`.
    pub rate: f64,
}

/// Counts the activation outputs `f(z)` above their bound (for ReLU, the
/// pre-activations above it) in the bounded network, [`forward_clipped`]
/// with `bounds`, on `images`.
///
/// The values are those of the bounded network, so the clipping of one layer
/// changes what the later layers receive.
pub fn clip_rates(network: &Network, bounds: &[LayerBounds], images: &Images, batch_size: usize) -> Result<ClipRates> {
    let mut layers: Vec<LayerClipRate> = bounds
        .iter()
        .map(|b| LayerClipRate {
            layer: b.layer,
            path: b.path.clone(),
            clipped: 0,
            values: 0,
            rate: 0.0,
        })
        .collect();
    for_each_batch(network, bounds, images, batch_size, &mut |path, z, bound| {
        let Some(bound) = bound else {
            return Ok(());
        };
        let above = z.broadcast_gt(&bound.broadcastable(z)?)?;
        let clipped = above.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let entry = layers.iter_mut().find(|l| l.path == path).expect("one entry per bound");
        entry.clipped += clipped as u64;
        entry.values += z.elem_count() as u64;
        Ok(())
    })?;
    let rate = |clipped: u64, values: u64| if values == 0 { 0.0 } else { clipped as f64 / values as f64 };
    for l in &mut layers {
        l.rate = rate(l.clipped, l.values);
    }
    let clipped = layers.iter().map(|l| l.clipped).sum();
    let values = layers.iter().map(|l| l.values).sum();
    Ok(ClipRates {
        layers,
        clipped,
        values,
        rate: rate(clipped, values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::model::Linear;

    /// Builds `flatten -> identity linear -> ReLU -> linear` on `[1, 1, units]`
    /// inputs, so the ReLU's pre-activations are the input pixels.
    fn identity_network(units: usize) -> Network {
        let eye = Tensor::eye(units, DType::F64, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(units, DType::F64, &Device::Cpu).unwrap();
        let head = Tensor::ones((2, units), DType::F64, &Device::Cpu).unwrap();
        Network {
            input_shape: vec![1, 1, units],
            input_range: crate::model::Range { lo: 0.0, hi: 1.0 },
            channel_ranges: Vec::new(),
            layers: vec![
                Layer::Flatten,
                Layer::Linear(Linear { weight: eye, bias: zeros }),
                Layer::Activation(Activation::Relu),
                Layer::Linear(Linear {
                    weight: head,
                    bias: Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
                }),
            ],
        }
    }

    /// Images of one row each, with the given pixel rows.
    fn images(rows: &[Vec<f32>]) -> Images {
        Images {
            n: rows.len(),
            channels: 1,
            rows: 1,
            cols: rows[0].len(),
            pixels: rows.concat(),
            labels: vec![0; rows.len()],
            normalisation: None,
        }
    }

    /// Four samples of two units: unit 0 takes 0.1..0.4, unit 1 takes 0.5..0.8.
    fn two_units() -> Images {
        images(&[vec![0.1, 0.5], vec![0.4, 0.8], vec![0.2, 0.6], vec![0.3, 0.7]])
    }

    fn close(got: &[f64], want: &[f64]) -> bool {
        got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6)
    }

    #[test]
    fn max_per_layer_and_channel() {
        let network = identity_network(2);
        let layer = calibrate(&network, &two_units(), Statistic::Max, 0.0, Granularity::Layer, 3).unwrap();
        assert_eq!(layer.len(), 1);
        assert_eq!(layer[0].layer, 2);
        assert!(close(&layer[0].bounds, &[0.8]), "{:?}", layer[0].bounds);
        let channel = calibrate(&network, &two_units(), Statistic::Max, 0.0, Granularity::Channel, 3).unwrap();
        assert!(close(&channel[0].bounds, &[0.4, 0.8]), "{:?}", channel[0].bounds);
        assert!(channel[0].fallback_channels.is_empty());
    }

    #[test]
    fn margin_scales_bound() {
        let network = identity_network(2);
        let bounds = calibrate(&network, &two_units(), Statistic::Max, 0.5, Granularity::Channel, 2).unwrap();
        assert!(close(&bounds[0].bounds, &[0.6, 1.2]), "{:?}", bounds[0].bounds);
    }

    #[test]
    fn percentile_uses_nearest_rank() {
        // 10 values 0.1, 0.2, ..., 1.0 of one unit.
        let rows: Vec<Vec<f32>> = (1..=10).map(|i| vec![i as f32 / 10.0]).collect();
        let network = identity_network(1);
        let cases = [(90.0, 0.9), (85.0, 0.9), (80.0, 0.8), (100.0, 1.0), (5.0, 0.1), (0.01, 0.1)];
        for (p, want) in cases {
            let bounds =
                calibrate(&network, &images(&rows), Statistic::Percentile(p), 0.0, Granularity::Layer, 4).unwrap();
            assert!(close(&bounds[0].bounds, &[want]), "percentile {p}: {:?}", bounds[0].bounds);
        }
        let with_margin =
            calibrate(&network, &images(&rows), Statistic::Percentile(90.0), 0.1, Granularity::Layer, 4).unwrap();
        assert!(close(&with_margin[0].bounds, &[0.99]), "{:?}", with_margin[0].bounds);
    }

    #[test]
    fn percentile_per_channel() {
        let network = identity_network(2);
        // Rank ceil(0.5 * 4) = 2 of each unit: 0.2 and 0.6.
        let bounds =
            calibrate(&network, &two_units(), Statistic::Percentile(50.0), 0.0, Granularity::Channel, 3).unwrap();
        assert!(close(&bounds[0].bounds, &[0.2, 0.6]), "{:?}", bounds[0].bounds);
    }

    #[test]
    fn dead_channel_gets_layer_bound() {
        let network = identity_network(3);
        let data = images(&[vec![0.0, 0.5, 0.0], vec![0.0, 0.25, 0.0]]);
        let bounds = calibrate(&network, &data, Statistic::Max, 0.0, Granularity::Channel, 2).unwrap();
        assert!(close(&bounds[0].bounds, &[0.5, 0.5, 0.5]), "{:?}", bounds[0].bounds);
        assert_eq!(bounds[0].fallback_channels, vec![0, 2]);
    }

    #[test]
    fn dead_layer_is_rejected() {
        let network = identity_network(2);
        let data = images(&[vec![0.0, 0.0]]);
        let message = calibrate(&network, &data, Statistic::Max, 0.0, Granularity::Layer, 2)
            .unwrap_err()
            .to_string();
        assert!(message.contains("layers.2"), "{message}");
        assert!(message.contains("not > 0"), "{message}");
    }

    #[test]
    fn clip_rate_counts_values_above_bound() {
        let network = identity_network(2);
        let bounds = [LayerBounds {
            layer: 2,
            path: "layers.2".into(),
            bounds: vec![0.25, 0.65],
            fallback_channels: vec![],
        }];
        // Unit 0: 0.3 and 0.4 are above 0.25; unit 1: 0.7 and 0.8 above 0.65.
        let rates = clip_rates(&network, &bounds, &two_units(), 3).unwrap();
        assert_eq!(rates.layers[0].clipped, 4);
        assert_eq!(rates.layers[0].values, 8);
        assert_eq!(rates.rate, 0.5);
        let per_layer = [LayerBounds {
            layer: 2,
            path: "layers.2".into(),
            bounds: vec![0.55],
            fallback_channels: vec![],
        }];
        // 0.6, 0.7 and 0.8 are above 0.55.
        let rates = clip_rates(&network, &per_layer, &two_units(), 3).unwrap();
        assert_eq!(rates.clipped, 3);
        assert_eq!(rates.rate, 3.0 / 8.0);
    }

    #[test]
    fn max_calibration_clips_nothing() {
        let network = identity_network(2);
        for granularity in [Granularity::Layer, Granularity::Channel] {
            let bounds = calibrate(&network, &two_units(), Statistic::Max, 0.0, granularity, 3).unwrap();
            let rates = clip_rates(&network, &bounds, &two_units(), 3).unwrap();
            assert_eq!(rates.clipped, 0, "{granularity}");
        }
    }

    #[test]
    fn clipped_forward_applies_bounds() {
        let network = identity_network(2);
        let bounds = [LayerBounds {
            layer: 2,
            path: "layers.2".into(),
            bounds: vec![0.25, 0.65],
            fallback_channels: vec![],
        }];
        let x = Tensor::new(&[[[[0.4f64, 0.5]]]], &Device::Cpu).unwrap();
        let logits: Vec<Vec<f64>> = forward_clipped(&network, &bounds, &x).unwrap().to_vec2().unwrap();
        // min(0.4, 0.25) + min(0.5, 0.65) = 0.75 for both output units.
        assert!(close(&logits[0], &[0.75, 0.75]), "{logits:?}");
    }
}
