//! Regular (signed) networks: layers, the forward pass, initialisation and
//! the architectures of the method's protocol.
//!
//! A [`Network`] is a sequence of [`Layer`]s applied to an input of shape
//! `[channels, height, width]` whose values lie in a known [`Range`].

mod init;
mod layer;

pub use init::Init;
pub use layer::{Conv2d, Layer, Linear, Pool};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::error::{Error, Result};

/// A closed interval `[lo, hi]` that every value of a signal lies in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// The lower bound.
    pub lo: f64,
    /// The upper bound.
    pub hi: f64,
}

impl Range {
    /// Builds a range, rejecting `lo > hi` and non-finite bounds.
    pub fn new(lo: f64, hi: f64) -> Result<Self> {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::config(
                "range",
                format!("[{lo}, {hi}]"),
                "bounds must be finite with lo <= hi",
            ));
        }
        Ok(Range { lo, hi })
    }

    /// The width `hi - lo`, called alpha in the method.
    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }

    /// Returns the smallest range that contains both `self` and `x`.
    pub fn including(&self, x: f64) -> Range {
        Range {
            lo: self.lo.min(x),
            hi: self.hi.max(x),
        }
    }
}

/// The architectures of the method's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// Fully connected: flatten, then hidden layers, then the classifier.
    Mlp,
    /// The MNIST-size CNN: four 3x3 convolutions (two with stride 2), then
    /// fully connected 1024 -> 128 -> classes.
    Cnn,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Mlp => "mlp",
            Arch::Cnn => "cnn",
        })
    }
}

/// A regular feed-forward network.
#[derive(Debug, Clone)]
pub struct Network {
    /// Shape of one input sample, `[channels, height, width]`.
    pub input_shape: Vec<usize>,
    /// The range every input value lies in (`[0, 1]` for scaled pixels).
    pub input_range: Range,
    /// The layers, applied in order; the last produces the logits.
    pub layers: Vec<Layer>,
}

/// Largest number of values one layer may produce per sample (64 MiB in
/// f32), so that a model file cannot make the forward pass allocate without
/// bound through a huge padding or width.
pub const MAX_ACTIVATION_ELEMENTS: usize = 1 << 24;

impl Network {
    /// Builds the MLP `flatten -> hidden... -> classes` with `activation`
    /// after every hidden layer, initialised by `init` from `seed`.
    pub fn mlp(
        input_shape: &[usize],
        hidden: &[usize],
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        let mut layers = vec![Layer::Flatten];
        let mut width: usize = input_shape.iter().product();
        for &h in hidden {
            layers.push(Layer::Linear(Linear::zeros(width, h)?));
            layers.push(Layer::Activation(activation));
            width = h;
        }
        layers.push(Layer::Linear(Linear::zeros(width, classes)?));
        Self::initialised(input_shape, layers, init, seed)
    }

    /// Builds the method's MNIST-size CNN for `[1, 28, 28]` inputs: conv
    /// 1->32 k3, 32->32 k3 s2, 32->64 k3, 64->64 k3 s2, fc 1024->128, fc
    /// 128->classes, with `activation` after every layer but the last.
    pub fn cnn(
        input_shape: &[usize],
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        let channels = input_shape.first().copied().unwrap_or(1);
        let conv = |i, o, stride| Conv2d::zeros(i, o, 3, stride, 0, 1, 1);
        let mut layers = Vec::new();
        for (i, o, stride) in [(channels, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 2)] {
            layers.push(Layer::Conv2d(conv(i, o, stride)?));
            layers.push(Layer::Activation(activation));
        }
        layers.push(Layer::Flatten);
        let mut probe = Network {
            input_shape: input_shape.to_vec(),
            input_range: Range { lo: 0.0, hi: 1.0 },
            layers: layers.clone(),
        };
        let flat = probe.output_shape()?.iter().product::<usize>();
        layers.push(Layer::Linear(Linear::zeros(flat, 128)?));
        layers.push(Layer::Activation(activation));
        layers.push(Layer::Linear(Linear::zeros(128, classes)?));
        probe.layers = layers;
        Self::initialised(input_shape, probe.layers, init, seed)
    }

    /// Builds `arch` for the given input shape and class count.
    pub fn build(
        arch: Arch,
        input_shape: &[usize],
        hidden: &[usize],
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        match arch {
            Arch::Mlp => Self::mlp(input_shape, hidden, classes, activation, init, seed),
            Arch::Cnn => Self::cnn(input_shape, classes, activation, init, seed),
        }
    }

    fn initialised(input_shape: &[usize], layers: Vec<Layer>, init: Init, seed: u64) -> Result<Self> {
        let mut network = Network {
            input_shape: input_shape.to_vec(),
            input_range: Range { lo: 0.0, hi: 1.0 },
            layers,
        };
        network.output_shape()?;
        init.apply(&mut network, seed)?;
        Ok(network)
    }

    /// Computes the logits for a batch.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }

    /// Returns the shape of one output sample, checking that every layer
    /// accepts the shape the previous one produces.
    pub fn output_shape(&self) -> Result<Vec<usize>> {
        let mut shape = self.input_shape.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Layer::Activation(a) = layer {
                a.validate()
                    .map_err(|message| Error::Shape(format!("layer {i} (activation): {message}")))?;
            }
            shape = layer
                .output_shape(&shape)
                .map_err(|message| Error::Shape(format!("layer {i} ({}): {message}", layer.kind())))?;
            if shape.iter().any(|&d| d == 0) {
                return Err(Error::Shape(format!(
                    "layer {i} ({}) produces an empty output of shape {shape:?}",
                    layer.kind()
                )));
            }
            let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if elements.is_none_or(|n| n > MAX_ACTIVATION_ELEMENTS) {
                return Err(Error::Shape(format!(
                    "layer {i} ({}) produces an output of shape {shape:?}, more than \
                     {MAX_ACTIVATION_ELEMENTS} values per sample; check its padding, stride and sizes",
                    layer.kind()
                )));
            }
        }
        if shape.len() != 1 {
            return Err(Error::Shape(format!(
                "the network produces outputs of shape {shape:?}; the last layer must produce \
                 a vector of logits, after a flatten"
            )));
        }
        Ok(shape)
    }

    /// Returns the named parameter tensors (`layers.{i}.weight`, `layers.{i}.bias`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some((w, b)) = layer.weight_and_bias() {
                out.push((format!("layers.{i}.weight"), w.clone()));
                out.push((format!("layers.{i}.bias"), b.clone()));
            }
        }
        out
    }

    /// Turns every parameter into a candle [`Var`] in place and returns them,
    /// weight then bias for each affine layer in order.
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let mut vars = Vec::new();
        for layer in &mut self.layers {
            if let Some((w, b)) = layer.weight_and_bias_mut() {
                for t in [w, b] {
                    let var = Var::from_tensor(t)?;
                    *t = var.as_tensor().clone();
                    vars.push(var);
                }
            }
        }
        Ok(vars)
    }

    /// Returns a copy with every parameter converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        for layer in &mut out.layers {
            if let Some((w, b)) = layer.weight_and_bias_mut() {
                *w = w.to_dtype(dtype)?.detach();
                *b = b.to_dtype(dtype)?.detach();
            }
        }
        Ok(out)
    }

    /// Returns a copy whose parameters are plain tensors, not tracked by
    /// autograd.
    pub fn detached(&self) -> Self {
        let mut out = self.clone();
        for layer in &mut out.layers {
            if let Some((w, b)) = layer.weight_and_bias_mut() {
                *w = w.copy().map(|t| t.detach()).unwrap_or_else(|_| w.detach());
                *b = b.copy().map(|t| t.detach()).unwrap_or_else(|_| b.detach());
            }
        }
        out
    }

    /// Returns the data type of the parameters (f32 unless converted).
    pub fn dtype(&self) -> DType {
        self.parameters()
            .first()
            .map(|(_, t)| t.dtype())
            .unwrap_or(DType::F32)
    }

    /// Returns the device the parameters live on.
    pub fn device(&self) -> Device {
        self.parameters()
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu)
    }
}
