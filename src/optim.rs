//! Optimizers: plain SGD for regular networks, and the two rules that keep
//! a non-negative network non-negative.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A rule that updates parameters from their gradients.
pub trait Optimizer: Send {
    /// Applies one update to `vars` from `grads`.
    fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()>;

    /// Entries that were non-zero before some step and exactly zero after
    /// it, summed over all steps so far.
    fn zeroed(&self) -> usize {
        0
    }

    /// Returns the state a checkpoint needs to continue training exactly:
    /// one buffer per parameter (momentum or tanh average, `None` before
    /// the first step or without momentum) and the counters.
    fn state(&self) -> OptimizerState;

    /// Restores a state returned by [`Optimizer::state`]. Rejects one whose
    /// buffers do not fit `vars`, one per parameter with the same shape.
    fn set_state(&mut self, vars: &[Var], state: OptimizerState) -> Result<()>;
}

/// The mutable part of an optimizer, saved in training checkpoints.
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// One entry per parameter, or none before the first step.
    pub buffers: Vec<Option<Tensor>>,
    /// The value of [`Optimizer::zeroed`].
    pub zeroed: usize,
}

/// Checks that `buffers` fit `vars` and returns them.
fn checked_buffers(vars: &[Var], buffers: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    if !buffers.is_empty() && buffers.len() != vars.len() {
        return Err(Error::Shape(format!(
            "the optimizer state has {} buffers for {} parameters; the checkpoint belongs to another network",
            buffers.len(),
            vars.len()
        )));
    }
    for (i, (buffer, var)) in buffers.iter().zip(vars).enumerate() {
        if let Some(b) = buffer {
            if b.dims() != var.dims() || b.dtype() != var.dtype() {
                return Err(Error::Shape(format!(
                    "optimizer buffer {i} has shape {:?} ({:?}), its parameter {:?} ({:?}); \
                     the checkpoint belongs to another network",
                    b.dims(),
                    b.dtype(),
                    var.dims(),
                    var.dtype()
                )));
            }
        }
    }
    Ok(buffers)
}

fn check_momentum(name: &str, momentum: f64) -> Result<()> {
    if !(0.0..1.0).contains(&momentum) {
        return Err(Error::config(name, momentum, "momentum must lie in [0, 1)"));
    }
    Ok(())
}

fn check_rate(name: &str, rate: f64) -> Result<()> {
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(Error::config(name, rate, "a learning rate must be finite and >= 0"));
    }
    Ok(())
}

/// Plain stochastic gradient descent, with optional momentum and weight
/// decay: `v <- mu v + (g + wd p)`, `p <- p - lr v`.
#[derive(Debug, Clone)]
pub struct Sgd {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<Option<Tensor>>,
}

impl Sgd {
    /// Builds the optimizer, rejecting negative or non-finite settings and
    /// momentum outside `[0, 1)`.
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> Result<Self> {
        check_rate("--lr", lr)?;
        check_momentum("--momentum", momentum)?;
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::config("--weight-decay", weight_decay, "must be finite and >= 0"));
        }
        Ok(Sgd {
            lr,
            momentum,
            weight_decay,
            velocity: Vec::new(),
        })
    }
}

/// Returns `mu v + g` (storing it in `velocity`), or `g` when `mu` is 0.
///
/// `g` must be detached: candle's backward pass computes some gradients
/// (of a broadcast product, for example) from tensors of the forward graph,
/// and a velocity that kept one would keep every batch's graph alive.
fn with_momentum(velocity: &mut Option<Tensor>, momentum: f64, g: Tensor) -> Result<Tensor> {
    if momentum == 0.0 {
        return Ok(g);
    }
    let v = match velocity.take() {
        Some(v) => (v.affine(momentum, 0.0)? + g)?,
        None => g,
    };
    *velocity = Some(v.clone());
    Ok(v)
}

impl Optimizer for Sgd {
    fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
        self.velocity.resize(vars.len(), None);
        for (var, velocity) in vars.iter().zip(&mut self.velocity) {
            let Some(g) = grads.get(var) else { continue };
            let mut g = g.detach();
            if self.weight_decay > 0.0 {
                g = (g + var.as_tensor().affine(self.weight_decay, 0.0)?)?;
            }
            let v = with_momentum(velocity, self.momentum, g)?;
            if !crate::ops::update::subtract_scaled_in_place(var.as_tensor(), &v, self.lr)? {
                var.set(&(var.as_tensor() - v.affine(self.lr, 0.0)?)?)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            buffers: self.velocity.clone(),
            zeroed: 0,
        }
    }

    fn set_state(&mut self, vars: &[Var], state: OptimizerState) -> Result<()> {
        self.velocity = checked_buffers(vars, state.buffers)?;
        Ok(())
    }
}

/// Projected SGD: `p <- max(p - lr v, 0)` with `v <- mu v + g`.
///
/// Keeps every parameter `>= 0`, but lets entries reach zero and lets `P`
/// and `N` of a non-negative layer overlap.
#[derive(Debug, Clone)]
pub struct Projected {
    lr: f64,
    momentum: f64,
    velocity: Vec<Option<Tensor>>,
}

impl Projected {
    /// Builds the optimizer, rejecting invalid settings.
    pub fn new(lr: f64, momentum: f64) -> Result<Self> {
        check_rate("--lr", lr)?;
        check_momentum("--momentum", momentum)?;
        Ok(Projected {
            lr,
            momentum,
            velocity: Vec::new(),
        })
    }
}

impl Optimizer for Projected {
    fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
        self.velocity.resize(vars.len(), None);
        for (var, velocity) in vars.iter().zip(&mut self.velocity) {
            let Some(g) = grads.get(var) else { continue };
            let v = with_momentum(velocity, self.momentum, g.detach())?;
            var.set(&(var.as_tensor() - v.affine(self.lr, 0.0)?)?.relu()?)?;
        }
        Ok(())
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            buffers: self.velocity.clone(),
            zeroed: 0,
        }
    }

    fn set_state(&mut self, vars: &[Var], state: OptimizerState) -> Result<()> {
        self.velocity = checked_buffers(vars, state.buffers)?;
        Ok(())
    }
}

/// Placement of the sign-preserving optimizer's momentum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "beta")]
pub enum Momentum {
    /// No momentum.
    #[default]
    None,
    /// On the gradient before the tanh: `m <- beta m + g`, `t = tanh(lr_in m)`.
    Gradient(f64),
    /// On the tanh term as an exponential average,
    /// `m <- beta m + (1 - beta) tanh(lr_in g)`, which stays inside (-1, 1)
    /// so no sign can flip. The reference code's `m <- beta m + t` reaches
    /// `1 / (1 - beta)` and can flip signs.
    Tanh(f64),
}

/// The sign-preserving update `p <- p - lr_out |p| tanh(lr_in g)`, that is
/// `p <- p (1 - lr_out t)` with `|t| < 1`.
///
/// For `p >= 0` and `0 < lr_out <= 1` no entry changes sign and a zero stays
/// zero, so the routing of each weight to the signal or the complement
/// (the support of `P` and `N`) can only shrink. In floating point `tanh`
/// rounds to 1 once `|lr_in g|` exceeds about 9, so with `lr_out = 1` an
/// entry can become exactly 0; [`Optimizer::zeroed`] counts those.
#[derive(Debug, Clone)]
pub struct SignPreserving {
    lr_in: f64,
    lr_out: f64,
    momentum: Momentum,
    state: Vec<Option<Tensor>>,
    zeroed: usize,
}

impl SignPreserving {
    /// Builds the optimizer.
    ///
    /// Rejects `lr_out` outside `(0, 1]`, because `1 - lr_out t` can be
    /// negative for `lr_out > 1` (flipping a sign) and `lr_out <= 0` never
    /// learns or grows what it should shrink.
    pub fn new(lr_in: f64, lr_out: f64, momentum: Momentum) -> Result<Self> {
        check_rate("--lr-in", lr_in)?;
        if !(lr_out > 0.0 && lr_out <= 1.0) {
            return Err(Error::config(
                "--lr-out",
                lr_out,
                "must lie in (0, 1]: the update multiplies each parameter by 1 - lr_out * t \
                 with |t| < 1, which can turn negative and flip the parameter's sign when \
                 lr_out > 1, and does not learn when lr_out <= 0",
            ));
        }
        match momentum {
            Momentum::None => {}
            Momentum::Gradient(beta) | Momentum::Tanh(beta) => check_momentum("--momentum", beta)?,
        }
        Ok(SignPreserving {
            lr_in,
            lr_out,
            momentum,
            state: Vec::new(),
            zeroed: 0,
        })
    }
}

impl Optimizer for SignPreserving {
    fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
        self.state.resize(vars.len(), None);
        for (var, state) in vars.iter().zip(&mut self.state) {
            let Some(g) = grads.get(var) else { continue };
            let g = &g.detach();
            let p = var.as_tensor();
            if self.momentum == Momentum::None {
                let in_place = crate::ops::update::sign_preserving_update_in_place(p, g, self.lr_in, self.lr_out)?;
                if let Some(zeroed) = in_place {
                    self.zeroed += zeroed;
                    continue;
                }
            }
            let t = match self.momentum {
                Momentum::None => g.affine(self.lr_in, 0.0)?.tanh()?,
                Momentum::Gradient(beta) => {
                    with_momentum(state, beta, g.clone())?.affine(self.lr_in, 0.0)?.tanh()?
                }
                Momentum::Tanh(beta) => {
                    let t = g.affine(self.lr_in, 0.0)?.tanh()?;
                    let m = match state.take() {
                        Some(m) => (m.affine(beta, 0.0)? + t.affine(1.0 - beta, 0.0)?)?,
                        None => t.affine(1.0 - beta, 0.0)?,
                    };
                    *state = Some(m.clone());
                    m
                }
            };
            // p (1 - lr_out t): the factor lies in [1 - lr_out, 1 + lr_out],
            // which is >= 0 for lr_out <= 1.
            let factor = t.affine(-self.lr_out, 1.0)?;
            let updated = p.mul(&factor)?;
            let was_nonzero = p.ne(0.0)?;
            let is_zero = updated.eq(0.0)?;
            let newly_zero = was_nonzero
                .mul(&is_zero)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            self.zeroed += newly_zero as usize;
            var.set(&updated)?;
        }
        Ok(())
    }

    fn zeroed(&self) -> usize {
        self.zeroed
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            buffers: self.state.clone(),
            zeroed: self.zeroed,
        }
    }

    fn set_state(&mut self, vars: &[Var], state: OptimizerState) -> Result<()> {
        self.state = checked_buffers(vars, state.buffers)?;
        self.zeroed = state.zeroed;
        Ok(())
    }
}
