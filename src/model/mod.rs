//! Regular (signed) networks: layers, the forward pass, initialisation and
//! the architectures of the method's protocol.
//!
//! A [`Network`] is a sequence of [`Layer`]s applied to an input of shape
//! `[channels, height, width]` whose values lie in a known [`Range`].

mod block;
mod conv1d;
mod fold;
mod init;
mod layer;

pub use block::sequence;
pub use fold::fold_batchnorm;
pub use init::Init;
pub use layer::{
    adaptive_average, chain_shape, forward_chain, BatchNorm, Conv1d, Conv2d, Elman, Layer, Linear, Mode, Pool,
    Residual,
};

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
    /// A small residual network of width `w` (`--hidden w`, default 16):
    /// a 3x3 convolution with batch normalisation, an identity block at
    /// width `w`, a block to width `2w` at stride 2 with a 1x1 projection
    /// shortcut, global average pooling and the classifier.
    Resnet,
    /// An Elman recurrent network reading the image row by row, with a
    /// state of `--hidden h` units (default 128), then the classifier.
    Elman,
    /// The CIFAR-10 CNN: four 3x3 convolutions with a 2x2 average pool after
    /// the second and the fourth, then fully connected 6400 -> 512 ->
    /// classes.
    CifarCnn,
}

impl Arch {
    /// Returns the default `--hidden` of the architecture.
    pub fn default_hidden(self) -> Vec<usize> {
        match self {
            Arch::Mlp => vec![100, 200],
            Arch::Cnn => Vec::new(),
            Arch::Resnet => vec![16],
            Arch::Elman => vec![128],
            Arch::CifarCnn => Vec::new(),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Mlp => "mlp",
            Arch::Cnn => "cnn",
            Arch::Resnet => "resnet",
            Arch::Elman => "elman",
            Arch::CifarCnn => "cifar-cnn",
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
    /// Tighter ranges, one per input channel (normalised colour images),
    /// each within `input_range`; empty when every channel has
    /// `input_range`.
    pub channel_ranges: Vec<Range>,
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
            layers.push(Layer::Activation(activation.clone()));
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
            layers.push(Layer::Activation(activation.clone()));
        }
        layers.push(Layer::Flatten);
        let mut probe = Network::new(input_shape, Range { lo: 0.0, hi: 1.0 }, layers.clone());
        let flat = probe.output_shape()?.iter().product::<usize>();
        layers.push(Layer::Linear(Linear::zeros(flat, 128)?));
        layers.push(Layer::Activation(activation.clone()));
        layers.push(Layer::Linear(Linear::zeros(128, classes)?));
        probe.layers = layers;
        Self::initialised(input_shape, probe.layers, init, seed)
    }

    /// Builds the method's CIFAR-10 CNN for `[3, 32, 32]` inputs: conv 3->32
    /// k3, conv 32->64 k3, average pool 2, conv 64->128 k3, conv 128->256
    /// k3, average pool 2, fc 6400->512, fc 512->classes, with `activation`
    /// after every convolution and hidden fully connected layer.
    ///
    /// Each pool comes after the activation of the convolution before it,
    /// as in `avg_pool2d(f(conv(x)))`, so it averages bounded non-negative
    /// activation outputs. Pooling before the activation gives the same
    /// shapes: 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5, and 256 * 5 * 5 =
    /// 6400 inputs to the first fully connected layer. Other input sizes
    /// work too, with the first fully connected layer sized to fit.
    ///
    /// # Shapes
    /// `[channels, height, width]` -> `[classes]`.
    pub fn cifar_cnn(
        input_shape: &[usize],
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        let channels = input_shape.first().copied().unwrap_or(3);
        let conv = |i, o| Conv2d::zeros(i, o, 3, 1, 0, 1, 1);
        let pool = Pool::new(2, 2);
        let mut layers = Vec::new();
        for (i, o, pooled) in [(channels, 32, false), (32, 64, true), (64, 128, false), (128, 256, true)] {
            layers.push(Layer::Conv2d(conv(i, o)?));
            layers.push(Layer::Activation(activation.clone()));
            if pooled {
                layers.push(Layer::AvgPool2d(pool));
            }
        }
        layers.push(Layer::Flatten);

        let mut shape = input_shape.to_vec();
        for (i, layer) in layers.iter().enumerate() {
            shape = layer
                .output_shape(&shape)
                .map_err(|message| Error::Shape(format!("cifar-cnn layer {i} ({}): {message}", layer.kind())))?;
        }
        let flat = shape.iter().product::<usize>();
        layers.push(Layer::Linear(Linear::zeros(flat, 512)?));
        layers.push(Layer::Activation(activation.clone()));
        layers.push(Layer::Linear(Linear::zeros(512, classes)?));
        Self::initialised(input_shape, layers, init, seed)
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
            Arch::Resnet => {
                let width = hidden.first().copied().unwrap_or(16);
                Self::resnet(input_shape, width, classes, activation, init, seed)
            }
            Arch::Elman => {
                let state = hidden.first().copied().unwrap_or(128);
                Self::elman(input_shape, state, classes, activation, init, seed)
            }
            Arch::CifarCnn => Self::cifar_cnn(input_shape, classes, activation, init, seed),
        }
    }

    /// Builds the small residual network of [`Arch::Resnet`]: conv
    /// `c -> w` k3 p1 + BN + f; block `[conv w -> w k3 p1, BN, f, conv w -> w
    /// k3 p1, BN] + identity`, f; block `[conv w -> 2w k3 s2 p1, BN, f, conv
    /// 2w -> 2w k3 p1, BN] + [conv w -> 2w k1 s2, BN]`, f; global average
    /// pooling; fc `2w -> classes`.
    pub fn resnet(
        input_shape: &[usize],
        width: usize,
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        let channels = input_shape.first().copied().unwrap_or(1);
        let conv = |i, o, kernel, stride, padding| -> Result<Layer> {
            Ok(Layer::Conv2d(Conv2d::zeros(i, o, kernel, stride, padding, 1, 1)?))
        };
        let bn = |c| -> Result<Layer> { Ok(Layer::BatchNorm(BatchNorm::new(c)?)) };
        let f = Layer::Activation(activation);
        let wide = 2 * width;
        let layers = vec![
            conv(channels, width, 3, 1, 1)?,
            bn(width)?,
            f.clone(),
            Layer::Residual(Residual {
                main: vec![conv(width, width, 3, 1, 1)?, bn(width)?, f.clone(), conv(width, width, 3, 1, 1)?, bn(width)?],
                shortcut: Vec::new(),
            }),
            f.clone(),
            Layer::Residual(Residual {
                main: vec![conv(width, wide, 3, 2, 1)?, bn(wide)?, f.clone(), conv(wide, wide, 3, 1, 1)?, bn(wide)?],
                shortcut: vec![conv(width, wide, 1, 2, 0)?, bn(wide)?],
            }),
            f,
            Layer::GlobalAvgPool,
            Layer::Linear(Linear::zeros(wide, classes)?),
        ];
        Self::initialised(input_shape, layers, init, seed)
    }

    /// Builds the Elman network of [`Arch::Elman`] for `[c, steps, width]`
    /// inputs: an Elman cell of `state` units over `c * width` features per
    /// step, then fc `state -> classes`.
    pub fn elman(
        input_shape: &[usize],
        state: usize,
        classes: usize,
        activation: Activation,
        init: Init,
        seed: u64,
    ) -> Result<Self> {
        let features = match input_shape {
            [c, _, w] => c * w,
            _ => return Err(Error::Shape(format!("an Elman network reads [channels, steps, width], got {input_shape:?}"))),
        };
        let layers = vec![
            Layer::Elman(Elman::zeros(features, state, activation)?),
            Layer::Linear(Linear::zeros(state, classes)?),
        ];
        Self::initialised(input_shape, layers, init, seed)
    }

    fn initialised(input_shape: &[usize], layers: Vec<Layer>, init: Init, seed: u64) -> Result<Self> {
        let mut network = Network::new(input_shape, Range { lo: 0.0, hi: 1.0 }, layers);
        network.output_shape()?;
        init.apply(&mut network, seed)?;
        Ok(network)
    }

    /// Builds a network whose inputs all lie in `input_range`.
    pub fn new(input_shape: &[usize], input_range: Range, layers: Vec<Layer>) -> Self {
        Network {
            input_shape: input_shape.to_vec(),
            input_range,
            channel_ranges: Vec::new(),
            layers,
        }
    }

    /// Returns the range of each input channel.
    pub fn input_ranges(&self) -> Vec<Range> {
        if self.channel_ranges.is_empty() {
            let channels = self.input_shape.first().copied().unwrap_or(1);
            vec![self.input_range; channels]
        } else {
            self.channel_ranges.clone()
        }
    }

    /// Computes the logits for a batch, for inference.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_mode(x, Mode::Eval)
    }

    /// Computes the logits for a batch in `mode`; training updates the
    /// running statistics of batch normalisation.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        forward_chain(&self.layers, x, mode)
    }

    /// Returns the shape of one output sample, checking that every layer
    /// accepts the shape the previous one produces.
    pub fn output_shape(&self) -> Result<Vec<usize>> {
        check_channel_ranges(self.input_range, &self.channel_ranges, &self.input_shape).map_err(Error::Shape)?;
        let shape = chain_shape(&self.layers, &self.input_shape).map_err(Error::Shape)?;
        if shape.len() != 1 {
            return Err(Error::Shape(format!(
                "the network produces outputs of shape {shape:?}; the last layer must produce \
                 a vector of logits, after a flatten"
            )));
        }
        Ok(shape)
    }

    /// Calls `f(path, layer)` on every layer, blocks before the layers
    /// they contain; paths read `layers.3` or `layers.4.main.0`.
    pub fn visit(&self, f: &mut dyn FnMut(&str, &Layer)) {
        visit_chain(&self.layers, "layers", f);
    }

    /// Like [`visit`](Self::visit), mutably, stopping at the first error.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Layer) -> Result<()>) -> Result<()> {
        visit_chain_mut(&mut self.layers, "layers", f)
    }

    /// Returns the named trained tensors (`layers.{i}.weight`,
    /// `layers.{i}.bias`, `layers.{i}.main.{j}.weight`, ...), in the order
    /// of [`make_trainable`](Self::make_trainable).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut copy = self.clone();
        let mut out = Vec::new();
        let _ = copy.visit_mut(&mut |path, layer| {
            for (name, t) in layer.parameters_mut() {
                out.push((format!("{path}.{name}"), t.clone()));
            }
            Ok(())
        });
        out
    }

    /// Turns every trained tensor into a candle [`Var`] in place and
    /// returns them in the order of [`parameters`](Self::parameters).
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let mut vars = Vec::new();
        self.visit_mut(&mut |_, layer| {
            for (_, t) in layer.parameters_mut() {
                let var = Var::from_tensor(t)?;
                *t = var.as_tensor().clone();
                vars.push(var);
            }
            Ok(())
        })?;
        Ok(vars)
    }

    /// Returns a copy with every parameter and buffer converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        out.visit_mut(&mut |_, layer| {
            for (_, t) in layer.parameters_mut() {
                *t = t.to_dtype(dtype)?.detach();
            }
            if let Layer::BatchNorm(bn) = layer {
                let (mean, var) = bn.running_stats();
                bn.set_running_stats(mean.to_dtype(dtype)?, var.to_dtype(dtype)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Returns a copy whose parameters are plain tensors, not tracked by
    /// autograd.
    pub fn detached(&self) -> Self {
        let mut out = self.clone();
        let _ = out.visit_mut(&mut |_, layer| {
            for (_, t) in layer.parameters_mut() {
                *t = t.copy().map(|c| c.detach()).unwrap_or_else(|_| t.detach());
            }
            Ok(())
        });
        out
    }

    /// Returns whether the network is a plain chain: no residual block,
    /// recurrent cell or batch normalisation.
    pub fn is_chain(&self) -> bool {
        self.layers
            .iter()
            .all(|l| !matches!(l, Layer::Residual(_) | Layer::Elman(_) | Layer::BatchNorm(_)))
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

fn visit_chain(layers: &[Layer], prefix: &str, f: &mut dyn FnMut(&str, &Layer)) {
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        f(&path, layer);
        for (name, chain) in layer.chains() {
            visit_chain(chain, &format!("{path}.{name}"), f);
        }
    }
}

fn visit_chain_mut(
    layers: &mut [Layer],
    prefix: &str,
    f: &mut dyn FnMut(&str, &mut Layer) -> Result<()>,
) -> Result<()> {
    for (i, layer) in layers.iter_mut().enumerate() {
        let path = format!("{prefix}.{i}");
        f(&path, layer)?;
        for (name, chain) in layer.chains_mut() {
            visit_chain_mut(chain, &format!("{path}.{name}"), f)?;
        }
    }
    Ok(())
}

/// Checks per-channel input ranges: one per channel, each finite and
/// within the network's input range.
pub fn check_channel_ranges(range: Range, channel_ranges: &[Range], shape: &[usize]) -> std::result::Result<(), String> {
    if channel_ranges.is_empty() {
        return Ok(());
    }
    let channels = shape.first().copied().unwrap_or(0);
    if channel_ranges.len() != channels {
        return Err(format!(
            "{} per-channel input ranges for {channels} input channels; give one per channel",
            channel_ranges.len()
        ));
    }
    for (c, r) in channel_ranges.iter().enumerate() {
        Range::new(r.lo, r.hi).map_err(|e| format!("input channel {c}: {e}"))?;
        if r.lo < range.lo || r.hi > range.hi {
            return Err(format!(
                "input channel {c} range [{}, {}] is not within the input range [{}, {}]",
                r.lo, r.hi, range.lo, range.hi
            ));
        }
    }
    Ok(())
}
