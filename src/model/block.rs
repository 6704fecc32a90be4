//! Layers beyond a plain chain: batch normalisation, residual blocks and
//! the Elman recurrent cell.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::{Layer, Mode};
use crate::activation::Activation;
use crate::error::Result;

/// Batch normalisation over the channel dimension (dimension 1 of a batch),
/// as PyTorch's `BatchNorm1d` and `BatchNorm2d`:
/// `y = weight * (x - mean) / sqrt(var + eps) + bias`.
///
/// Training uses the batch statistics and updates the running ones with
/// `running = (1 - momentum) running + momentum batch` (the running variance
/// from the unbiased batch variance); inference uses the running ones.
#[derive(Debug)]
pub struct BatchNorm {
    /// Scale `gamma`, `[channels]`.
    pub weight: Tensor,
    /// Offset `beta`, `[channels]`.
    pub bias: Tensor,
    /// Running mean and variance, `[channels]` each, updated in training.
    running: Mutex<(Tensor, Tensor)>,
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Weight of the newest batch in the running statistics.
    pub momentum: f64,
}

impl Clone for BatchNorm {
    fn clone(&self) -> Self {
        let (mean, var) = self.running_stats();
        BatchNorm {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            running: Mutex::new((mean, var)),
            eps: self.eps,
            momentum: self.momentum,
        }
    }
}

impl BatchNorm {
    /// Builds the identity normalisation of `channels` channels (f32, CPU):
    /// weight 1, bias 0, running mean 0 and variance 1, PyTorch's `eps`
    /// 1e-5 and momentum 0.1.
    pub fn new(channels: usize) -> Result<Self> {
        let ones = Tensor::ones(channels, DType::F32, &Device::Cpu)?;
        let zeros = Tensor::zeros(channels, DType::F32, &Device::Cpu)?;
        Ok(Self::from_parts(ones.clone(), zeros.clone(), zeros, ones, 1e-5, 0.1))
    }

    /// Builds a normalisation from its tensors, all `[channels]`.
    pub fn from_parts(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: f64, momentum: f64) -> Self {
        BatchNorm {
            weight,
            bias,
            running: Mutex::new((mean, var)),
            eps,
            momentum,
        }
    }

    /// Returns the number of channels.
    pub fn channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Returns the running mean and variance.
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        // A panic while the lock was held leaves the tensors whole, because
        // they are replaced in one assignment.
        let guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0.clone(), guard.1.clone())
    }

    /// Replaces the running mean and variance.
    pub fn set_running_stats(&self, mean: Tensor, var: Tensor) {
        let mut guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *guard = (mean, var);
    }

    /// Returns the per-channel map of inference, `y = scale * x + offset`:
    /// `scale = weight / sqrt(var + eps)`, `offset = bias - scale * mean`,
    /// in f64.
    pub fn inference_affine(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let (mean, var) = self.running_stats();
        let f64s = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1()?) };
        let (gamma, beta, mean, var) = (f64s(&self.weight)?, f64s(&self.bias)?, f64s(&mean)?, f64s(&var)?);
        let scale: Vec<f64> = gamma.iter().zip(&var).map(|(g, v)| g / (v + self.eps).sqrt()).collect();
        let offset = beta.iter().zip(&scale).zip(&mean).map(|((b, s), m)| b - s * m).collect();
        Ok((scale, offset))
    }

    /// Normalises a batch `[batch, channels, ...]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let channels = self.channels();
        let mut view = vec![1usize; x.rank()];
        view[1] = channels;
        let (mean, var) = match mode {
            Mode::Eval => self.running_stats(),
            Mode::Train => self.batch_stats(x)?,
        };
        let inv_std = var.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let scale = self.weight.mul(&inv_std)?.reshape(view.as_slice())?;
        let centred = x.broadcast_sub(&mean.reshape(view.as_slice())?)?;
        Ok(centred
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape(view.as_slice())?)?)
    }

    /// Returns the batch mean and (biased) variance per channel, and folds
    /// them into the running statistics.
    fn batch_stats(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let channels = self.channels();
        let per_channel = x.transpose(0, 1)?.contiguous()?.reshape((channels, ()))?; // [channels, n]
        let n = per_channel.dims()[1];
        let mean = per_channel.mean(1)?;
        let var = per_channel.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
        let (running_mean, running_var) = self.running_stats();
        let unbiased = var.detach().affine(n as f64 / (n.max(2) - 1) as f64, 0.0)?;
        let m = self.momentum;
        let new_mean = running_mean.affine(1.0 - m, 0.0)?.add(&mean.detach().affine(m, 0.0)?)?;
        let new_var = running_var.affine(1.0 - m, 0.0)?.add(&unbiased.affine(m, 0.0)?)?;
        self.set_running_stats(new_mean, new_var);
        Ok((mean, var))
    }
}

/// A residual block: `y = main(x) + shortcut(x)`, with an empty shortcut
/// meaning the identity.
#[derive(Debug, Clone)]
pub struct Residual {
    /// The main branch.
    pub main: Vec<Layer>,
    /// The shortcut branch; empty for the identity.
    pub shortcut: Vec<Layer>,
}

/// An Elman recurrent layer `h_t = f(W_x x_t + W_h h_{t-1} + b)` with
/// `h_0 = 0`, unrolled over the sequence; it outputs the last state `h_T`.
///
/// It reads a sample `[channels, steps, width]` as `steps` time steps of
/// `channels * width` features each, so an image `[1, 28, 28]` is read row
/// by row.
#[derive(Debug, Clone)]
pub struct Elman {
    /// `W_x`, `[hidden, features]`.
    pub input_weight: Tensor,
    /// `W_h`, `[hidden, hidden]`.
    pub recurrent_weight: Tensor,
    /// `b`, `[hidden]`.
    pub bias: Tensor,
    /// The bounded activation `f`.
    pub activation: Activation,
}

impl Elman {
    /// Builds a cell with zero weights (f32, CPU).
    pub fn zeros(features: usize, hidden: usize, activation: Activation) -> Result<Self> {
        Ok(Elman {
            input_weight: Tensor::zeros((hidden, features), DType::F32, &Device::Cpu)?,
            recurrent_weight: Tensor::zeros((hidden, hidden), DType::F32, &Device::Cpu)?,
            bias: Tensor::zeros(hidden, DType::F32, &Device::Cpu)?,
            activation,
        })
    }

    /// Returns the size of the state.
    pub fn hidden(&self) -> usize {
        self.input_weight.dims()[0]
    }

    /// Returns the number of features per step.
    pub fn features(&self) -> usize {
        self.input_weight.dims()[1]
    }

    /// Runs the cell over a batch.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, steps, width]` -> `[batch, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let steps = sequence(x)?;
        let batch = x.dims()[0];
        let mut h = Tensor::zeros((batch, self.hidden()), x.dtype(), x.device())?;
        for x_t in steps {
            let input = crate::ops::linear(&x_t, &self.input_weight, &self.bias)?;
            let z = input.add(&h.matmul(&self.recurrent_weight.t()?)?)?;
            h = self.activation.forward(&z)?;
        }
        Ok(h)
    }

    /// Checks an input sample shape and returns `[hidden]`.
    pub fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let [c, _, w] = input else {
            return Err(format!("expects [channels, steps, width] input, got {input:?}"));
        };
        if c * w != self.features() {
            return Err(format!(
                "reads {} features per step, but a [{c}, steps, {w}] input gives {}",
                self.features(),
                c * w
            ));
        }
        if self.activation.output_bounds().is_none() {
            return Err(format!("activation {} is unbounded; an Elman cell needs a bounded one", self.activation));
        }
        Ok(vec![self.hidden()])
    }
}

/// Splits a batch `[batch, channels, steps, width]` into its time steps,
/// each `[batch, channels * width]`.
pub fn sequence(x: &Tensor) -> Result<Vec<Tensor>> {
    let (batch, channels, steps, width) = x.dims4()?;
    let rows = x.permute((0, 2, 1, 3))?.contiguous()?; // [batch, steps, channels, width]
    (0..steps)
        .map(|t| Ok(rows.narrow(1, t, 1)?.reshape((batch, channels * width))?))
        .collect()
}
