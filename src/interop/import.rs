//! Import of ONNX models (opset 13 and later, as `torch.onnx.export`
//! writes them) into isonn's regular [`Network`].
//!
//! Nodes are read in the file's (topological) order. Each tensor is a
//! constant, a signal (the output of a chain of isonn layers from the graph
//! input) or an elementwise expression of one signal that is not yet known
//! to be an activation. An expression becomes an activation layer when a
//! structural node reads it; [`super::elementwise::recognise`] decides
//! which. An `Add` of two signals becomes a residual block from their last
//! common signal. Anything else is an error that names the node.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::constant_ops::{fold, FoldAttributes, FOLDED_OPS};
use super::elementwise::{recognise, Expr, BINARY_OPS, UNARY_OPS};
use super::pad::symmetric_spatial_padding;
use super::proto::{attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto, AttributeProto, ModelProto, NodeProto};
use super::tensor::{decode_tensor, TensorData};
use crate::error::{Error, Result};
use crate::model::{BatchNorm, Conv2d, Layer, Linear, Network, Pool, Range, Residual};

/// The operators isonn imports, for error messages.
pub const SUPPORTED_OPS: &str = "Gemm, MatMul + Add, Conv, BatchNormalization, Relu, Clip, Tanh, \
     the photonic activations and GELU as their elementwise formulas (Sub, Add, Mul, Div, Pow, Sin, \
     Exp, Erf, Sigmoid, Reciprocal, Min, Max, Neg with constant operands), Gelu (exact form), AveragePool, MaxPool, \
     GlobalAveragePool, ReduceMean over height and width, Flatten, Reshape that flattens, Add of two branches (residual), Dropout, \
     Identity, Constant, Pad (constant, the same on all spatial sides, directly before a Conv or \
     AveragePool), ConstantOfShape, Concat, Reshape, Slice, Transpose and Cast on constants, and a \
     final Softmax or LogSoftmax";

/// An imported network and what isonn keeps of the graph beyond it.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The network; its logits are the graph's output before any final
    /// softmax.
    pub network: Network,
    /// `"Softmax"` or `"LogSoftmax"` when the graph ends in one. isonn
    /// outputs the logits, whose argmax is the same.
    pub output_function: Option<String>,
}

/// One signal: a layer applied to a parent signal (none for the input).
struct Signal {
    parent: Option<usize>,
    layer: Option<Layer>,
    shape: Vec<usize>,
    /// Whether the layer is a `MatMul` still waiting for its bias `Add`.
    bias_pending: bool,
}

enum Value {
    Constant(TensorData),
    Signal(usize),
    /// An expression of a signal, with the names of its nodes.
    Expr(usize, Expr, Vec<String>),
    /// A signal padded by a `Pad` node, waiting for the convolution or
    /// pool that reads it to take the padding over.
    Padded(PendingPad),
}

/// A constant `Pad` of a signal on all four spatial sides.
#[derive(Clone)]
struct PendingPad {
    signal: usize,
    padding: usize,
    value: f64,
    /// The name of the `Pad` node, for errors.
    node: String,
}

struct Importer<'a> {
    path: &'a Path,
    values: HashMap<String, Value>,
    signals: Vec<Signal>,
}

/// Imports `model`, read from `path` (named in errors). `input_ranges` is
/// the range of every input value, or one range per input channel.
pub fn import_model(model: &ModelProto, path: &Path, input_ranges: &[Range]) -> Result<Imported> {
    let location = path.display().to_string();
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::interop(&location, "the model has no graph"))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx"))
        .and_then(|o| o.version);
    if opset.is_some_and(|v| v < 11) {
        return Err(Error::interop(
            &location,
            format!("opset {} is older than 11; export the model again with opset_version=13 or later", opset.unwrap_or(0)),
        ));
    }

    let mut importer = Importer {
        path,
        values: HashMap::new(),
        signals: Vec::new(),
    };
    for tensor in &graph.initializer {
        let name = tensor.name.clone().unwrap_or_default();
        let data = decode_tensor(tensor).map_err(|m| Error::interop(&location, format!("initializer: {m}")))?;
        importer.values.insert(name, Value::Constant(data));
    }
    let input_shape = importer.add_graph_input(model)?;

    let mut output_function = None;
    let output_name = match graph.output.as_slice() {
        [o] => o.name.clone().unwrap_or_default(),
        outputs => {
            return Err(Error::interop(
                &location,
                format!("the graph has {} outputs; isonn imports a graph with one output, the logits", outputs.len()),
            ))
        }
    };
    for node in &graph.node {
        let op = node.op_type.as_deref().unwrap_or("");
        if op == "Softmax" || op == "LogSoftmax" {
            if node.output.first() != Some(&output_name) {
                return Err(importer.node_error(node, "a Softmax or LogSoftmax is supported only as the last node, on the graph output"));
            }
            let id = importer.signal(node, 0)?;
            importer.values.insert(output_name.clone(), Value::Signal(id));
            output_function = Some(op.to_string());
            continue;
        }
        importer.add_node(node)?;
    }

    let last = match importer.values.remove(&output_name) {
        Some(Value::Signal(id)) => id,
        Some(Value::Expr(base, expr, nodes)) => importer.materialise(base, expr, &nodes)?,
        Some(Value::Constant(_)) => return Err(Error::interop(&location, "the graph output is a constant")),
        Some(Value::Padded(pad)) => return Err(Error::interop(&location, unfolded_pad_message(&pad))),
        None => return Err(Error::interop(&location, format!("no node produces the graph output {output_name}"))),
    };

    let layers = importer.chain(None, last);
    let (lo, hi) = input_ranges
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| (lo.min(r.lo), hi.max(r.hi)));
    let mut network = Network::new(&input_shape, Range::new(lo, hi)?, layers);
    if input_ranges.len() > 1 {
        if input_ranges.len() != input_shape[0] {
            return Err(Error::config(
                "--input-range",
                format!("{} ranges", input_ranges.len()),
                format!("give one range, or one per input channel ({})", input_shape[0]),
            ));
        }
        network.channel_ranges = input_ranges.to_vec();
    }
    network.output_shape()?;
    Ok(Imported { network, output_function })
}

fn attribute<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

fn int_attribute(node: &NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).and_then(|a| a.i).unwrap_or(default)
}

fn float_attribute(node: &NodeProto, name: &str, default: f64) -> f64 {
    attribute(node, name).and_then(|a| a.f).map_or(default, |f| f as f64)
}

fn ints_attribute(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attribute(node, name).map(|a| a.ints.clone())
}

fn unfolded_pad_message(pad: &PendingPad) -> String {
    format!(
        "reads the output of Pad node {}; isonn imports a Pad only directly before the Conv, \
         AveragePool or MaxPool that it pads, folded into that layer's padding",
        pad.node
    )
}

fn to_tensor(data: &TensorData, dims: &[usize]) -> Result<Tensor> {
    let values: Vec<f32> = data.values.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

impl Importer<'_> {
    fn node_error(&self, node: &NodeProto, message: impl Into<String>) -> Error {
        Error::interop(
            format!(
                "{}: node {} ({})",
                self.path.display(),
                node.name.as_deref().unwrap_or("(unnamed)"),
                node.op_type.as_deref().unwrap_or("")
            ),
            message,
        )
    }

    /// Registers the graph input (the one graph input that is not an
    /// initializer) and returns the isonn input shape `[c, h, w]`.
    fn add_graph_input(&mut self, model: &ModelProto) -> Result<Vec<usize>> {
        let graph = model.graph.as_ref().expect("checked by the caller");
        let location = self.path.display().to_string();
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !self.values.contains_key(i.name.as_deref().unwrap_or("")))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(Error::interop(
                &location,
                format!("the graph has {} data inputs; isonn imports a graph with one", inputs.len()),
            ));
        };

        let name = input.name.clone().unwrap_or_default();
        let Some(type_proto::Value::TensorType(tensor)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return Err(Error::interop(&location, format!("graph input {name} is not a tensor")));
        };
        let dims: Vec<Option<i64>> = tensor
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(dimension::Value::DimValue(v)) => Some(v),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sample: Option<Vec<usize>> = dims.iter().skip(1).map(|d| d.and_then(|v| usize::try_from(v).ok()).filter(|&v| v > 0)).collect();
        let (root_shape, flatten) = match (dims.len(), sample) {
            (4, Some(s)) => (s, false),
            (2, Some(s)) => (vec![1, 1, s[0]], true),
            _ => {
                return Err(Error::interop(
                    &location,
                    format!(
                        "graph input {name} has shape {dims:?}; isonn imports [batch, channels, \
                         height, width] or [batch, features] with fixed sizes after the batch"
                    ),
                ))
            }
        };

        self.signals.push(Signal {
            parent: None,
            layer: None,
            shape: root_shape.clone(),
            bias_pending: false,
        });
        let mut id = 0;
        if flatten {
            // isonn's inputs are [c, h, w]; a [batch, features] graph reads
            // them as [1, 1, features], flattened.
            self.signals.push(Signal {
                parent: Some(0),
                layer: Some(Layer::Flatten),
                shape: vec![root_shape[2]],
                bias_pending: false,
            });
            id = 1;
        }
        self.values.insert(name, Value::Signal(id));
        Ok(root_shape)
    }

    /// Returns the layers from `from` (exclusive; `None` for the input) to
    /// `to`.
    fn chain(&self, from: Option<usize>, to: usize) -> Vec<Layer> {
        let mut layers = Vec::new();
        let mut at = Some(to);
        while at != from {
            let Some(id) = at else { break };
            if let Some(layer) = &self.signals[id].layer {
                layers.push(layer.clone());
            }
            at = self.signals[id].parent;
        }
        layers.reverse();
        layers
    }

    fn path(&self, to: usize) -> Vec<usize> {
        let mut path = vec![to];
        while let Some(parent) = self.signals[*path.last().expect("not empty")].parent {
            path.push(parent);
        }
        path.reverse();
        path
    }

    /// Adds `layer` after signal `parent`, checking the shapes.
    fn push(&mut self, node: &NodeProto, parent: usize, layer: Layer) -> Result<usize> {
        if let Layer::Activation(a) = &layer {
            a.validate().map_err(|m| self.node_error(node, m))?;
        }
        let shape = layer
            .output_shape(&self.signals[parent].shape)
            .map_err(|m| self.node_error(node, format!("{} layer: {m}", layer.kind())))?;
        self.signals.push(Signal {
            parent: Some(parent),
            layer: Some(layer),
            shape,
            bias_pending: false,
        });
        Ok(self.signals.len() - 1)
    }

    fn value(&self, node: &NodeProto, i: usize) -> Result<&Value> {
        let name = node.input.get(i).map(String::as_str).unwrap_or("");
        if name.is_empty() {
            return Err(self.node_error(node, format!("input {i} is missing")));
        }
        self.values.get(name).ok_or_else(|| {
            self.node_error(
                node,
                format!(
                    "reads {name}, which no node, initializer or graph input produces; the file is \
                     incomplete (a missing initializer?), so export it again"
                ),
            )
        })
    }

    fn constant(&self, node: &NodeProto, i: usize) -> Result<&TensorData> {
        match self.value(node, i)? {
            Value::Constant(t) => Ok(t),
            _ => Err(self.node_error(
                node,
                format!("input {i} must be a constant (an initializer or Constant node), but it is computed from the graph input"),
            )),
        }
    }

    fn optional_constant(&self, node: &NodeProto, i: usize) -> Result<Option<&TensorData>> {
        match node.input.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(_) => self.constant(node, i).map(Some),
        }
    }

    /// Returns input `i` as a signal, turning an expression into an
    /// activation layer.
    fn signal(&mut self, node: &NodeProto, i: usize) -> Result<usize> {
        let name = node.input.get(i).cloned().unwrap_or_default();
        match self.value(node, i)? {
            Value::Signal(id) => Ok(*id),
            Value::Expr(base, expr, nodes) => {
                let (base, expr, nodes) = (*base, expr.clone(), nodes.clone());
                let id = self.materialise(base, expr, &nodes)?;
                self.values.insert(name, Value::Signal(id));
                Ok(id)
            }
            Value::Constant(_) => Err(self.node_error(node, format!("input {i} ({name}) is a constant; it must be computed from the graph input"))),
            Value::Padded(pad) => Err(self.node_error(node, unfolded_pad_message(pad))),
        }
    }

    /// Returns input 0 as a signal and the `Pad` that produced it, if any.
    fn padded_signal(&mut self, node: &NodeProto) -> Result<(usize, Option<PendingPad>)> {
        if let Value::Padded(pad) = self.value(node, 0)? {
            return Ok((pad.signal, Some(pad.clone())));
        }
        Ok((self.signal(node, 0)?, None))
    }

    fn materialise(&mut self, base: usize, expr: Expr, nodes: &[String]) -> Result<usize> {
        let location = format!("{}: nodes {}", self.path.display(), nodes.join(", "));
        let activation = recognise(&expr).ok_or_else(|| {
            Error::interop(
                &location,
                format!(
                    "the elementwise formula ({}) matches none of isonn's activations: \
                     photonic-sigmoid, photonic-sinusoidal, relu, relu-n (Clip or Relu then Min), \
                     tanh, gelu and gelu-n (GELU then Clip or Min); a plain Sigmoid is not one of them",
                    expr.ops().join(", ")
                ),
            )
        })?;
        let shape = self.signals[base].shape.clone();
        self.signals.push(Signal {
            parent: Some(base),
            layer: Some(Layer::Activation(activation)),
            shape,
            bias_pending: false,
        });
        Ok(self.signals.len() - 1)
    }

    fn set_output(&mut self, node: &NodeProto, value: Value) {
        if let Some(name) = node.output.first() {
            self.values.insert(name.clone(), value);
        }
    }

    fn add_node(&mut self, node: &NodeProto) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let domain = node.domain.as_deref().unwrap_or("");
        if !(domain.is_empty() || domain == "ai.onnx") {
            return Err(self.node_error(node, format!("operator domain {domain} is not supported; isonn imports {SUPPORTED_OPS}")));
        }
        if FOLDED_OPS.contains(&op) {
            if let Some(folded) = self.fold_constants(node)? {
                self.set_output(node, Value::Constant(folded));
                return Ok(());
            }
        }
        let value = match op {
            "Constant" => Value::Constant(self.constant_node(node)?),
            "Pad" => Value::Padded(self.pad(node)?),
            "Identity" => match self.value(node, 0)? {
                Value::Constant(t) => Value::Constant(t.clone()),
                _ => Value::Signal(self.signal(node, 0)?),
            },
            "Dropout" => {
                let x = self.signal(node, 0)?;
                let ratio = match self.optional_constant(node, 1)? {
                    Some(t) => t.values.first().copied().unwrap_or(0.5),
                    None => float_attribute(node, "ratio", 0.5),
                };
                Value::Signal(self.push(node, x, Layer::Dropout(ratio))?)
            }
            "Gemm" => Value::Signal(self.gemm(node)?),
            "MatMul" => Value::Signal(self.matmul(node)?),
            "Conv" => Value::Signal(self.conv(node)?),
            "BatchNormalization" => Value::Signal(self.batch_norm(node)?),
            "AveragePool" | "MaxPool" => Value::Signal(self.pool(node)?),
            "GlobalAveragePool" => {
                let x = self.signal(node, 0)?;
                Value::Signal(self.push(node, x, Layer::GlobalAvgPool)?)
            }
            "ReduceMean" => Value::Signal(self.reduce_mean(node)?),
            "Flatten" => {
                let axis = int_attribute(node, "axis", 1);
                if axis != 1 {
                    return Err(self.node_error(node, format!("Flatten with axis {axis}; isonn flattens everything after the batch (axis 1)")));
                }
                Value::Signal(self.flatten(node)?)
            }
            "Reshape" => Value::Signal(self.reshape(node)?),
            "Add" if self.is_residual_add(node) => Value::Signal(self.residual(node)?),
            "Add" if self.is_bias_add(node)? => Value::Signal(self.bias_add(node)?),
            "Clip" => self.clip(node)?,
            "Gelu" => {
                let approximate = attribute(node, "approximate").and_then(|a| a.s.clone()).unwrap_or_default();
                if !(approximate.is_empty() || approximate == b"none") {
                    return Err(self.node_error(
                        node,
                        format!(
                            "Gelu with approximate={} is not supported; isonn's gelu is the exact \
                             erf form, so export nn.GELU() without approximate='tanh'",
                            String::from_utf8_lossy(&approximate)
                        ),
                    ));
                }
                self.elementwise(node)?
            }
            op if UNARY_OPS.contains(&op) || BINARY_OPS.contains(&op) => self.elementwise(node)?,
            _ => {
                return Err(self.node_error(node, format!("unsupported operator {op}; isonn imports {SUPPORTED_OPS}")));
            }
        };
        self.set_output(node, value);
        Ok(())
    }

    fn constant_node(&self, node: &NodeProto) -> Result<TensorData> {
        let Some(a) = node.attribute.first() else {
            return Err(self.node_error(node, "Constant node without a value"));
        };
        let kind = a.r#type.and_then(|t| AttributeType::try_from(t).ok());
        match (a.name.as_deref(), kind) {
            (Some("value"), _) => {
                let t = a.t.as_ref().ok_or_else(|| self.node_error(node, "Constant value attribute has no tensor"))?;
                decode_tensor(t).map_err(|m| self.node_error(node, m))
            }
            (Some("value_float"), _) => Ok(TensorData { dims: vec![], values: vec![a.f.unwrap_or(0.0) as f64] }),
            (Some("value_int"), _) => Ok(TensorData { dims: vec![], values: vec![a.i.unwrap_or(0) as f64] }),
            (Some("value_floats"), _) => Ok(TensorData { dims: vec![a.floats.len()], values: a.floats.iter().map(|&v| v as f64).collect() }),
            (Some("value_ints"), _) => Ok(TensorData { dims: vec![a.ints.len()], values: a.ints.iter().map(|&v| v as f64).collect() }),
            (name, _) => Err(self.node_error(node, format!("Constant attribute {name:?} is not supported; use value, value_float(s) or value_int(s)"))),
        }
    }

    /// Evaluates a shape operator whose inputs are all constants; returns
    /// `None` when one of them is computed from the graph input.
    fn fold_constants(&self, node: &NodeProto) -> Result<Option<TensorData>> {
        let mut inputs = Vec::new();
        for (i, name) in node.input.iter().enumerate() {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            match self.value(node, i)? {
                Value::Constant(t) => inputs.push(Some(t)),
                _ => return Ok(None),
            }
        }
        let fill = match attribute(node, "value").and_then(|a| a.t.as_ref()) {
            Some(t) => decode_tensor(t).map_err(|m| self.node_error(node, m))?.values.first().copied().unwrap_or(0.0),
            None => 0.0,
        };
        // ONNX's integer and boolean types: uint8 to int64, bool, uint32, uint64.
        let to = int_attribute(node, "to", 1);
        let attributes = FoldAttributes {
            axis: int_attribute(node, "axis", 0),
            perm: ints_attribute(node, "perm").unwrap_or_default(),
            fill,
            cast_to_integer: matches!(to, 2..=7 | 9 | 12 | 13),
        };
        let op = node.op_type.as_deref().unwrap_or("");
        fold(op, &inputs, &attributes).map(Some).map_err(|m| self.node_error(node, format!("on constants: {m}")))
    }

    /// Returns a layer's own padding plus that of the `Pad` before it.
    fn folded_padding(&self, node: &NodeProto, own: usize, pad: &PendingPad) -> Result<usize> {
        const LIMIT: usize = 1 << 16;
        match own.checked_add(pad.padding) {
            Some(total) if total <= LIMIT => Ok(total),
            _ => Err(self.node_error(
                node,
                format!("its padding {own} plus {} from Pad node {} is more than {LIMIT}", pad.padding, pad.node),
            )),
        }
    }

    /// Reads a constant `Pad` of the spatial axes, which the convolution
    /// or pool reading it takes over.
    fn pad(&mut self, node: &NodeProto) -> Result<PendingPad> {
        let mode = attribute(node, "mode").and_then(|a| a.s.clone()).unwrap_or_default();
        if !(mode.is_empty() || mode == b"constant") {
            return Err(self.node_error(
                node,
                format!("mode {} is not supported; isonn imports constant padding only", String::from_utf8_lossy(&mode)),
            ));
        }
        let (pads, value) = match self.optional_constant(node, 1)? {
            Some(t) => (t.values.iter().map(|&v| v as i64).collect(), None),
            // Opsets before 11 give the amounts and value as attributes.
            None => (ints_attribute(node, "pads").unwrap_or_default(), attribute(node, "value").and_then(|a| a.f)),
        };
        let value = match self.optional_constant(node, 2)? {
            Some(t) if t.values.len() == 1 => t.values[0],
            Some(t) => return Err(self.node_error(node, format!("constant_value has shape {:?}; expected a scalar", t.dims))),
            None => value.map_or(0.0, f64::from),
        };
        let axes: Option<Vec<i64>> = self.optional_constant(node, 3)?.map(|t| t.values.iter().map(|&v| v as i64).collect());
        let signal = self.signal(node, 0)?;
        if self.signals[signal].shape.len() != 3 {
            return Err(self.node_error(
                node,
                format!("pads a signal of shape {:?}; isonn pads only [channels, height, width] images", self.signals[signal].shape),
            ));
        }
        let padding = symmetric_spatial_padding(&pads, axes.as_deref()).map_err(|m| self.node_error(node, m))?;
        Ok(PendingPad {
            signal,
            padding,
            value,
            node: node.name.clone().unwrap_or_else(|| "(unnamed)".into()),
        })
    }

    fn gemm(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        if int_attribute(node, "transA", 0) != 0 {
            return Err(self.node_error(node, "Gemm with transA=1 is not supported; the data must be the first operand, untransposed"));
        }
        let b = self.constant(node, 1)?.clone();
        let [k, n] = b.dims[..] else {
            return Err(self.node_error(node, format!("weight has shape {:?}; Gemm needs a matrix", b.dims)));
        };

        let alpha = float_attribute(node, "alpha", 1.0);
        let beta = float_attribute(node, "beta", 1.0);
        let trans_b = int_attribute(node, "transB", 0) != 0;
        let (out, inputs) = if trans_b { (k, n) } else { (n, k) };
        let mut weight = vec![0.0; out * inputs];
        for o in 0..out {
            for i in 0..inputs {
                let v = if trans_b { b.values[o * inputs + i] } else { b.values[i * out + o] };
                weight[o * inputs + i] = alpha * v;
            }
        }

        let bias = match self.optional_constant(node, 2)? {
            None => vec![0.0; out],
            Some(c) if c.values.len() == out => c.values.iter().map(|v| beta * v).collect(),
            Some(c) if c.values.len() == 1 => vec![beta * c.values[0]; out],
            Some(c) => return Err(self.node_error(node, format!("bias has shape {:?}; expected [{out}]", c.dims))),
        };
        let layer = Layer::Linear(Linear {
            weight: to_tensor(&TensorData { dims: vec![], values: weight }, &[out, inputs])?,
            bias: to_tensor(&TensorData { dims: vec![], values: bias }, &[out])?,
        });
        self.push(node, x, layer)
    }

    fn matmul(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        let b = self.constant(node, 1)?.clone();
        let [inputs, out] = b.dims[..] else {
            return Err(self.node_error(node, format!("weight has shape {:?}; MatMul needs a constant matrix as its second operand", b.dims)));
        };
        let mut weight = vec![0.0; out * inputs];
        for o in 0..out {
            for i in 0..inputs {
                weight[o * inputs + i] = b.values[i * out + o];
            }
        }
        let layer = Layer::Linear(Linear {
            weight: to_tensor(&TensorData { dims: vec![], values: weight }, &[out, inputs])?,
            bias: to_tensor(&TensorData { dims: vec![], values: vec![0.0; out] }, &[out])?,
        });
        let id = self.push(node, x, layer)?;
        self.signals[id].bias_pending = true;
        Ok(id)
    }

    fn is_bias_add(&self, node: &NodeProto) -> Result<bool> {
        let (Value::Signal(id), Value::Constant(c)) = (self.value(node, 0)?, self.value(node, 1)?) else {
            return Ok(false);
        };
        let signal = &self.signals[*id];
        Ok(signal.bias_pending && !c.dims.is_empty() && c.values.len() == signal.shape[0])
    }

    fn bias_add(&mut self, node: &NodeProto) -> Result<usize> {
        let Value::Signal(id) = self.value(node, 0)? else { unreachable!("checked by is_bias_add") };
        let id = *id;
        let bias = self.constant(node, 1)?.clone();
        let mut signal = Signal {
            parent: self.signals[id].parent,
            layer: self.signals[id].layer.clone(),
            shape: self.signals[id].shape.clone(),
            bias_pending: false,
        };
        if let Some(Layer::Linear(l)) = &mut signal.layer {
            l.bias = to_tensor(&bias, &[bias.values.len()])?;
        }
        self.signals.push(signal);
        Ok(self.signals.len() - 1)
    }

    fn conv(&mut self, node: &NodeProto) -> Result<usize> {
        let (x, pad) = self.padded_signal(node)?;
        let w = self.constant(node, 1)?.clone();
        let [out, _, kh, kw] = w.dims[..] else {
            return Err(self.node_error(node, format!("weight has shape {:?}; isonn imports 2-D convolutions", w.dims)));
        };
        let bias = match self.optional_constant(node, 2)? {
            None => TensorData { dims: vec![out], values: vec![0.0; out] },
            Some(b) if b.values.len() == out => b.clone(),
            Some(b) => return Err(self.node_error(node, format!("bias has shape {:?}; expected [{out}]", b.dims))),
        };

        self.check_auto_pad(node)?;
        let stride = self.uniform(node, "strides", 1)?;
        let dilation = self.uniform(node, "dilations", 1)?;
        let mut padding = self.uniform(node, "pads", 0)?;
        let mut pad_value = Vec::new();
        if let Some(pad) = pad {
            if pad.value != 0.0 && padding > 0 {
                return Err(self.node_error(
                    node,
                    format!(
                        "reads Pad node {} (value {}) and pads by {padding} itself with zeros; \
                         isonn pads a convolution with one value, so use one of the two paddings",
                        pad.node, pad.value
                    ),
                ));
            }
            padding = self.folded_padding(node, padding, &pad)?;
            if pad.value != 0.0 {
                pad_value = vec![pad.value];
            }
        }
        if let Some(k) = ints_attribute(node, "kernel_shape") {
            if k != [kh as i64, kw as i64] {
                return Err(self.node_error(node, format!("kernel_shape {k:?} does not match the weight's {kh}x{kw}")));
            }
        }

        let groups = usize::try_from(int_attribute(node, "group", 1)).unwrap_or(0);
        let layer = Layer::Conv2d(Conv2d {
            weight: to_tensor(&w, &w.dims)?,
            bias: to_tensor(&bias, &[out])?,
            stride,
            padding,
            dilation,
            groups,
            pad_value,
        });
        self.push(node, x, layer)
    }

    fn check_auto_pad(&self, node: &NodeProto) -> Result<()> {
        let auto_pad = attribute(node, "auto_pad").and_then(|a| a.s.clone()).unwrap_or_default();
        if !(auto_pad.is_empty() || auto_pad == b"NOTSET") {
            return Err(self.node_error(
                node,
                format!("auto_pad {} is not supported; export with explicit padding", String::from_utf8_lossy(&auto_pad)),
            ));
        }
        Ok(())
    }

    /// Reads an integer-list attribute whose entries must all be equal
    /// (isonn uses one stride, dilation or padding for both dimensions).
    fn uniform(&self, node: &NodeProto, name: &str, default: usize) -> Result<usize> {
        let Some(values) = ints_attribute(node, name) else {
            return Ok(default);
        };
        match values.first() {
            None => Ok(default),
            Some(&first) if values.iter().all(|&v| v == first) && first >= 0 => Ok(first as usize),
            _ => Err(self.node_error(
                node,
                format!("{name} {values:?} differ between dimensions or sides; isonn supports one value for all"),
            )),
        }
    }

    fn batch_norm(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        if int_attribute(node, "training_mode", 0) != 0 {
            return Err(self.node_error(node, "training_mode=1; export the model in eval mode (model.eval())"));
        }
        let mut parts = Vec::new();
        for i in 1..5 {
            let t = self.constant(node, i)?;
            parts.push(to_tensor(t, &[t.values.len()])?);
        }
        let channels = parts[0].dims()[0];
        if parts.iter().any(|p| p.dims()[0] != channels) {
            return Err(self.node_error(node, "scale, bias, mean and variance have different lengths"));
        }
        let eps = float_attribute(node, "epsilon", 1e-5);
        let momentum = 1.0 - float_attribute(node, "momentum", 0.9);
        let [weight, bias, mean, var]: [Tensor; 4] = parts.try_into().expect("four parts");
        self.push(node, x, Layer::BatchNorm(BatchNorm::from_parts(weight, bias, mean, var, eps, momentum)))
    }

    fn pool(&mut self, node: &NodeProto) -> Result<usize> {
        let op = node.op_type.as_deref().unwrap_or("");
        let (x, pad) = self.padded_signal(node)?;
        self.check_auto_pad(node)?;
        if int_attribute(node, "ceil_mode", 0) != 0 {
            return Err(self.node_error(node, "ceil_mode=1 is not supported; use ceil_mode=False"));
        }
        let kernel = self.uniform(node, "kernel_shape", 0)?;
        let stride = self.uniform(node, "strides", 1)?;
        let padding = self.uniform(node, "pads", 0)?;
        if op == "MaxPool" && self.uniform(node, "dilations", 1)? != 1 {
            return Err(self.node_error(node, "MaxPool with dilation is not supported"));
        }
        if op == "AveragePool" && padding > 0 && int_attribute(node, "count_include_pad", 0) == 0 {
            return Err(self.node_error(
                node,
                "AveragePool with padding and count_include_pad=0 is not supported; isonn counts the \
                 padding in the average, as PyTorch's AvgPool2d does by default",
            ));
        }
        let padding = match pad {
            None => padding,
            Some(pad) if op == "AveragePool" && pad.value == 0.0 => self.folded_padding(node, padding, &pad)?,
            Some(pad) => {
                let reason = if op == "MaxPool" {
                    "MaxPool pads with -infinity, so a constant Pad before it computes something else"
                } else {
                    "isonn's average pool pads with zeros only"
                };
                return Err(self.node_error(
                    node,
                    format!("reads Pad node {} (value {}), which cannot be folded into it: {reason}", pad.node, pad.value),
                ));
            }
        };
        let pool = Pool { kernel, stride, padding };
        let layer = if op == "MaxPool" { Layer::MaxPool2d(pool) } else { Layer::AvgPool2d(pool) };
        self.push(node, x, layer)
    }

    /// Flattens a signal; a signal that is already flat passes unchanged.
    fn flatten(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        if self.signals[x].shape.len() == 1 {
            return Ok(x);
        }
        self.push(node, x, Layer::Flatten)
    }

    /// Reads a mean over height and width, as the dynamo exporter writes
    /// `AdaptiveAvgPool2d(1)`, as global average pooling. With
    /// `keepdims=1` ONNX keeps `[c, 1, 1]` where isonn has `[c]`; the
    /// `Flatten` or `Reshape` that follows leaves `[c]` as it is.
    fn reduce_mean(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        let axes: Vec<i64> = match self.optional_constant(node, 1)? {
            Some(t) => t.values.iter().map(|&v| v as i64).collect(),
            None => ints_attribute(node, "axes").unwrap_or_default(),
        };
        let rank = self.signals[x].shape.len() as i64 + 1;
        let mut positive: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + rank } else { a }).collect();
        positive.sort_unstable();
        if rank != 4 || positive != [2, 3] {
            return Err(self.node_error(
                node,
                format!(
                    "ReduceMean over axes {axes:?} of a rank-{rank} signal; isonn imports only the \
                     mean over height and width (axes 2 and 3), which is global average pooling"
                ),
            ));
        }
        self.push(node, x, Layer::GlobalAvgPool)
    }

    fn reshape(&mut self, node: &NodeProto) -> Result<usize> {
        let x = self.signal(node, 0)?;
        let target = self.constant(node, 1)?.values.clone();
        let size: usize = self.signals[x].shape.iter().product();
        let flattens = match target[..] {
            [batch, rest] => (rest == -1.0 || rest == size as f64) && (batch == -1.0 || batch == 0.0 || rest == -1.0 || batch >= 1.0),
            _ => false,
        };
        if !flattens {
            let target: Vec<i64> = target.iter().map(|&v| v as i64).collect();
            return Err(self.node_error(
                node,
                format!(
                    "Reshape to {target:?} does not flatten the [batch, {}] signal; isonn imports \
                     only a Reshape to [batch, -1], because no isonn layer regroups the values of a signal",
                    self.signals[x].shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        self.flatten(node)
    }

    fn is_residual_add(&self, node: &NodeProto) -> bool {
        let is_signal = |i: usize| matches!(self.value(node, i), Ok(Value::Signal(_) | Value::Expr(..)));
        let base = |i: usize| match self.value(node, i) {
            Ok(Value::Signal(id)) => Some(*id),
            Ok(Value::Expr(id, ..)) => Some(*id),
            _ => None,
        };
        // Two expressions of the same signal (x + f(x) elementwise) form
        // one expression, not a residual block.
        is_signal(0) && is_signal(1) && !(matches!(self.value(node, 0), Ok(Value::Expr(..))) && base(0) == base(1))
            && !(matches!(self.value(node, 1), Ok(Value::Expr(..))) && base(0) == base(1))
    }

    fn residual(&mut self, node: &NodeProto) -> Result<usize> {
        let a = self.signal(node, 0)?;
        let b = self.signal(node, 1)?;
        let (path_a, path_b) = (self.path(a), self.path(b));
        let common = path_a.iter().zip(&path_b).take_while(|(x, y)| x == y).count();
        let start = path_a[common - 1];
        let (mut main, mut shortcut) = (self.chain(Some(start), a), self.chain(Some(start), b));
        if main.is_empty() {
            std::mem::swap(&mut main, &mut shortcut);
        }
        self.push(node, start, Layer::Residual(Residual { main, shortcut }))
    }

    /// Converts input `i` into an expression of a signal, or a constant.
    fn operand(&self, node: &NodeProto, i: usize) -> Result<(Option<usize>, Expr, Vec<String>)> {
        Ok(match self.value(node, i)? {
            Value::Signal(id) => (Some(*id), Expr::Input, Vec::new()),
            Value::Expr(id, e, nodes) => (Some(*id), e.clone(), nodes.clone()),
            Value::Constant(t) if t.values.len() == 1 => (None, Expr::Constant(t.values[0]), Vec::new()),
            Value::Padded(pad) => return Err(self.node_error(node, unfolded_pad_message(pad))),
            Value::Constant(t) => {
                return Err(self.node_error(
                    node,
                    format!(
                        "constant operand {i} has shape {:?}; an activation's elementwise formula \
                         uses scalar constants (a per-channel scale or shift belongs in the layer before)",
                        t.dims
                    ),
                ))
            }
        })
    }

    fn elementwise(&mut self, node: &NodeProto) -> Result<Value> {
        let op: &'static str = UNARY_OPS
            .iter()
            .chain(BINARY_OPS.iter())
            .find(|o| Some(**o) == node.op_type.as_deref())
            .expect("checked by the caller");
        let arity = if UNARY_OPS.contains(&op) { 1 } else { 2 };
        let mut base = None;
        let mut operands = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..arity {
            let (b, e, n) = self.operand(node, i)?;
            if let (Some(x), Some(y)) = (base, b) {
                if x != y {
                    return Err(self.node_error(node, "combines two different signals elementwise; only Add of two branches (a residual sum) is supported"));
                }
            }
            base = base.or(b);
            operands.push(e);
            for name in n {
                if !nodes.contains(&name) {
                    nodes.push(name);
                }
            }
        }
        nodes.push(node.name.clone().unwrap_or_else(|| op.to_string()));
        let mut operands = operands.into_iter();
        let a = Box::new(operands.next().expect("arity >= 1"));
        let expr = match operands.next() {
            None => Expr::Unary(op, a),
            Some(b) => Expr::Binary(op, a, Box::new(b)),
        };
        Ok(match base {
            Some(id) => Value::Expr(id, expr, nodes),
            // Only constants: fold to a scalar constant.
            None => Value::Constant(TensorData { dims: vec![], values: vec![expr.eval(0.0)] }),
        })
    }

    /// Reads a `Clip` as `min(max(x, lo), hi)`, leaving out an absent bound.
    fn clip(&mut self, node: &NodeProto) -> Result<Value> {
        let (base, x, mut nodes) = self.operand(node, 0)?;
        let scalar = |t: Option<&TensorData>| -> Result<Option<f64>> {
            match t {
                None => Ok(None),
                Some(t) if t.values.len() == 1 => Ok(Some(t.values[0])),
                Some(t) => Err(self.node_error(node, format!("Clip bound has shape {:?}; expected a scalar", t.dims))),
            }
        };
        let mut lo = scalar(self.optional_constant(node, 1)?)?;
        let mut hi = scalar(self.optional_constant(node, 2)?)?;
        // Opsets before 11 give the bounds as attributes.
        if node.input.len() == 1 {
            lo = attribute(node, "min").and_then(|a| a.f).map(|v| v as f64);
            hi = attribute(node, "max").and_then(|a| a.f).map(|v| v as f64);
        }
        let mut expr = x;
        if let Some(lo) = lo {
            expr = Expr::Binary("Max", Box::new(expr), Box::new(Expr::Constant(lo)));
        }
        if let Some(hi) = hi {
            expr = Expr::Binary("Min", Box::new(expr), Box::new(Expr::Constant(hi)));
        }
        nodes.push(node.name.clone().unwrap_or_else(|| "Clip".into()));
        Ok(match base {
            Some(id) => Value::Expr(id, expr, nodes),
            None => Value::Constant(TensorData { dims: vec![], values: vec![expr.eval(0.0)] }),
        })
    }
}
