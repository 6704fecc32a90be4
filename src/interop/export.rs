//! Export of regular and non-negative networks to ONNX graphs of standard
//! operators (opset 13), run by ONNX Runtime and other tools.
//!
//! Node names start with the isonn layer path (`layers.3`,
//! `layers.5.main.0`), so a node can be traced back to its layer. A
//! non-negative network exports as its physical data flow:
//!
//! - `input/modulator`: `u = x - lo`, the input modulators;
//! - `{layer}/complement`: `alpha - u`, the second modulator port, and
//!   `{layer}/complement_floor`, a `Relu` that removes rounding below 0;
//! - `{layer}/signal_weights` and `{layer}/complement_weights`: `P u` and
//!   `N (alpha - u)` (`Gemm` or `Conv`, initializers `{layer}.positive` and
//!   `{layer}.negative`), `{layer}/detector` their sum and `{layer}/bias`
//!   the added non-negative bias;
//! - `{layer}/shift`: the activation device reading `z' - s`, then the
//!   activation's formula, `{layer}/clamp` to its output bounds and
//!   `{layer}/output_offset`, which subtracts the output edge's offset;
//! - `output/offset`: adds the last edge's offset, giving the logits.
//!
//! A 1-D convolution is a 2-D `Conv` with a `[1, k]` kernel, and an Elman
//! cell is unrolled over its steps (`export_elman`).
//!
//! Every weight and bias initializer of a non-negative export is `>= 0`.

use candle_core::{DType, Tensor};

use super::graph::{float, int, ints, GraphBuilder};
use super::proto::ModelProto;
use super::tensor::int64_tensor;
use crate::activation::{sigmoid_fit, Activation};
use crate::error::{Error, Result};
use crate::model::{Conv1d, Conv2d, Layer, Network, Pool};
use crate::nonneg::{AffineOp, NonnegActivation, NonnegAffine, NonnegLayer, NonnegNetwork};
use crate::store::Model;

/// Name of the graph input of exported models, `[batch, channels, height, width]`.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output of exported models, `[batch, classes]`.
pub const OUTPUT_NAME: &str = "logits";

/// Exports either kind of model.
pub fn export_model(model: &Model) -> Result<ModelProto> {
    match model {
        Model::Regular(n) => export_network(n),
        Model::Nonneg(n) => export_nonneg(n),
    }
}

/// Exports a regular network. Parameters are written as float32.
///
/// # Errors
/// A layer without a standard-operator equivalent (a convolution padded
/// with one value per channel, an adaptive pool whose windows differ in
/// size, a measured transfer curve) is an error naming the layer.
pub fn export_network(network: &Network) -> Result<ModelProto> {
    let mut graph = GraphBuilder::default();
    let shape = network.input_shape.clone();
    let (last, shape) = regular_chain(&mut graph, &network.layers, "layers.", INPUT_NAME.into(), shape)?;
    graph.node("Identity", OUTPUT_NAME, &[&last], vec![]);
    Ok(graph.finish(
        "isonn-regular",
        (INPUT_NAME, &network.input_shape),
        (OUTPUT_NAME, &shape),
        "Regular network exported by isonn.",
    ))
}

/// Exports a non-negative network as its physical data flow (see the module
/// documentation for the node names). Parameters are written as float32.
pub fn export_nonneg(network: &NonnegNetwork) -> Result<ModelProto> {
    let mut graph = GraphBuilder::default();
    let lo: Vec<f64> = if network.channel_ranges.is_empty() {
        vec![network.input_range.lo]
    } else {
        network.channel_ranges.iter().map(|r| r.lo).collect()
    };
    let lo_name = channel_constant(&mut graph, "input.lo", &lo, 3);
    let u = graph.node("Sub", "input/modulator", &[INPUT_NAME, &lo_name], vec![]);
    let (last, shape) = nonneg_chain(&mut graph, network, &network.layers, "layers.", u, network.input_shape.clone())?;
    let logits = offset_node(&mut graph, "output/offset", &last, -network.output_offset);
    graph.node("Identity", OUTPUT_NAME, &[&logits], vec![]);
    Ok(graph.finish(
        "isonn-nonneg",
        (INPUT_NAME, &network.input_shape),
        (OUTPUT_NAME, &shape),
        "Non-negative isomorphic network exported by isonn: every weight and bias >= 0.",
    ))
}

/// Returns the values of `t` as float32, row-major.
pub(super) fn values_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Adds `values` (one, or one per channel) as an initializer that
/// broadcasts over a tensor of `rank` dimensions after the batch: a scalar,
/// or `[channels, 1, ...]`.
fn channel_constant(graph: &mut GraphBuilder, name: &str, values: &[f64], rank: usize) -> String {
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    if values.len() == 1 {
        return graph.initializer(name, &[], &data);
    }
    let mut dims = vec![1; rank];
    dims[0] = values.len();
    graph.initializer(name, &dims, &data)
}

/// Adds a node computing `x - subtrahend` with a non-negative constant:
/// a `Sub` of `subtrahend` when it is `>= 0`, otherwise an `Add` of its
/// magnitude.
pub(super) fn offset_node(graph: &mut GraphBuilder, name: &str, x: &str, subtrahend: f64) -> String {
    let constant = graph.scalar(&format!("{name}.value"), subtrahend.abs());
    let op = if subtrahend >= 0.0 { "Sub" } else { "Add" };
    graph.node(op, name, &[x, &constant], vec![])
}

/// Adds the nodes of `layers` reading `x` of one-sample shape `shape`;
/// returns the last output and its shape.
fn regular_chain(
    graph: &mut GraphBuilder,
    layers: &[Layer],
    prefix: &str,
    mut x: String,
    mut shape: Vec<usize>,
) -> Result<(String, Vec<usize>)> {
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("{prefix}{i}");
        let next = layer
            .output_shape(&shape)
            .map_err(|m| Error::interop(&name, format!("{} layer: {m}", layer.kind())))?;
        x = match layer {
            Layer::Linear(l) => {
                let w = graph.initializer(&format!("{name}.weight"), l.weight.dims(), &values_f32(&l.weight)?);
                let b = graph.initializer(&format!("{name}.bias"), l.bias.dims(), &values_f32(&l.bias)?);
                graph.node("Gemm", &format!("{name}/gemm"), &[&x, &w, &b], vec![int("transB", 1)])
            }
            Layer::Conv2d(c) => regular_conv(graph, &name, &x, c)?,
            Layer::Conv1d(c) => regular_conv1d(graph, &name, &x, c)?,
            Layer::Activation(a) => activation_nodes(graph, &name, &x, a)?,
            Layer::AvgPool2d(p) => pool_node(graph, "AveragePool", &name, &x, p),
            Layer::MaxPool2d(p) => pool_node(graph, "MaxPool", &name, &x, p),
            Layer::Flatten => graph.node("Flatten", &format!("{name}/flatten"), &[&x], vec![int("axis", 1)]),
            Layer::BatchNorm(bn) => {
                let (mean, var) = bn.running_stats();
                let mut inputs = vec![x.clone()];
                for (part, t) in [("weight", &bn.weight), ("bias", &bn.bias), ("running_mean", &mean), ("running_var", &var)] {
                    inputs.push(graph.initializer(&format!("{name}.{part}"), t.dims(), &values_f32(t)?));
                }
                let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                graph.node(
                    "BatchNormalization",
                    &format!("{name}/batch_norm"),
                    &inputs,
                    vec![float("epsilon", bn.eps as f32), float("momentum", 1.0 - bn.momentum as f32)],
                )
            }
            Layer::Residual(r) => {
                let (main, _) = regular_chain(graph, &r.main, &format!("{name}.main."), x.clone(), shape.clone())?;
                let (shortcut, _) = regular_chain(graph, &r.shortcut, &format!("{name}.shortcut."), x.clone(), shape.clone())?;
                graph.node("Add", &format!("{name}/sum"), &[&main, &shortcut], vec![])
            }
            Layer::GlobalAvgPool => global_pool(graph, &name, &x),
            Layer::AdaptiveAvgPool2d(size) => adaptive_pool(graph, &name, &x, &shape, *size)?,
            Layer::Dropout(p) => dropout_node(graph, &name, &x, *p),
            Layer::Elman(e) => super::export_elman::regular_elman(graph, &name, &x, e, &shape)?,
        };
        shape = next;
    }
    Ok((x, shape))
}

/// The settings of a convolution as ONNX's 2-D `Conv` reads them. A 1-D
/// convolution over rows is a 2-D one with kernel height 1 and no
/// padding, stride or dilation along the height.
#[derive(Debug, Clone, Copy)]
struct ConvSettings {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
}

impl ConvSettings {
    fn conv2d(kh: usize, kw: usize, stride: usize, padding: usize, dilation: usize, groups: usize) -> Self {
        ConvSettings {
            kernel: [kh, kw],
            stride: [stride; 2],
            padding: [padding; 2],
            dilation: [dilation; 2],
            groups,
        }
    }

    fn conv1d(k: usize, stride: usize, padding: usize, dilation: usize, groups: usize) -> Self {
        ConvSettings {
            kernel: [1, k],
            stride: [1, stride],
            padding: [0, padding],
            dilation: [1, dilation],
            groups,
        }
    }

    /// Returns the `Conv` attributes, with `pads` zero unless `padded`
    /// (the padding is then a `Pad` node before the `Conv`).
    fn attributes(&self, padded: bool) -> Vec<super::proto::AttributeProto> {
        let [ph, pw] = if padded { self.padding.map(|p| p as i64) } else { [0, 0] };
        let as_i64 = |v: [usize; 2]| v.map(|x| x as i64);
        vec![
            ints("kernel_shape", &as_i64(self.kernel)),
            ints("strides", &as_i64(self.stride)),
            ints("pads", &[ph, pw, ph, pw]),
            ints("dilations", &as_i64(self.dilation)),
            int("group", self.groups as i64),
        ]
    }
}

fn regular_conv(graph: &mut GraphBuilder, name: &str, x: &str, c: &Conv2d) -> Result<String> {
    let (_, _, kh, kw) = c.kernel_dims();
    let settings = ConvSettings::conv2d(kh, kw, c.stride, c.padding, c.dilation, c.groups);
    let w = graph.initializer(&format!("{name}.weight"), c.weight.dims(), &values_f32(&c.weight)?);
    regular_conv_nodes(graph, name, x, &w, &c.bias, &c.pad_value, settings)
}

/// Adds a 1-D convolution over rows as a 2-D `Conv` with a `[1, k]` kernel.
fn regular_conv1d(graph: &mut GraphBuilder, name: &str, x: &str, c: &Conv1d) -> Result<String> {
    let (out, group_channels, k) = c.kernel_dims();
    let settings = ConvSettings::conv1d(k, c.stride, c.padding, c.dilation, c.groups);
    let w = graph.initializer(&format!("{name}.weight"), &[out, group_channels, 1, k], &values_f32(&c.weight)?);
    regular_conv_nodes(graph, name, x, &w, &c.bias, &c.pad_value, settings)
}

/// Adds the `Conv` with initializer `weight`, padding `x` with
/// `pad_values` (one value, or empty for zeros) first.
fn regular_conv_nodes(
    graph: &mut GraphBuilder,
    name: &str,
    x: &str,
    weight: &str,
    bias: &Tensor,
    pad_values: &[f64],
    settings: ConvSettings,
) -> Result<String> {
    let b = graph.initializer(&format!("{name}.bias"), bias.dims(), &values_f32(bias)?);
    let mut input = x.to_string();
    let pad_value = pad_values.first().copied().unwrap_or(0.0);
    let padded = settings.padding != [0, 0];
    if padded && pad_values.iter().any(|&v| v != pad_value) {
        return Err(Error::interop(
            name,
            "the convolution pads each input channel with its own value (from a folded batch \
             normalisation before it), which ONNX's Pad cannot express; export the model before \
             folding, that is the regular model with its batch normalisation",
        ));
    }
    let zero_padded = pad_value == 0.0;
    if padded && !zero_padded {
        input = pad_node(graph, &format!("{name}/pad"), x, settings.padding, pad_value);
    }
    Ok(graph.node("Conv", &format!("{name}/conv"), &[&input, weight, &b], settings.attributes(zero_padded)))
}

/// Adds a `Pad` node padding `x` by `[height, width]` samples at both ends
/// of each spatial dimension with `value`.
fn pad_node(graph: &mut GraphBuilder, name: &str, x: &str, [ph, pw]: [usize; 2], value: f64) -> String {
    let (ph, pw) = (ph as i64, pw as i64);
    let pads = graph.tensor(int64_tensor(&format!("{name}.pads"), &[0, 0, ph, pw, 0, 0, ph, pw]));
    let constant = graph.scalar(&format!("{name}.value"), value);
    graph.node("Pad", name, &[x, &pads, &constant], vec![])
}

fn pool_node(graph: &mut GraphBuilder, op: &str, name: &str, x: &str, pool: &Pool) -> String {
    let p = pool.padding as i64;
    let mut attributes = vec![
        ints("kernel_shape", &[pool.kernel as i64; 2]),
        ints("strides", &[pool.stride as i64; 2]),
        ints("pads", &[p, p, p, p]),
    ];
    if op == "AveragePool" {
        // isonn, like PyTorch's default, counts the padding in the average.
        attributes.push(int("count_include_pad", 1));
    }
    let node = if op == "AveragePool" { "average_pool" } else { "max_pool" };
    graph.node(op, &format!("{name}/{node}"), &[x], attributes)
}

fn global_pool(graph: &mut GraphBuilder, name: &str, x: &str) -> String {
    let pooled = graph.node("GlobalAveragePool", &format!("{name}/global_average_pool"), &[x], vec![]);
    graph.node("Flatten", &format!("{name}/flatten"), &[&pooled], vec![int("axis", 1)])
}

/// Adds an adaptive average pool as an `AveragePool`, which is exact when
/// the output size divides the input size (all windows equal).
fn adaptive_pool(graph: &mut GraphBuilder, name: &str, x: &str, shape: &[usize], [oh, ow]: [usize; 2]) -> Result<String> {
    let (h, w) = (shape[1], shape[2]);
    if h % oh != 0 || w % ow != 0 {
        return Err(Error::interop(
            name,
            format!(
                "adaptive average pooling from {h}x{w} to {oh}x{ow} has windows of different \
                 sizes, which AveragePool cannot express; use an output size that divides the input size"
            ),
        ));
    }
    let (kh, kw) = ((h / oh) as i64, (w / ow) as i64);
    Ok(graph.node(
        "AveragePool",
        &format!("{name}/adaptive_average_pool"),
        &[x],
        vec![ints("kernel_shape", &[kh, kw]), ints("strides", &[kh, kw])],
    ))
}

/// Adds a `Dropout` node, the identity at inference; its ratio input keeps
/// the drop probability for a later import.
fn dropout_node(graph: &mut GraphBuilder, name: &str, x: &str, p: f64) -> String {
    let ratio = graph.scalar(&format!("{name}.ratio"), p);
    graph.node("Dropout", &format!("{name}/dropout"), &[x, &ratio], vec![])
}

/// Adds the nodes of `activation` applied to `x`, the photonic responses
/// as their elementwise formulas.
pub(super) fn activation_nodes(graph: &mut GraphBuilder, name: &str, x: &str, activation: &Activation) -> Result<String> {
    Ok(match *activation {
        Activation::Relu => graph.node("Relu", &format!("{name}/relu"), &[x], vec![]),
        Activation::Tanh => graph.node("Tanh", &format!("{name}/tanh"), &[x], vec![]),
        Activation::ReluN { n } => clip_node(graph, &format!("{name}/relu_n"), x, 0.0, n),
        Activation::PhotonicSigmoid => {
            use sigmoid_fit::*;
            // A1 + (A2 - A1) * sigmoid((min(x, X0 + CUTOFF) - X0) / D), the
            // same function as A2 + (A1 - A2) / (1 + exp(...)).
            let cutoff = graph.scalar(&format!("{name}/cutoff.value"), X0 + CUTOFF);
            let y = graph.node("Min", &format!("{name}/cutoff"), &[x, &cutoff], vec![]);
            let centre = graph.scalar(&format!("{name}/centre.value"), X0);
            let y = graph.node("Sub", &format!("{name}/centre"), &[&y, &centre], vec![]);
            let width = graph.scalar(&format!("{name}/width.value"), D);
            let y = graph.node("Div", &format!("{name}/width"), &[&y, &width], vec![]);
            let y = graph.node("Sigmoid", &format!("{name}/sigmoid"), &[&y], vec![]);
            let gain = graph.scalar(&format!("{name}/gain.value"), A2 - A1);
            let y = graph.node("Mul", &format!("{name}/gain"), &[&y, &gain], vec![]);
            let floor = graph.scalar(&format!("{name}/floor.value"), A1);
            graph.node("Add", &format!("{name}/floor"), &[&y, &floor], vec![])
        }
        Activation::PhotonicSinusoidal => {
            // sin^2(pi/2 * clamp(x, 0, 1)).
            let y = clip_node(graph, &format!("{name}/clamp_input"), x, 0.0, 1.0);
            let phase = graph.scalar(&format!("{name}/phase.value"), std::f64::consts::FRAC_PI_2);
            let y = graph.node("Mul", &format!("{name}/phase"), &[&y, &phase], vec![]);
            let y = graph.node("Sin", &format!("{name}/sin"), &[&y], vec![]);
            graph.node("Mul", &format!("{name}/square"), &[&y, &y], vec![])
        }
        Activation::Gelu => gelu_nodes(graph, name, x),
        Activation::GeluN { n } => {
            let y = gelu_nodes(graph, name, x);
            let bound = graph.scalar(&format!("{name}/bound.value"), n);
            graph.node("Min", &format!("{name}/bound"), &[&y, &bound], vec![])
        }
        Activation::Curve(_) => {
            return Err(Error::interop(
                name,
                "a measured transfer curve has no ONNX operator; export a model with a built-in \
                 activation",
            ))
        }
    })
}

/// Adds GELU in its exact form, `x * 0.5 * (1 + erf(x / sqrt 2))`.
fn gelu_nodes(graph: &mut GraphBuilder, name: &str, x: &str) -> String {
    let root = graph.scalar(&format!("{name}/sqrt2.value"), std::f64::consts::SQRT_2);
    let y = graph.node("Div", &format!("{name}/sqrt2"), &[x, &root], vec![]);
    let y = graph.node("Erf", &format!("{name}/erf"), &[&y], vec![]);
    let one = graph.scalar(&format!("{name}/one.value"), 1.0);
    let y = graph.node("Add", &format!("{name}/one"), &[&y, &one], vec![]);
    let half = graph.scalar(&format!("{name}/half.value"), 0.5);
    let y = graph.node("Mul", &format!("{name}/half"), &[&y, &half], vec![]);
    graph.node("Mul", &format!("{name}/gelu"), &[x, &y], vec![])
}

fn clip_node(graph: &mut GraphBuilder, name: &str, x: &str, lo: f64, hi: f64) -> String {
    let min = graph.scalar(&format!("{name}.min"), lo);
    let max = graph.scalar(&format!("{name}.max"), hi);
    graph.node("Clip", name, &[x, &min, &max], vec![])
}

/// Adds the nodes of non-negative `layers` reading the physical signal `v`.
fn nonneg_chain(
    graph: &mut GraphBuilder,
    network: &NonnegNetwork,
    layers: &[NonnegLayer],
    prefix: &str,
    mut v: String,
    mut shape: Vec<usize>,
) -> Result<(String, Vec<usize>)> {
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("{prefix}{i}");
        let next = nonneg_output_shape(network, layer, &shape)?;
        v = match layer {
            NonnegLayer::Affine(a) => nonneg_affine(graph, &name, &v, a, &shape)?,
            NonnegLayer::Activation(a) => nonneg_activation(graph, &name, &v, a)?,
            NonnegLayer::AvgPool2d(p) => pool_node(graph, "AveragePool", &name, &v, p),
            NonnegLayer::MaxPool2d(p) => pool_node(graph, "MaxPool", &name, &v, p),
            NonnegLayer::PaddedAvgPool2d { pool, pad } => {
                let padded = padded_signal(graph, &format!("{name}/pad"), &v, [pool.padding; 2], pad, &shape);
                pool_node(graph, "AveragePool", &name, &padded, &Pool::new(pool.kernel, pool.stride))
            }
            NonnegLayer::Flatten => graph.node("Flatten", &format!("{name}/flatten"), &[&v], vec![int("axis", 1)]),
            NonnegLayer::Residual(r) => {
                let (main, _) = nonneg_chain(graph, network, &r.main, &format!("{name}.main."), v.clone(), shape.clone())?;
                let (shortcut, _) = nonneg_chain(graph, network, &r.shortcut, &format!("{name}.shortcut."), v.clone(), shape.clone())?;
                graph.node("Add", &format!("{name}/sum"), &[&main, &shortcut], vec![])
            }
            NonnegLayer::GlobalAvgPool => global_pool(graph, &name, &v),
            NonnegLayer::AdaptiveAvgPool2d(size) => adaptive_pool(graph, &name, &v, &shape, *size)?,
            NonnegLayer::Dropout(p) => dropout_node(graph, &name, &v, *p),
            NonnegLayer::Elman(e) => super::export_elman::nonneg_elman(graph, &name, &v, e, &shape)?,
        };
        shape = next;
    }
    Ok((v, shape))
}

/// Returns the one-sample output shape of a non-negative layer by running
/// it on one zero sample.
fn nonneg_output_shape(network: &NonnegNetwork, layer: &NonnegLayer, shape: &[usize]) -> Result<Vec<usize>> {
    let mut dims = vec![1];
    dims.extend_from_slice(shape);
    let zeros = Tensor::zeros(dims, network.dtype(), &network.device())?;
    let out = layer.forward(&zeros, "", &mut |_, _| Ok(()))?;
    Ok(out.dims()[1..].to_vec())
}

/// Pads the spatial dimensions of the physical signal `v` (one sample
/// `shape = [channels, h, w]`) by `[height, width]` samples at both ends
/// with `values`, one or one per channel.
///
/// ONNX's `Pad` takes one value, so distinct per-channel values are added
/// after zero padding as a constant border image that is 0 inside.
fn padded_signal(graph: &mut GraphBuilder, name: &str, v: &str, padding: [usize; 2], values: &[f64], shape: &[usize]) -> String {
    let first = values.first().copied().unwrap_or(0.0);
    if values.iter().all(|&x| x == first) {
        return pad_node(graph, name, v, padding, first);
    }
    let zero_padded = pad_node(graph, name, v, padding, 0.0);
    let [ph, pw] = padding;
    let (c, h, w) = (shape[0], shape[1] + 2 * ph, shape[2] + 2 * pw);
    let mut border = vec![0f32; c * h * w];
    for (channel, value) in values.iter().enumerate().take(c) {
        for row in 0..h {
            for col in 0..w {
                let inside = (ph..h - ph).contains(&row) && (pw..w - pw).contains(&col);
                if !inside {
                    border[(channel * h + row) * w + col] = *value as f32;
                }
            }
        }
    }
    let border = graph.initializer(&format!("{name}.border"), &[c, h, w], &border);
    graph.node("Add", &format!("{name}_border"), &[&zero_padded, &border], vec![])
}

/// The initializer names of a non-negative affine layer.
pub(super) struct AffineInitializers {
    alpha: String,
    positive: String,
    negative: String,
    bias: String,
}

/// Adds the initializers `{name}.alpha`, `.positive`, `.negative` and
/// `.bias` of `a`, whose input has one-sample rank `rank`. A conv1d
/// kernel `[out, in / groups, k]` is written as `[out, in / groups, 1, k]`.
pub(super) fn affine_initializers(graph: &mut GraphBuilder, name: &str, a: &NonnegAffine, rank: usize) -> Result<AffineInitializers> {
    let alpha = channel_constant(graph, &format!("{name}.alpha"), &a.alpha, rank);
    let mut dims = a.positive.dims().to_vec();
    if matches!(a.op, AffineOp::Conv1d { .. }) {
        dims.insert(2, 1);
    }
    let positive = graph.initializer(&format!("{name}.positive"), &dims, &values_f32(&a.positive)?);
    let negative = graph.initializer(&format!("{name}.negative"), &dims, &values_f32(&a.negative)?);
    let out = a.bias.dims()[0];
    let bias_dims = if a.op == AffineOp::Linear { vec![out] } else { vec![out, 1, 1] };
    let bias = graph.initializer(&format!("{name}.bias"), &bias_dims, &values_f32(&a.bias)?);
    Ok(AffineInitializers { alpha, positive, negative, bias })
}

/// Adds the nodes of `z' = P u + N (alpha - u) + bias`.
fn nonneg_affine(graph: &mut GraphBuilder, name: &str, u: &str, a: &NonnegAffine, shape: &[usize]) -> Result<String> {
    let initializers = affine_initializers(graph, name, a, shape.len())?;
    affine_nodes(graph, name, u, a, &initializers, shape)
}

/// Adds the nodes `{name}/complement` to `{name}/bias` of the affine layer
/// `a` reading `u`, with its parameters in `initializers`.
pub(super) fn affine_nodes(
    graph: &mut GraphBuilder,
    name: &str,
    u: &str,
    a: &NonnegAffine,
    initializers: &AffineInitializers,
    shape: &[usize],
) -> Result<String> {
    let AffineInitializers { alpha, positive, negative, bias } = initializers;
    let complement = graph.node("Sub", &format!("{name}/complement"), &[alpha, u], vec![]);
    // The port's output is alpha - u >= 0; rounding at u = alpha can give
    // -1 ulp, which this removes, as isonn's forward pass does.
    let complement = graph.node("Relu", &format!("{name}/complement_floor"), &[&complement], vec![]);

    let settings = match a.op {
        AffineOp::Linear => None,
        AffineOp::Conv2d { stride, padding, dilation, groups } => {
            let (_, _, kh, kw) = a.positive.dims4()?;
            Some(ConvSettings::conv2d(kh, kw, stride, padding, dilation, groups))
        }
        AffineOp::Conv1d { stride, padding, dilation, groups } => {
            let (_, _, k) = a.positive.dims3()?;
            Some(ConvSettings::conv1d(k, stride, padding, dilation, groups))
        }
    };
    let (signal, complement) = match settings {
        None => {
            let transposed = vec![int("transB", 1)];
            let signal = graph.node("Gemm", &format!("{name}/signal_weights"), &[u, positive], transposed.clone());
            let complement = graph.node("Gemm", &format!("{name}/complement_weights"), &[&complement, negative], transposed);
            (signal, complement)
        }
        Some(settings) => {
            let (mut u_in, mut complement_in) = (u.to_string(), complement);
            if settings.padding != [0, 0] {
                let (signal_pad, complement_pad) = a.pad_values();
                u_in = padded_signal(graph, &format!("{name}/signal_pad"), u, settings.padding, &signal_pad, shape);
                complement_in = padded_signal(graph, &format!("{name}/complement_pad"), &complement_in, settings.padding, &complement_pad, shape);
            }
            let attributes = settings.attributes(false);
            let signal = graph.node("Conv", &format!("{name}/signal_weights"), &[&u_in, positive], attributes.clone());
            let complement = graph.node("Conv", &format!("{name}/complement_weights"), &[&complement_in, negative], attributes);
            (signal, complement)
        }
    };

    let detector = graph.node("Add", &format!("{name}/detector"), &[&signal, &complement], vec![]);
    Ok(graph.node("Add", &format!("{name}/bias"), &[&detector, bias], vec![]))
}

/// Adds the activation device `f(v + input_offset) - output_offset`,
/// clamped to the activation's output bounds as isonn's forward pass does.
pub(super) fn nonneg_activation(graph: &mut GraphBuilder, name: &str, v: &str, a: &NonnegActivation) -> Result<String> {
    let shifted = offset_node(graph, &format!("{name}/shift"), v, -a.input_offset);
    let mut y = activation_nodes(graph, name, &shifted, &a.activation)?;
    if let Some((lo, hi)) = a.activation.output_bounds() {
        y = clip_node(graph, &format!("{name}/clamp"), &y, lo, hi);
    }
    Ok(offset_node(graph, &format!("{name}/output_offset"), &y, a.output_offset))
}
