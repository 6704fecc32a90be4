//! Per-channel bounds folded into the weights, so that a layer with one
//! bound per channel becomes a single ReLU-1.
//!
//! ReLU-N is positively homogeneous: for `N_c > 0`,
//! `min(max(z_c, 0), N_c) = N_c * min(max(z_c / N_c, 0), 1)`. The folded
//! network divides row `c` of the weights and the bias of the affine layer
//! before the ReLU by `N_c` and applies ReLU-1. It multiplies the input
//! columns of channel `c` of the affine layer after it by `N_c`, so it
//! computes the same function.
//! Max and average pooling and flatten between the layers commute with a
//! positive per-channel scale: pooling keeps the channel, and flatten maps
//! channel `c` of `[C, h, w]` to the columns `c * h * w .. (c + 1) * h * w`.
//! Zero padding of a following convolution stays zero under the scale.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::calibrate::input_shapes;
use super::{layer_at_mut, top_level_path, unbounded_sites, Granularity, LayerBounds};
use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::model::{Layer, Network};

/// The layers whose weights carry the per-channel bounds of one ReLU layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rescaling {
    /// The ReLU layer, now ReLU-1.
    pub layer: usize,
    /// The affine layer before it: its output row `c` (weights and bias) is
    /// divided by `N_c`.
    pub rows_of: usize,
    /// The affine layer after it: its input columns of channel `c` are
    /// multiplied by `N_c`.
    pub columns_of: usize,
}

/// Finds the affine layers before and after the ReLU at `layer`, through
/// pooling (before) and pooling and flatten (after).
fn plan(network: &Network, layer: usize) -> Result<Rescaling> {
    let reject = |reason: String| {
        Error::config(
            "--per",
            Granularity::Channel,
            format!(
                "layer {layer} (ReLU) {reason}, so per-channel bounds cannot be folded into the \
                 weights; use --per layer"
            ),
        )
    };
    let mut before = layer;
    let rows_of = loop {
        let Some(previous) = before.checked_sub(1) else {
            return Err(reject("reads the network input, not a linear or convolution layer".into()));
        };
        match &network.layers[previous] {
            Layer::Linear(_) | Layer::Conv2d(_) | Layer::Conv1d(_) => break previous,
            Layer::MaxPool2d(_) | Layer::AvgPool2d(_) => before = previous,
            other => {
                return Err(reject(format!(
                    "reads layer {previous} ({}), not a linear or convolution layer reachable through pooling",
                    other.kind()
                )))
            }
        }
    };
    let mut after = layer + 1;
    let columns_of = loop {
        match network.layers.get(after) {
            None => return Err(reject("is the last layer".into())),
            Some(Layer::Linear(_) | Layer::Conv2d(_) | Layer::Conv1d(_)) => break after,
            Some(Layer::MaxPool2d(_) | Layer::AvgPool2d(_) | Layer::Flatten) => after += 1,
            Some(other) => {
                return Err(reject(format!(
                    "is followed by layer {after} ({}) before any linear or convolution layer reachable \
                     through pooling and flatten",
                    other.kind()
                )))
            }
        }
    };
    Ok(Rescaling {
        layer,
        rows_of,
        columns_of,
    })
}

/// Checks that every unbounded activation of `network` is a ReLU that can
/// take per-channel bounds: an affine layer feeds it through pooling only, and it feeds an affine
/// layer through pooling and flatten only. The error names the first layer
/// that cannot.
pub fn check_per_channel(network: &Network) -> Result<()> {
    for site in unbounded_sites(network) {
        if !site.is_top_level() {
            return Err(Error::config(
                "--per",
                "channel",
                format!(
                    "{} is inside a residual block, where per-channel bounds are not folded into the \
                     weights; use --per layer",
                    site.path
                ),
            ));
        }
        if let Layer::Activation(activation @ Activation::Gelu) = &network.layers[site.layer] {
            return Err(Error::config(
                "--per",
                "channel",
                format!(
                    "layer {} ({activation}) is not a ReLU; per-channel bounds are folded into the \
                     weights through the positive homogeneity of ReLU-N, which GELU lacks; use --per layer",
                    site.layer
                ),
            ));
        }
        plan(network, site.layer)?;
    }
    Ok(())
}

/// Multiplies `t` by `factor` (which broadcasts against it) in f64 and
/// returns the result in `t`'s type.
/// Returns the bound of the input channel that each `(output, group
/// channel)` kernel column of a grouped convolution reads, row-major.
fn group_column_factors(out: usize, group_channels: usize, groups: usize, bounds: &[f64]) -> Vec<f64> {
    let outputs_per_group = out / groups;
    let mut factor = Vec::with_capacity(out * group_channels);
    for o in 0..out {
        let group = o / outputs_per_group;
        for ci in 0..group_channels {
            factor.push(bounds[group * group_channels + ci]);
        }
    }
    factor
}

fn scaled(t: &Tensor, factor: Vec<f64>, shape: Vec<usize>) -> Result<Tensor> {
    let factor = Tensor::from_vec(factor, shape, &Device::Cpu)?;
    let out = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.broadcast_mul(&factor)?;
    Ok(out.to_dtype(t.dtype())?.to_device(t.device())?.detach())
}

/// Divides output row `c` of an affine layer's weight and bias by `bounds[c]`.
fn scale_rows(layer: &mut Layer, bounds: &[f64]) -> Result<()> {
    let (w, b) = layer.weight_and_bias_mut().expect("the plan picks affine layers");
    let inverse: Vec<f64> = bounds.iter().map(|n| 1.0 / n).collect();
    let mut shape = vec![1usize; w.rank()];
    shape[0] = bounds.len();
    *w = scaled(w, inverse.clone(), shape)?;
    *b = scaled(b, inverse, vec![bounds.len()])?;
    Ok(())
}

/// Multiplies the input columns of channel `c` of an affine layer by
/// `bounds[c]`. Flatten keeps channel-major order, so a linear layer's column
/// `k` belongs to channel `k / (in_features / C)`. A convolution's input
/// channel `c` of group `g` is kernel column `c - g * C / groups` of the
/// output channels of that group.
fn scale_columns(layer: &mut Layer, bounds: &[f64]) -> Result<()> {
    let channels = bounds.len();
    match layer {
        Layer::Linear(l) => {
            let columns = l.in_features();
            let per_channel = columns / channels;
            let factor = (0..columns).map(|k| bounds[k / per_channel]).collect();
            l.weight = scaled(&l.weight, factor, vec![1, columns])?;
        }
        Layer::Conv2d(c) => {
            let (out, group_channels, _, _) = c.kernel_dims();
            let factor = group_column_factors(out, group_channels, c.groups, bounds);
            c.weight = scaled(&c.weight, factor, vec![out, group_channels, 1, 1])?;
        }
        Layer::Conv1d(c) => {
            let (out, group_channels, _) = c.kernel_dims();
            let factor = group_column_factors(out, group_channels, c.groups, bounds);
            c.weight = scaled(&c.weight, factor, vec![out, group_channels, 1])?;
        }
        _ => unreachable!("the plan picks affine layers"),
    }
    Ok(())
}

/// Returns `network` with the ReLU layers of `bounds` bounded, and where the
/// per-channel bounds went.
///
/// A layer with one bound `N` becomes ReLU-N. A layer with one bound `N_c`
/// per channel becomes ReLU-1 with the bounds folded into the affine layers
/// around it (see the module documentation), which is exact up to rounding:
/// the result equals [`super::forward_clipped`] with the same bounds. ReLU
/// layers missing from `bounds` stay unbounded.
///
/// NOTE: channels with very different bounds spread the corrected biases of
/// the folded layer, so the transformation's single shift per layer grows,
/// and with it the f32 rounding of the non-negative network. On the
/// Fashion-MNIST MLP of docs/RELU.md, percentile 99.9 per channel raised the
/// shift from 19 to 600 and the logit error from 2e-6 to 8e-5 of the largest
/// logit.
pub fn apply_bounds(network: &Network, bounds: &[LayerBounds]) -> Result<(Network, Vec<Rescaling>)> {
    let shapes = input_shapes(network)?;
    let mut out = network.detached();
    let mut rescalings = Vec::new();
    for b in bounds {
        let Some(Layer::Activation(unbounded)) = layer_at_mut(&mut out.layers, &b.path).map(|l| l.clone()) else {
            return Err(Error::Shape(format!("{} is not an activation layer, so it takes no bound", b.path)));
        };
        if !unbounded.is_unbounded() {
            return Err(Error::Shape(format!("{} ({unbounded}) is bounded already, so it takes no bound", b.path)));
        }
        if let Some(bad) = b.bounds.iter().find(|n| !(n.is_finite() && **n > 0.0)) {
            return Err(Error::Shape(format!("{}: bound {bad} is not a finite number > 0", b.path)));
        }
        if !b.is_per_channel() {
            let bounded = unbounded.bounded(b.bounds[0]).expect("an unbounded activation has a bounded version");
            *layer_at_mut(&mut out.layers, &b.path).expect("the path was found above") = Layer::Activation(bounded);
            continue;
        }
        if unbounded != Activation::Relu || b.path != top_level_path(b.layer) {
            return Err(Error::Shape(format!(
                "{} ({unbounded}) takes one bound, not one per channel: per-channel bounds are folded \
                 only around a top-level ReLU",
                b.path
            )));
        }
        let channels = shapes[b.layer].first().copied().unwrap_or(1);
        if b.bounds.len() != channels {
            return Err(Error::Shape(format!(
                "layer {} has {channels} channels but {} bounds",
                b.layer,
                b.bounds.len()
            )));
        }
        let rescaling = plan(network, b.layer)?;
        scale_rows(&mut out.layers[rescaling.rows_of], &b.bounds)?;
        scale_columns(&mut out.layers[rescaling.columns_of], &b.bounds)?;
        out.layers[b.layer] = Layer::Activation(Activation::ReluN { n: 1.0 });
        tracing::debug!(
            layer = b.layer,
            rows_of = rescaling.rows_of,
            columns_of = rescaling.columns_of,
            "folded per-channel bounds into the weights"
        );
        rescalings.push(rescaling);
    }
    Ok((out, rescalings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Conv2d, Linear, Pool, Range};

    fn linear(inputs: usize, outputs: usize) -> Layer {
        Layer::Linear(Linear::zeros(inputs, outputs).unwrap())
    }

    fn network(input_shape: Vec<usize>, layers: Vec<Layer>) -> Network {
        Network::new(&input_shape, Range { lo: 0.0, hi: 1.0 }, layers)
    }

    #[test]
    fn plan_walks_through_pooling_and_flatten() {
        let conv = Layer::Conv2d(Conv2d::zeros(1, 2, 3, 1, 0, 1, 1).unwrap());
        let pool = Layer::MaxPool2d(Pool::new(2, 2));
        let n = network(
            vec![1, 6, 6],
            vec![conv, pool.clone(), Layer::Activation(Activation::Relu), pool, Layer::Flatten, linear(2, 3)],
        );
        n.output_shape().unwrap();
        assert_eq!(
            plan(&n, 2).unwrap(),
            Rescaling {
                layer: 2,
                rows_of: 0,
                columns_of: 5
            }
        );
    }

    #[test]
    fn per_channel_rejects_missing_affine() {
        let relu = Layer::Activation(Activation::Relu);
        let last = network(vec![1, 1, 2], vec![Layer::Flatten, linear(2, 2), relu.clone()]);
        let first = network(vec![1, 1, 2], vec![Layer::Flatten, relu.clone(), linear(2, 2)]);
        let twice = network(
            vec![1, 1, 2],
            vec![Layer::Flatten, linear(2, 2), relu.clone(), Layer::Activation(Activation::ReluN { n: 1.0 }), linear(2, 2)],
        );
        for (n, layer, reason) in [(last, 2, "last layer"), (first, 1, "layer 0 (flatten)"), (twice, 2, "layer 3 (activation)")] {
            let message = check_per_channel(&n).unwrap_err().to_string();
            assert!(message.contains(&format!("layer {layer} (ReLU)")), "{message}");
            assert!(message.contains(reason), "{message}");
            assert!(message.contains("--per layer"), "{message}");
        }
    }
}
