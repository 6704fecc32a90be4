//! The training loop and the optimizer for regular networks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::{augment, Dataset, Images};
use crate::error::{Error, Result};
use crate::model::Mode;
pub use crate::optim::{Optimizer, Sgd};
use crate::progress::Progress;
use crate::store;
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
    /// Crop and flip every training image at random, as
    /// [`crate::data::augment`] describes. The draws depend on `seed`, the
    /// epoch and the batch only, and test images are never augmented.
    #[serde(default)]
    pub augment: bool,
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

/// Checkpointing and interruption settings of [`fit_checkpointed`].
#[derive(Debug, Clone, Default)]
pub struct Checkpointing<'a> {
    /// Directory of the checkpoint file; `None` writes no checkpoint.
    pub dir: Option<PathBuf>,
    /// Continue from the checkpoint in `dir` instead of starting afresh.
    pub resume: bool,
    /// Settings that a resumed run must share with the checkpoint (the
    /// caller's description of architecture, learning rate, data, ...).
    pub settings: serde_json::Value,
    /// Flag set by a signal handler: training stops after the current
    /// batch, writes a checkpoint and returns [`Error::Interrupted`].
    pub stop: Option<&'a AtomicBool>,
}

/// Trains by minibatches: each epoch shuffles the training set from the
/// seed (unless `config.shuffle` is off), augments each batch when
/// `config.augment` is on, minimises cross-entropy of `forward` with
/// `optimizer` over `vars`, and logs one line. `after_step` runs after
/// every update (for audits).
#[allow(clippy::too_many_arguments)]
pub fn fit(
    forward: &(dyn Fn(&Tensor, Mode) -> Result<Tensor> + Sync),
    input_shape: &[usize],
    vars: &[Var],
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    config: &TrainConfig,
    progress: &Progress,
    after_step: &mut (dyn FnMut() -> Result<()> + Send),
) -> Result<TrainMetrics> {
    let checkpointing = Checkpointing::default();
    fit_checkpointed(forward, input_shape, vars, optimizer, data, config, progress, after_step, &checkpointing)
}

/// Batches that the loader thread prepares ahead of training.
const PREFETCH_BATCHES: usize = 2;

/// One training batch, as [`with_batches`] delivers it.
struct Batch {
    /// Position of the batch within the epoch.
    index: usize,
    /// Images in the batch.
    len: usize,
    /// Images, converted to the training dtype.
    x: Tensor,
    /// Labels.
    y: Tensor,
}

/// Runs `train` on the batches of one epoch (those after the first `skip`),
/// which a second thread gathers, augments and converts up to
/// [`PREFETCH_BATCHES`] ahead, so that training does not wait for them.
///
/// Each batch depends only on the order, the seed, the epoch and its
/// position, so the batches are the same as gathered in line. When `train`
/// returns early, the loader stops at its next batch.
#[allow(clippy::too_many_arguments)]
fn with_batches<R>(
    images: &Images,
    order: &[usize],
    config: &TrainConfig,
    epoch: usize,
    skip: usize,
    dtype: candle_core::DType,
    train: impl FnOnce(&mut dyn Iterator<Item = Result<Batch>>) -> Result<R>,
) -> Result<R> {
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel(PREFETCH_BATCHES);
        scope.spawn(move || {
            for (index, chunk) in order.chunks(config.batch_size).enumerate().skip(skip) {
                let batch = gather_batch(images, chunk, config, epoch, index, dtype)
                    .map(|(x, y)| Batch { index, len: chunk.len(), x, y });
                // A closed channel means training stopped early.
                if sender.send(batch).is_err() {
                    return;
                }
            }
        });
        train(&mut receiver.into_iter())
    })
}

/// Gathers the images at `chunk` (the batch at `index` of `epoch`),
/// augmented when `config.augment` is on, as a batch of `dtype`.
fn gather_batch(
    images: &Images,
    chunk: &[usize],
    config: &TrainConfig,
    epoch: usize,
    index: usize,
    dtype: candle_core::DType,
) -> Result<(Tensor, Tensor)> {
    let (x, y) = if config.augment {
        let augmentations = augment::for_batch(config.seed, epoch, index, chunk.len());
        images.augmented_batch(chunk, &augmentations, &Device::Cpu)?
    } else {
        images.batch(chunk, &Device::Cpu)?
    };
    Ok((x.to_dtype(dtype)?, y))
}

/// Shuffles the sample order of one epoch. Resuming replays it once per
/// finished epoch to rebuild the order without storing the RNG state.
fn shuffle_epoch(order: &mut [usize], rng: &mut rand::rngs::StdRng, shuffle: bool) {
    if shuffle {
        order.shuffle(rng);
    }
}

/// Like [`fit`], and also writes a checkpoint after every epoch, resumes
/// from one, and stops cleanly on request, as `checkpointing` sets.
///
/// A resumed run ends with the same parameters, bit for bit, as one that
/// was never interrupted, given the same seed and thread count: the
/// checkpoint stores the parameters, the optimizer's buffers, the position
/// within the epoch and its partial sums, and the shuffling order is
/// rebuilt by replaying the seeded shuffles.
#[allow(clippy::too_many_arguments)]
pub fn fit_checkpointed(
    forward: &(dyn Fn(&Tensor, Mode) -> Result<Tensor> + Sync),
    input_shape: &[usize],
    vars: &[Var],
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    config: &TrainConfig,
    progress: &Progress,
    after_step: &mut (dyn FnMut() -> Result<()> + Send),
    checkpointing: &Checkpointing,
) -> Result<TrainMetrics> {
    config.validate()?;
    verify::check_images(input_shape, &data.train)?;
    let checkpoint_path = checkpointing.dir.as_deref().map(checkpoint::path_in);
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let dtype = vars.first().map(|v| v.dtype()).unwrap_or(candle_core::DType::F32);
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut resumed = checkpoint::PartialEpoch::default();
    let mut skip_batches = 0;
    let mut last_good: Option<(PathBuf, usize)> = None;
    if checkpointing.resume {
        let path = checkpoint_path.as_deref().ok_or_else(|| {
            Error::config("--resume", "(no checkpoint directory)", "resuming needs a checkpoint directory")
        })?;
        let position = restore(path, vars, optimizer, data, config, checkpointing)?;
        for _ in 0..position.epochs_done {
            shuffle_epoch(&mut order, &mut rng, config.shuffle);
        }
        tracing::info!(
            "resuming from {} after epoch {} and {} batches of epoch {}",
            path.display(),
            position.epochs_done,
            position.batches_done,
            position.epochs_done + 1
        );
        last_good = Some((path.to_path_buf(), position.epochs_done));
        skip_batches = position.batches_done;
        resumed = position.partial;
        epochs = position.metrics;
    }
    let first_epoch = epochs.len() + 1;
    let epoch_bar = progress.bar(config.epochs as u64, "epochs");
    epoch_bar.inc(epochs.len() as u64);
    let width = config.epochs.to_string().len();
    let save = |epochs: &[EpochMetrics], batches_done: usize, partial: checkpoint::PartialEpoch, optimizer: &dyn Optimizer| -> Result<()> {
        let Some(path) = &checkpoint_path else { return Ok(()) };
        let state = optimizer.state();
        let position = checkpoint::Position {
            settings: checkpointing.settings.clone(),
            batch_size: config.batch_size,
            seed: config.seed,
            train_len: data.train.len(),
            epochs_done: epochs.len(),
            batches_done,
            partial,
            metrics: epochs.to_vec(),
            zeroed: state.zeroed,
        };
        checkpoint::save(path, vars, &state, &position)
    };
    for epoch in first_epoch..=config.epochs {
        shuffle_epoch(&mut order, &mut rng, config.shuffle);
        let start = Instant::now();
        let (mut forward_s, mut backward_s, mut update_s) = (0.0, 0.0, 0.0);
        let partial = std::mem::take(&mut resumed);
        let (mut loss_sum, mut batches, mut correct) = (partial.loss_sum, skip_batches, partial.correct);
        let batch_bar = progress.bar(order.len() as u64, "batches");
        batch_bar.inc((skip_batches * config.batch_size).min(order.len()) as u64);
        let skip = std::mem::take(&mut skip_batches);
        crate::ops::on_compute_threads(|| with_batches(&data.train, &order, config, epoch, skip, dtype, |prepared| -> Result<()> {
            for batch in prepared {
                let Batch { index: b, len: batch_len, x, y } = batch?;
                let t0 = Instant::now();
                let logits = forward(&x, Mode::Train)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                let t1 = Instant::now();
                let grads = loss.backward()?;
                let t2 = Instant::now();
                let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !loss_value.is_finite() {
                    return Err(diverged(epoch, b + 1, format!("the loss is {loss_value}"), &last_good));
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
                batch_bar.inc(batch_len as u64);
                let last_batch = (b + 1) * config.batch_size >= order.len();
                if !last_batch && checkpointing.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                    batch_bar.finish_and_clear();
                    let seconds = partial.seconds + start.elapsed().as_secs_f64();
                    let sums = checkpoint::PartialEpoch {
                        loss_sum,
                        correct,
                        seconds,
                    };
                    check_parameters(vars, epoch, b + 1, &last_good)?;
                    save(&epochs, b + 1, sums, optimizer)?;
                    return Err(Error::Interrupted {
                        checkpoint: checkpoint_path.clone(),
                        epoch,
                        batch: b + 1,
                    });
                }
            }
            Ok(())
        }))?;
        batch_bar.finish_and_clear();
        let seconds = partial.seconds + start.elapsed().as_secs_f64();
        let last = batches;
        check_parameters(vars, epoch, last, &last_good)?;
        let test_accuracy = if config.eval_every_epoch || epoch == config.epochs {
            Some(verify::accuracy(&|x: &Tensor| forward(x, Mode::Eval), input_shape, &data.test, 1000, dtype, progress)?)
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
        save(&epochs, 0, checkpoint::PartialEpoch::default(), optimizer)?;
        if let Some(path) = &checkpoint_path {
            last_good = Some((path.clone(), epoch));
        }
        epoch_bar.inc(1);
    }
    epoch_bar.finish_and_clear();
    let test_accuracy = epochs
        .last()
        .and_then(|e| e.test_accuracy)
        .ok_or_else(|| {
            Error::config(
                "--epochs",
                config.epochs,
                "the checkpoint has no test accuracy for the last epoch; train it with the same --epochs it was started with",
            )
        })?;
    Ok(TrainMetrics {
        epochs,
        test_accuracy,
    })
}

/// Loads the checkpoint at `path` into `vars` and `optimizer` after checking
/// that it belongs to this run, and returns its position.
fn restore(
    path: &Path,
    vars: &[Var],
    optimizer: &mut dyn Optimizer,
    data: &Dataset,
    config: &TrainConfig,
    checkpointing: &Checkpointing,
) -> Result<checkpoint::Position> {
    if !path.exists() {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: "no checkpoint to resume from; start the run without --resume".into(),
        });
    }
    let saved = checkpoint::load(path)?;
    let position = &saved.position;
    let mismatch = |what: &str, then: String, now: String| Error::Model {
        path: path.to_path_buf(),
        message: format!(
            "the checkpoint was written with {what} {then}, this run has {now}; resume with the \
             command that started the run, or pass --force to start again"
        ),
    };
    let command = |settings: &serde_json::Value| settings.get("command").cloned();
    if let (Some(then), Some(now)) = (command(&position.settings), command(&checkpointing.settings)) {
        if then != now {
            return Err(Error::Model {
                path: path.to_path_buf(),
                message: format!(
                    "the checkpoint was written by `isonn {}`, not `isonn {}`; resume it with that command, \
                     or write this run to another --out",
                    then.as_str().unwrap_or("?"),
                    now.as_str().unwrap_or("?")
                ),
            });
        }
    }
    if position.settings != checkpointing.settings {
        let (then, now) = settings_difference(&position.settings, &checkpointing.settings);
        return Err(mismatch("settings", then, now));
    }
    if position.batch_size != config.batch_size {
        return Err(mismatch("--batch-size", position.batch_size.to_string(), config.batch_size.to_string()));
    }
    if position.seed != config.seed {
        return Err(mismatch("--seed", position.seed.to_string(), config.seed.to_string()));
    }
    if position.train_len != data.train.len() {
        return Err(mismatch("training images", position.train_len.to_string(), data.train.len().to_string()));
    }
    let needed = position.epochs_done + usize::from(position.batches_done > 0);
    if needed > config.epochs {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!(
                "the checkpoint has reached epoch {needed}, more than --epochs {}; pass --epochs {needed} or more",
                config.epochs
            ),
        });
    }
    if saved.parameters.len() != vars.len() {
        return Err(mismatch("parameters", saved.parameters.len().to_string(), vars.len().to_string()));
    }
    for (i, (var, value)) in vars.iter().zip(&saved.parameters).enumerate() {
        if var.dims() != value.dims() || var.dtype() != value.dtype() {
            return Err(mismatch(
                &format!("parameter {i} of shape"),
                format!("{:?} ({:?})", value.dims(), value.dtype()),
                format!("{:?} ({:?})", var.dims(), var.dtype()),
            ));
        }
        var.set(value)?;
    }
    optimizer.set_state(vars, saved.optimizer)?;
    Ok(saved.position)
}

/// Describes how two settings objects differ, as `key value` pairs of the
/// keys whose values differ (the whole values when either is no object).
fn settings_difference(then: &serde_json::Value, now: &serde_json::Value) -> (String, String) {
    let (Some(a), Some(b)) = (then.as_object(), now.as_object()) else {
        return (then.to_string(), now.to_string());
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let describe = |object: &serde_json::Map<String, serde_json::Value>, key: &str| match object.get(key) {
        Some(value) => format!("{key} {value}"),
        None => format!("no {key}"),
    };
    let differing: Vec<&String> = keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).collect();
    let list = |object| differing.iter().map(|k| describe(object, k)).collect::<Vec<_>>().join(", ");
    (list(a), list(b))
}

/// Rejects non-finite parameters after the update of `batch`.
fn check_parameters(vars: &[Var], epoch: usize, batch: usize, last_good: &Option<(PathBuf, usize)>) -> Result<()> {
    for (i, var) in vars.iter().enumerate() {
        if store::check_finite(var.as_tensor(), &format!("parameters.{i}"), Path::new("(in memory)")).is_err() {
            return Err(diverged(epoch, batch, format!("parameter tensor {i} became NaN or infinite"), last_good));
        }
    }
    Ok(())
}

fn diverged(epoch: usize, batch: usize, detail: String, last_good: &Option<(PathBuf, usize)>) -> Error {
    Error::Diverged {
        epoch,
        batch,
        detail,
        last_good: match last_good {
            Some((path, epoch)) => format!("the last good checkpoint is {} (after epoch {epoch})", path.display()),
            None => "no checkpoint of this run was written before it".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch_size: usize, augment: bool) -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size,
            seed: 5,
            eval_every_epoch: false,
            shuffle: true,
            augment,
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
    }

    /// The loader thread delivers the batches that in-line gathering makes,
    /// augmented or not, from any starting batch, and stops when training
    /// does.
    #[test]
    fn prefetched_batches_match_in_line() {
        let images = crate::data::load_embedded().unwrap().train.take(700);
        let mut order: Vec<usize> = (0..images.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
        for augment in [false, true] {
            let config = config(64, augment);
            let dtype = candle_core::DType::F64;
            let delivered = with_batches(&images, &order, &config, 2, 3, dtype, |prepared| {
                prepared.collect::<Result<Vec<Batch>>>()
            })
            .unwrap();
            let expected: Vec<(usize, &[usize])> = order.chunks(64).enumerate().skip(3).collect();
            assert_eq!(delivered.len(), expected.len(), "batch count, augment {augment}");
            for (batch, (index, chunk)) in delivered.iter().zip(expected) {
                let (x, y) = gather_batch(&images, chunk, &config, 2, index, dtype).unwrap();
                assert_eq!(batch.index, index, "batch index");
                assert_eq!(batch.len, chunk.len(), "batch {index} length");
                assert_eq!(values(&batch.x), values(&x), "batch {index} images, augment {augment}");
                assert_eq!(values(&batch.y), values(&y), "batch {index} labels");
            }
        }
        let config = config(10, false);
        let delivered_count = with_batches(&images, &order, &config, 1, 0, candle_core::DType::F32, |prepared| {
            Ok(prepared.take(2).count())
        })
        .unwrap();
        assert_eq!(delivered_count, 2, "training stopped after two of 70 batches");
    }

    /// Trains the MLP for an epoch on rayon pools of one and of three
    /// threads. On one thread the pool's only worker trains while the
    /// loader thread gathers, so a loader that waited for the pool would
    /// hang this test (a watchdog fails it after 300 s). A GEMM split into
    /// blocks rounds differently from one over the whole result, and
    /// training amplifies that: at this small rate the
    /// two epoch losses differed by 7e-7 relative (with lr 0.05 and
    /// momentum 0.9, by 1e-3). The test allows 1e-5.
    #[test]
    fn fit_trains_on_one_and_three_threads() {
        use crate::activation::Activation;
        use crate::model::{Arch, Init, Network};
        use crate::optim::Sgd;
        let train_on = |threads: usize| -> f64 {
            let full = crate::data::load_embedded().unwrap();
            let data = Dataset { train: full.train.take(640), test: full.test.take(100), ..full };
            let mut network =
                Network::build(Arch::Mlp, &[1, 28, 28], &[100, 200], 10, Activation::PhotonicSigmoid, Init::Xavier, 0)
                    .unwrap();
            let vars = network.make_trainable().unwrap();
            let mut sgd = Sgd::new(0.01, 0.0, 0.0).unwrap();
            let forward = |x: &Tensor, mode| network.forward_mode(x, mode);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let config = TrainConfig { epochs: 1, ..config(64, false) };
            let metrics = pool
                .install(|| fit(&forward, &[1, 28, 28], &vars, &mut sgd, &data, &config, &Progress::hidden(), &mut || Ok(())))
                .unwrap();
            metrics.epochs[0].loss
        };
        // A detached thread, so that the watchdog can fail the test while
        // a hung run still waits.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send((train_on(1), train_on(3)));
        });
        let (one, three) = receiver
            .recv_timeout(std::time::Duration::from_secs(300))
            .expect("training on rayon pools of one and three threads did not finish within 300 s");
        assert!((one - three).abs() <= 1e-5 * one.abs(), "loss after an epoch: {one} on one thread, {three} on three");
    }
}
