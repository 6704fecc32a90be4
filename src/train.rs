//! The training loop and the optimizer for regular networks.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
pub use crate::optim::{Optimizer, Sgd};
use crate::progress::Progress;
use crate::verify;

/// Settings of a training run, validated by [`TrainConfig::validate`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training set, >= 1.
    pub epochs: usize,
    /// Samples per minibatch, >= 1.
    pub batch_size: usize,
    /// Seed of the shuffling order (and, by the caller, of the initialisation).
    pub seed: u64,
    /// Evaluate test accuracy after every epoch, not only after the last.
    pub eval_every_epoch: bool,
    /// Shuffle the training set before every epoch; without it every epoch
    /// visits the samples in file order, as the method's reference code does.
    #[serde(default = "crate::train::yes")]
    pub shuffle: bool,
}

/// Serde default of settings that were always on before they became options.
pub(crate) fn yes() -> bool {
    true
}

impl TrainConfig {
    /// Rejects settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("--epochs", 0, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("--batch-size", 0, "must be at least 1"));
        }
        Ok(())
    }
}

/// Figures of one epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's batches.
    pub loss: f64,
    /// Fraction of training samples classified correctly during the epoch.
    pub train_accuracy: f64,
    /// Test accuracy after the epoch, when evaluated.
    pub test_accuracy: Option<f64>,
    /// Wall time of the epoch's training steps, in seconds.
    pub seconds: f64,
}

/// Figures of a whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainMetrics {
    /// One entry per epoch.
    pub epochs: Vec<EpochMetrics>,
    /// Test accuracy after the last epoch, in [0, 1].
    pub test_accuracy: f64,
}

/// Trains by minibatches: each epoch shuffles the training set from the
/// seed (unless `config.shuffle` is off), minimises cross-entropy of `forward` with `optimizer` over `vars`,
/// and logs one line. `after_step` runs after every update (for audits).
#[allow(clippy::too_many_arguments)]
pub fn fit(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    input_shape: &[usize],
    vars: &[Var],
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    config: &TrainConfig,
    progress: &Progress,
    after_step: &mut dyn FnMut() -> Result<()>,
) -> Result<TrainMetrics> {
    config.validate()?;
    verify::check_images(input_shape, &data.train)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let dtype = vars.first().map(|v| v.dtype()).unwrap_or(candle_core::DType::F32);
    let mut epochs = Vec::with_capacity(config.epochs);
    let epoch_bar = progress.bar(config.epochs as u64, "epochs");
    let width = config.epochs.to_string().len();
    for epoch in 1..=config.epochs {
        if config.shuffle {
            order.shuffle(&mut rng);
        }
        let start = Instant::now();
        let (mut forward_s, mut backward_s, mut update_s) = (0.0, 0.0, 0.0);
        let (mut loss_sum, mut batches, mut correct) = (0.0f64, 0usize, 0usize);
        let batch_bar = progress.bar(order.len() as u64, "batches");
        for (b, chunk) in order.chunks(config.batch_size).enumerate() {
            let (x, y) = data.train.batch(chunk, &Device::Cpu)?;
            let x = x.to_dtype(dtype)?;
            let t0 = Instant::now();
            let logits = forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(Error::config(
                    "loss",
                    loss_value,
                    format!(
                        "training diverged at epoch {epoch}, batch {}; lower the learning rate",
                        b + 1
                    ),
                ));
            }
            optimizer.step(vars, &grads)?;
            after_step()?;
            let t3 = Instant::now();
            forward_s += (t1 - t0).as_secs_f64();
            backward_s += (t2 - t1).as_secs_f64();
            update_s += (t3 - t2).as_secs_f64();
            loss_sum += loss_value;
            batches += 1;
            let predicted: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let labels: Vec<u32> = y.to_vec1()?;
            correct += predicted.iter().zip(&labels).filter(|(p, l)| p == l).count();
            batch_bar.inc(chunk.len() as u64);
        }
        batch_bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let test_accuracy = if config.eval_every_epoch || epoch == config.epochs {
            Some(verify::accuracy(forward, input_shape, &data.test, 1000, dtype, progress)?)
        } else {
            None
        };
        let metrics = EpochMetrics {
            epoch,
            loss: loss_sum / batches.max(1) as f64,
            train_accuracy: correct as f64 / order.len().max(1) as f64,
            test_accuracy,
            seconds,
        };
        tracing::info!(
            "epoch {epoch:>width$}/{}  loss {:.4}  train {:.4}  test {}  {seconds:6.2} s",
            config.epochs,
            metrics.loss,
            metrics.train_accuracy,
            test_accuracy.map(|a| format!("{a:.4}")).unwrap_or_else(|| "  -   ".into()),
        );
        tracing::debug!(
            "epoch {epoch} time: forward {forward_s:.2} s, backward {backward_s:.2} s, update {update_s:.2} s, \
             other (batching, bookkeeping) {:.2} s",
            seconds - forward_s - backward_s - update_s
        );
        epochs.push(metrics);
        epoch_bar.inc(1);
    }
    epoch_bar.finish_and_clear();
    let test_accuracy = epochs
        .last()
        .and_then(|e| e.test_accuracy)
        .expect("the last epoch is always evaluated and epochs >= 1");
    Ok(TrainMetrics {
        epochs,
        test_accuracy,
    })
}
