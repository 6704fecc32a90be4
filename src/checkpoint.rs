//! Training checkpoints: one safetensors file with the parameters, the
//! optimizer's buffers and, in its metadata, the position in the run and
//! the figures so far.
//!
//! The file is written atomically after every epoch and when training is
//! interrupted, so the checkpoint on disk is always a complete one. Being a
//! single file, its tensors and its position can never come from two
//! different moments of the run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsio;
use crate::optim::OptimizerState;
use crate::store;
use crate::train::EpochMetrics;

/// File name of the checkpoint inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The `format` tag in a checkpoint's metadata.
pub const FORMAT: &str = "isonn-checkpoint";
/// The checkpoint version this build writes and reads.
pub const VERSION: u32 = 1;
/// Metadata key of the JSON description.
const METADATA_KEY: &str = "isonn_checkpoint";
/// Largest checkpoint file that [`load`] reads, 16 GiB.
pub const MAX_CHECKPOINT_BYTES: u64 = 16 << 30;

/// Returns the checkpoint file in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Sums of the epoch in progress, to finish its figures after a resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartialEpoch {
    /// Sum of the batch losses so far.
    pub loss_sum: f64,
    /// Training samples classified correctly so far.
    pub correct: usize,
    /// Seconds spent on the epoch's batches so far.
    pub seconds: f64,
}

/// Progress and figures of a run, stored as JSON in the checkpoint's
/// metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Position {
    /// Settings of the run as the caller describes them (architecture,
    /// learning rate, data checksum, ...). A resume must present equal ones.
    pub settings: serde_json::Value,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of the shuffling order.
    pub seed: u64,
    /// Training samples per epoch.
    pub train_len: usize,
    /// Epochs finished.
    pub epochs_done: usize,
    /// Batches of the next epoch already trained (0 at an epoch boundary).
    pub batches_done: usize,
    /// Sums of the epoch in progress when `batches_done > 0`.
    pub partial: PartialEpoch,
    /// Figures of the finished epochs.
    pub metrics: Vec<EpochMetrics>,
    /// The optimizer's [`crate::optim::Optimizer::zeroed`] counter.
    pub zeroed: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    isonn_version: String,
    parameters: usize,
    position: Position,
}

/// A checkpoint read back by [`load`].
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Progress of the run.
    pub position: Position,
    /// Parameter values, in the order of the trained `vars`.
    pub parameters: Vec<Tensor>,
    /// The optimizer's state.
    pub optimizer: OptimizerState,
}

/// Writes a checkpoint of `vars`, `optimizer` and `position` atomically to
/// `path`.
///
/// Rejects non-finite parameters, naming the tensor, so a diverged run
/// never replaces the last good checkpoint.
pub fn save(path: &Path, vars: &[Var], optimizer: &OptimizerState, position: &Position) -> Result<()> {
    let mut tensors = Vec::with_capacity(vars.len() * 2);
    for (i, var) in vars.iter().enumerate() {
        let name = format!("parameters.{i}");
        store::check_finite(var.as_tensor(), &name, path)?;
        tensors.push((name, var.as_tensor().clone()));
    }
    for (i, buffer) in optimizer.buffers.iter().enumerate() {
        if let Some(b) = buffer {
            tensors.push((format!("optimizer.{i}"), b.clone()));
        }
    }
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        isonn_version: env!("CARGO_PKG_VERSION").into(),
        parameters: vars.len(),
        position: position.clone(),
    };
    let json = serde_json::to_string(&header).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("cannot serialise the checkpoint header: {e}"),
    })?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let bytes = store::serialize_tensors(&tensors, Some(metadata), path)?;
    fsio::write_atomic(path, &bytes)
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = fsio::read_capped(path, MAX_CHECKPOINT_BYTES, CHECKPOINT_FILE)?;
    parse(&bytes, path)
}

/// Parses the bytes of a checkpoint; `path` is the file named in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let damaged = |detail: String| Error::Model {
        path: path.to_path_buf(),
        message: format!(
            "invalid checkpoint: {detail}; the file is truncated or damaged, so train again with \
             --force (the checkpoint is replaced after the first epoch)"
        ),
    };
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| damaged(format!("{e}")))?;
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| damaged(format!("no \"{METADATA_KEY}\" metadata, so not an isonn checkpoint")))?;
    let header: Header =
        serde_json::from_str(json).map_err(|e| damaged(format!("unreadable metadata ({e})")))?;
    if header.format != FORMAT {
        return Err(damaged(format!("format \"{}\" is not \"{FORMAT}\"", header.format)));
    }
    if header.version != VERSION {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint version {} written by isonn {}, but this isonn {} reads version \
                 {VERSION}; finish the run with the isonn that started it, or train again with --force",
                header.version,
                header.isonn_version,
                env!("CARGO_PKG_VERSION")
            ),
        });
    }
    let mut tensors = store::parse_tensors(bytes, path)?;
    let mut parameters = Vec::with_capacity(header.parameters.min(tensors.len()));
    for i in 0..header.parameters {
        let name = format!("parameters.{i}");
        let t = tensors.remove(&name).ok_or_else(|| damaged(format!("missing tensor {name}")))?;
        store::check_finite(&t, &name, path)?;
        parameters.push(t);
    }
    let mut buffers: Vec<Option<Tensor>> = (0..header.parameters)
        .map(|i| tensors.remove(&format!("optimizer.{i}")))
        .collect();
    if buffers.iter().all(Option::is_none) {
        buffers.clear();
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(damaged(format!("unexpected tensor {extra}")));
    }
    let position = header.position;
    if position.batches_done > 0 && position.batches_done.saturating_mul(position.batch_size) >= position.train_len.max(1) {
        return Err(damaged(format!(
            "{} batches of {} samples done in an epoch of {} samples",
            position.batches_done, position.batch_size, position.train_len
        )));
    }
    if position.metrics.len() != position.epochs_done {
        return Err(damaged(format!(
            "{} epochs done but figures for {}",
            position.epochs_done,
            position.metrics.len()
        )));
    }
    Ok(Checkpoint {
        optimizer: OptimizerState {
            buffers,
            zeroed: position.zeroed,
        },
        position,
        parameters,
    })
}
