//! The `isonn` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::MultiProgress;

use isonn::activation::Activation;
use isonn::bound::{self, BoundMode, BoundRecord, Granularity, Statistic};
use isonn::data::{self, DatasetName};
use isonn::experiment::{self, ReproduceConfig};
use isonn::hardware::{self, Effects, GainGranularity, Sweep};
use isonn::interop::manifest::DeviceSettings;
use isonn::model::{Arch, Init, Network};
use isonn::nonneg::{transform, ActivationRange, ShiftPolicy, TransformOptions};
use isonn::progress::Progress;
use isonn::provenance::{self, DataRecord};
use isonn::store::{self, Model};
use isonn::optim::Momentum;
use isonn::scenario::{self, NonnegOptimizer, NonnegOptimizerKind, Scenario};
use isonn::train::{fit_checkpointed, Checkpointing, Sgd, TrainConfig};
use isonn::verify::{self, Precision};

/// Set by the first Ctrl-C or SIGTERM: training stops after the current
/// batch and writes a checkpoint.
static STOP: AtomicBool = AtomicBool::new(false);

/// Exit status after an interruption, 128 + SIGINT as shells report it.
const EXIT_INTERRUPTED: u8 = 130;

/// Largest hidden width and batch size the command line accepts.
const MAX_WIDTH: usize = 1 << 16;

/// Relative logit tolerance a model stored in f32 must meet.
const TOLERANCE_F32: f64 = 1e-4;
/// Relative logit tolerance a model stored in f64 must meet.
const TOLERANCE_F64: f64 = 1e-9;

/// Non-negative isomorphic neural networks for incoherent photonic hardware.
#[derive(Parser)]
#[command(name = "isonn", version, about)]
struct Cli {
    /// Log debug detail (decisions and timing breakdowns).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// Data set selection shared by the commands that read data.
#[derive(clap::Args, Clone)]
struct DataArgs {
    /// Data set: fashion-mnist (full set if installed, else the embedded
    /// subset), fashion-mnist-subset (always the embedded subset), mnist,
    /// cifar10 (3x32x32, normalised per channel) or cifar10-gray (1x32x32
    /// luma in [0, 1]).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Directory with the data set's files: the IDX files
    /// (train-images-idx3-ubyte[.gz] ...) or the CIFAR-10 binary version
    /// (data_batch_1.bin ... test_batch.bin, or its cifar-10-batches-bin
    /// folder); overrides the ISONN_DATA environment variable.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

impl DataArgs {
    fn load(&self) -> Result<data::Dataset> {
        let name: DatasetName = self.dataset.parse()?;
        Ok(data::load(name, self.data.as_deref())?)
    }
}

/// Inputs and labels from `.npy` files, in place of a data set.
#[derive(clap::Args, Clone)]
struct NpyArgs {
    /// Read the inputs from this file in place of a data set: float32 or
    /// float64 [n, channels, height, width] with the model's sample shape.
    #[arg(long, value_name = "FILE.npy", conflicts_with_all = ["dataset", "data"])]
    inputs: Option<PathBuf>,
    /// Class labels of --inputs: a 1-D array of n class indices, any
    /// integer type (int64, int32, uint8, ...). eval requires it. Without
    /// it, verify, transform and bound label each input with the regular
    /// model's prediction, so their accuracies are agreements.
    #[arg(long, value_name = "FILE.npy", requires = "inputs")]
    labels: Option<PathBuf>,
}

impl NpyArgs {
    /// Reads --inputs for a model of `input_shape` and `classes` outputs,
    /// with --labels when given and else the predictions of `labeller`.
    /// Returns `None` without --inputs.
    fn load(
        &self,
        input_shape: &[usize],
        classes: usize,
        labeller: Option<&Network>,
    ) -> Result<Option<isonn::interop::user_data::UserData>> {
        let Some(inputs) = &self.inputs else {
            return Ok(None);
        };
        let mut data = isonn::interop::user_data::UserData::read_inputs(inputs, input_shape)?;
        match (&self.labels, labeller) {
            (Some(labels), _) => data.read_labels(labels, classes)?,
            (None, Some(network)) => {
                tracing::info!(
                    "no --labels: each input is labelled with the regular model's prediction, so the \
                     accuracies are agreements with it"
                );
                data.label_with(network)?;
            }
            (None, None) => bail!(
                "--inputs {} without --labels: accuracy needs the class of each input, so pass \
                 --labels FILE.npy (a 1-D integer array), or write the logits with `isonn predict`",
                inputs.display()
            ),
        }
        Ok(Some(data))
    }
}

/// A file format `isonn export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// ONNX, opset 13, float32.
    Onnx,
    /// The hardware manifest of a non-negative model: a directory with
    /// manifest.json and manifest.safetensors (docs/MANIFEST.md).
    Manifest,
}

#[derive(Subcommand)]
enum Command {
    /// Train a regular network and write it to a model directory.
    Train {
        /// Architecture.
        #[arg(long, value_enum, default_value_t = Arch::Mlp)]
        arch: Arch,
        /// Activation: photonic-sigmoid, photonic-sinusoidal, relu-n:N, relu,
        /// tanh, gelu, gelu-n:N or curve:FILE.csv (a measured transfer curve
        /// of input,output rows).
        #[arg(long, default_value = "photonic-sigmoid")]
        activation: String,
        /// Hidden layer widths of the MLP, comma-separated (default 100,200);
        /// the width of the residual network (default 16); the state size of
        /// the Elman network (default 128).
        #[arg(long, value_delimiter = ',')]
        hidden: Option<Vec<usize>>,
        /// Weight initialisation.
        #[arg(long, value_enum, default_value_t = Init::Xavier)]
        init: Init,
        #[command(flatten)]
        data: DataArgs,
        /// Passes over the training set.
        #[arg(long, default_value_t = 50)]
        epochs: usize,
        /// SGD learning rate.
        #[arg(long, default_value_t = 0.01)]
        lr: f64,
        /// SGD momentum, in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        momentum: f64,
        /// Samples per minibatch.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Seed of initialisation and shuffling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Visit the training samples in file order every epoch, as the
        /// method's reference code does, instead of shuffling them.
        #[arg(long)]
        no_shuffle: bool,
        /// Shift every training image by a random crop with 4 pixels of
        /// black padding and mirror it with probability 1/2, drawn from
        /// --seed, as the method's protocol does for CIFAR-10.
        #[arg(long)]
        augment: bool,
        /// Output model directory; it must be empty or missing unless
        /// --resume or --force is given.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Write into a non-empty output directory and start the run afresh,
        /// replacing the files isonn writes there; other files are kept.
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// Continue the interrupted run whose checkpoint is in --out, with
        /// the same settings; the result equals an uninterrupted run.
        #[arg(long)]
        resume: bool,
    },
    /// Transform a regular model into its non-negative isomorphic equivalent.
    Transform {
        /// The regular model directory.
        model: PathBuf,
        /// Output model directory for the non-negative network.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Verify on this data set's test images and write equivalence.json.
        #[arg(long)]
        dataset: Option<String>,
        /// Directory with the data set's files: the IDX files or the CIFAR-10
        /// binary version.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        // Without --labels, the regular model's predictions are the labels.
        #[command(flatten)]
        npy: NpyArgs,
        /// Shift policy: minimal (smallest exact shift plus a 1% margin) or
        /// published (max |c_i|).
        #[arg(long, value_enum, default_value_t = ShiftPolicy::Minimal)]
        shift: ShiftPolicy,
        /// Range given to activation outputs: method ([0, max f]) or tight
        /// ([min f, max f]).
        #[arg(long, value_enum, default_value_t = ActivationRange::Method)]
        activation_range: ActivationRange,
        /// Precision of the verification.
        #[arg(long, value_enum, default_value_t = Precision::Model)]
        precision: Precision,
        /// Store the non-negative model in f64 (the default keeps the
        /// regular model's data type). f64 keeps the shifted biases c + s
        /// exact where their f32 rounding, amplified by a recurrent layer
        /// or a large shift, can exceed the 1e-4 tolerance of f32 models.
        #[arg(long)]
        f64: bool,
        /// Write into a non-empty output directory, replacing the files
        /// isonn writes there; other files are kept.
        #[arg(long)]
        force: bool,
    },
    /// Replace the ReLU activations of a regular model by ReLU-N, with a
    /// fixed or a calibrated bound, so that `isonn transform` accepts it.
    Bound(BoundArgs),
    /// Compare a regular model with its non-negative counterpart on a data set.
    Verify {
        /// The regular model directory.
        regular: PathBuf,
        /// The non-negative model directory.
        nonneg: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        // Without --labels, the regular model's predictions are the labels.
        #[command(flatten)]
        npy: NpyArgs,
        /// Precision of the comparison: model (the models' own) or f64.
        #[arg(long, value_enum, default_value_t = Precision::Model)]
        precision: Precision,
        /// Output file of the report; default NONNEG/equivalence.json.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// Print the per-layer report of a model: weight routing, shift, bias,
    /// detector full scale and, on data, the observed signals. A regular
    /// model is transformed in memory with both shift policies.
    Inspect {
        /// The model directory (from `isonn train` or `isonn transform`).
        model: PathBuf,
        /// Observe the signals on this data set's test images.
        #[arg(long)]
        dataset: Option<String>,
        /// Directory with the IDX files.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Observe only the first N test images [default: all].
        #[arg(long, value_name = "N")]
        samples: Option<usize>,
        /// Also write the report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Export a model directory of either kind to an ONNX file. A
    /// non-negative model exports as its physical data flow: modulator,
    /// complement port, P and N weights, non-negative bias and shifted
    /// activation devices, as named nodes (docs/INTEROP.md). With --format
    /// manifest it writes the hardware manifest (docs/MANIFEST.md), and
    /// --gain or an effect option adds the device mapping to it.
    Export {
        /// The model directory.
        model: PathBuf,
        /// The format to write.
        #[arg(long, value_enum, default_value_t = ExportFormat::Onnx)]
        format: ExportFormat,
        /// The file to write (ONNX), or the directory (manifest).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// With --format manifest, add the device mapping of `isonn
        /// hardware` and these effect settings to the manifest.
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Import an ONNX model (as torch.onnx.export writes it), or a
    /// PyTorch state dict saved as safetensors with its architecture in
    /// --model, into a regular model directory that transform, eval and
    /// verify read.
    Import {
        /// The ONNX file, or the state dict (.safetensors).
        model: PathBuf,
        /// The model directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The architecture of a state dict: an isonn model.json whose layers
        /// may name their PyTorch module with "torch_name" (docs/INTEROP.md).
        #[arg(long = "model", value_name = "FILE.json")]
        architecture: Option<PathBuf>,
        /// Range LO,HI of every input value, e.g. 0,1 for pixels in [0, 1].
        /// Repeat it once per input channel for per-channel ranges
        /// (standardised colour images). Required for ONNX; for a state
        /// dict it replaces the architecture's input range.
        #[arg(long, value_name = "LO,HI", value_parser = parse_range, allow_hyphen_values = true)]
        input_range: Vec<isonn::model::Range>,
        /// Bound every ReLU of the imported model by the largest
        /// pre-activation on these inputs, per layer, as `isonn bound
        /// --calibrate max` does: a data set name (its first 10,000
        /// training images; clip rates on its test set) or a .npy file of
        /// inputs [n, channels, height, width] (used for both).
        #[arg(long, value_name = "NAME|FILE.npy")]
        calibrate: Option<String>,
        /// Write into a non-empty output directory, replacing the files
        /// isonn writes there; other files are kept.
        #[arg(long)]
        force: bool,
    },
    /// Import an ONNX model, transform it, verify the non-negative model
    /// against it and export that as ONNX, in one step; prints the
    /// equivalence report. Exit code 0 when the models agree, 1 when they
    /// do not, 2 on an error.
    Convert {
        /// The ONNX file.
        model: PathBuf,
        /// The non-negative ONNX file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Range LO,HI of every input value; repeat once per input channel
        /// for per-channel ranges.
        #[arg(long, value_name = "LO,HI", required = true, value_parser = parse_range, allow_hyphen_values = true)]
        input_range: Vec<isonn::model::Range>,
        /// Verify on these inputs, float32 or float64 [n, channels, height,
        /// width]; without it, on --samples values drawn from the input range.
        #[arg(long, value_name = "FILE.npy")]
        inputs: Option<PathBuf>,
        /// Number of samples drawn from the input range when no --inputs
        /// file is given.
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        /// Shift rule: minimal (default) or published (max |c_i|).
        #[arg(long, value_enum, default_value_t = ShiftPolicy::Minimal)]
        shift: ShiftPolicy,
    },
    /// Compute the logits of a model of either kind on inputs from a
    /// `.npy` file and write them to another.
    Predict {
        /// The model directory.
        model: PathBuf,
        /// Inputs, float32 or float64 `[n, channels, height, width]`.
        #[arg(long, value_name = "FILE.npy")]
        inputs: PathBuf,
        /// The file to write the logits to, float32 `[n, classes]`.
        #[arg(long, value_name = "FILE.npy")]
        out: PathBuf,
    },
    /// Print the test accuracy of a model of either kind, on a data set's
    /// test images or on --inputs with --labels.
    Eval {
        /// The model directory.
        model: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        npy: NpyArgs,
    },
    /// Train a non-negative model directory with a sign-keeping optimizer.
    TrainNonneg {
        /// The non-negative model directory (from `isonn transform`).
        model: PathBuf,
        /// The update rule.
        #[arg(long, value_enum, default_value_t = NonnegOptimizerKind::SignPreserving)]
        optimizer: NonnegOptimizerKind,
        /// Sign-preserving: scale of the gradient inside the tanh [default: 0.28].
        #[arg(long)]
        lr_in: Option<f64>,
        /// Sign-preserving: largest relative change per step, in (0, 1] [default: 0.3].
        #[arg(long)]
        lr_out: Option<f64>,
        /// Projected SGD: learning rate [default: 0.0027].
        #[arg(long)]
        lr: Option<f64>,
        /// Momentum coefficient in [0, 1); 0 switches momentum off.
        #[arg(long, default_value_t = 0.0)]
        momentum: f64,
        /// Sign-preserving: apply momentum to the gradient (before the tanh)
        /// or to the tanh term (as a bounded exponential average).
        #[arg(long, value_enum, default_value_t = MomentumOn::Gradient)]
        momentum_on: MomentumOn,
        #[command(flatten)]
        data: DataArgs,
        /// Passes over the training set.
        #[arg(long, default_value_t = 5)]
        epochs: usize,
        /// Samples per minibatch.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Seed of the shuffling order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Visit the training samples in file order every epoch, as the
        /// method's reference code does, instead of shuffling them.
        #[arg(long)]
        no_shuffle: bool,
        /// Shift every training image by a random crop with 4 pixels of
        /// black padding and mirror it with probability 1/2, drawn from
        /// --seed, as the method's protocol does for CIFAR-10.
        #[arg(long)]
        augment: bool,
        /// Output model directory; it must be empty or missing unless
        /// --resume or --force is given.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Write into a non-empty output directory and start the run afresh,
        /// replacing the files isonn writes there; other files are kept.
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// Train through the hardware model with these effects (noise-aware
        /// fine-tuning). The noise is drawn from --seed.
        #[command(flatten)]
        effects: EffectArgs,
        /// Gains of the hardware mapping when effects are given.
        #[arg(long, value_enum, default_value_t = GainGranularity::PerLayer)]
        gain: GainGranularity,
        /// Continue the interrupted run whose checkpoint is in --out, with
        /// the same settings; the result equals an uninterrupted run.
        #[arg(long)]
        resume: bool,
    },
    /// Measure training and inference throughput on synthetic batches.
    Bench {
        /// Architectures, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "mlp,cnn")]
        models: Vec<Arch>,
        /// Batches per repetition for the MLP and Elman networks (the convolutional
        /// networks, cnn, resnet and cifar-cnn, run a tenth, at least 2).
        #[arg(long, default_value_t = 100)]
        batches: usize,
        /// Samples per batch.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Repetitions; min, median and max are reported.
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Workloads, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "regular-train,nonneg-train,regular-forward,nonneg-forward"
        )]
        workloads: Vec<isonn::bench::Workload>,
        /// Also write every figure, the GEMM throughput and the environment as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Evaluate non-negative models on a model of photonic hardware, or
    /// count the hardware each way of handling signs needs (--cost).
    Hardware(HardwareArgs),
    /// Run the method's experiments and tabulate them beside the published figures.
    Reproduce {
        /// Output directory for results.json, results.md, plots and models.
        #[arg(long, value_name = "DIR", default_value = "reproduce")]
        out: PathBuf,
        /// The MLP only with 5 epochs (2 + 2 for post-training), to finish
        /// in minutes on two cores.
        #[arg(long)]
        quick: bool,
        /// Epochs of the long scenarios; default 50 (the protocol), 5 with --quick.
        #[arg(long)]
        epochs: Option<usize>,
        /// Regular and non-negative epochs of post-training; default 5, 2 with --quick.
        #[arg(long)]
        post_epochs: Option<usize>,
        /// Number of seeds N; the seeds are 0, 1, ..., N-1.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Seeds of the baselines (regular + clip, exp init); default --seeds.
        #[arg(long)]
        baseline_seeds: Option<u64>,
        /// Architectures, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "mlp")]
        models: Vec<Arch>,
        /// Scenarios, comma-separated: all, transformation, regular-clip,
        /// post-training[-projected|-sign-preserving], from-scratch[-...],
        /// exp-init[-...].
        #[arg(long, default_value = "all")]
        scenarios: String,
        /// Activations, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "photonic-sigmoid,photonic-sinusoidal")]
        activations: Vec<String>,
        /// Initialisation of the regular networks.
        #[arg(long, value_enum, default_value_t = Init::Xavier)]
        init: Init,
        /// Shuffle the training set every epoch. By default the samples are
        /// visited in file order, as the method's reference code does. Each
        /// cell records the setting.
        #[arg(long)]
        shuffle: bool,
        /// Continue an interrupted run in --out, keeping its finished cells.
        #[arg(long)]
        resume: bool,
        /// Write the tables and plots from the finished cells in --out
        /// without running the missing ones.
        #[arg(long)]
        report_only: bool,
        #[command(flatten)]
        data: DataArgs,
    },
}

/// Device effects of the hardware model. Each is off unless given.
#[derive(clap::Args, Clone)]
struct EffectArgs {
    /// Bits of the modulator DACs.
    #[arg(long, value_name = "B")]
    input_bits: Option<u32>,
    /// Bits of each transmission setting.
    #[arg(long, value_name = "B")]
    weight_bits: Option<u32>,
    /// Bits of the detector ADCs, over each layer's full scale.
    #[arg(long, value_name = "B")]
    adc_bits: Option<u32>,
    /// Extinction ratio of the weight elements, in dB.
    #[arg(long, value_name = "DB")]
    extinction_db: Option<f64>,
    /// Standard deviation of each transmission, as a fraction of full
    /// transmission (default 0).
    #[arg(long, value_name = "S")]
    weight_noise: Option<f64>,
    /// Standard deviation of the additive detector noise, as a fraction of
    /// full scale (default 0).
    #[arg(long, value_name = "S")]
    detector_noise: Option<f64>,
    /// Shot-like noise: standard deviation at full scale, as a fraction of
    /// full scale (default 0).
    #[arg(long, value_name = "S")]
    shot_noise: Option<f64>,
}

impl EffectArgs {
    fn to_effects(&self) -> Result<Effects> {
        let effects = Effects {
            input_bits: self.input_bits,
            weight_bits: self.weight_bits,
            adc_bits: self.adc_bits,
            extinction_db: self.extinction_db,
            weight_noise: self.weight_noise.unwrap_or(0.0),
            detector_noise: self.detector_noise.unwrap_or(0.0),
            shot_noise: self.shot_noise.unwrap_or(0.0),
        };
        effects.validate()?;
        Ok(effects)
    }

    /// Returns `true` when any effect option is on the command line, even
    /// one that sets its default.
    fn any_given(&self) -> bool {
        self.input_bits.is_some()
            || self.weight_bits.is_some()
            || self.adc_bits.is_some()
            || self.extinction_db.is_some()
            || self.weight_noise.is_some()
            || self.detector_noise.is_some()
            || self.shot_noise.is_some()
    }
}

/// The device mapping and effects of the hardware model, shared by
/// `isonn hardware` and `isonn export --format manifest`.
#[derive(clap::Args, Clone)]
struct DeviceArgs {
    #[command(flatten)]
    effects: EffectArgs,
    /// Gains of the mapping: one per layer (default) or one per output.
    #[arg(long, value_enum)]
    gain: Option<GainGranularity>,
}

impl DeviceArgs {
    /// Returns the gain granularity, per layer unless --gain is given.
    fn granularity(&self) -> GainGranularity {
        self.gain.unwrap_or_default()
    }

    /// Returns the checked settings when --gain or any effect option is
    /// given, `None` otherwise.
    fn settings(&self) -> Result<Option<DeviceSettings>> {
        if self.gain.is_none() && !self.effects.any_given() {
            return Ok(None);
        }
        Ok(Some(DeviceSettings { granularity: self.granularity(), effects: self.effects.to_effects()? }))
    }
}

/// Options of `isonn hardware`. docs/HARDWARE.md describes the effects.
#[derive(clap::Args)]
struct HardwareArgs {
    /// Model directories: non-negative ones for evaluation and sweeps (one
    /// plot line each), either kind for --cost.
    #[arg(required = true)]
    models: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Print the cost-of-signs table instead of evaluating.
    #[arg(long)]
    cost: bool,
    /// Per-use energies in joules for --cost (JSON or TOML with modulator_j,
    /// weight_element_j, photodetector_j, adc_j, subtraction_j).
    #[arg(long, value_name = "FILE", requires = "cost")]
    energy: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Number of noise seeds N; the seeds are 0, 1, ..., N-1.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Evaluate only the first N test images.
    #[arg(long, value_name = "N")]
    test_images: Option<usize>,
    /// Sweep one parameter: NAME=A..B or NAME=A..B:STEPS, e.g.
    /// weight-bits=2..8 or detector-noise=0..0.05:6.
    #[arg(long)]
    sweep: Option<String>,
    /// Output directory of the sweep (sweep.md, sweep.json, sweep.png) or
    /// of the cost table (cost.md, cost.json).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Title of the sweep plot; default names the parameter.
    #[arg(long)]
    title: Option<String>,
}

/// Options of `isonn bound`. docs/RELU.md describes the modes.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["relu_n", "calibrate"])))]
struct BoundArgs {
    /// The regular model directory, e.g. from `isonn train --activation relu`.
    model: PathBuf,
    /// Output model directory for the bounded network and bound.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Fixed bound: every ReLU becomes ReLU-N, min(max(x, 0), N), and every
    /// GELU becomes GELU-N, min(gelu(x), N), N > 0.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    relu_n: Option<f64>,
    /// Calibrated bound: max, or percentile:P with 0 < P <= 100, of the
    /// activation outputs on the calibration images (for ReLU, of the
    /// pre-activations).
    #[arg(long, value_name = "STATISTIC")]
    calibrate: Option<String>,
    /// Relative margin of a calibrated bound: bound = statistic * (1 + margin) [default: 0].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    margin: Option<f64>,
    /// One calibrated bound per layer, or per channel (conv output channel,
    /// linear unit), folded into the weights; per channel needs ReLU
    /// [default: layer].
    #[arg(long, value_enum)]
    per: Option<Granularity>,
    #[command(flatten)]
    data: DataArgs,
    // --inputs gives both the calibration images and the test images of
    // the clip rates. Without --labels, the unbounded model's predictions
    // are the labels.
    #[command(flatten)]
    npy: NpyArgs,
    /// Calibration images: the first K of the training split, or of
    /// --inputs (all when fewer).
    #[arg(long, value_name = "K", default_value_t = 10_000)]
    calibration_samples: usize,
    /// Write into a non-empty output directory, replacing the files isonn
    /// writes there; other files are kept.
    #[arg(long)]
    force: bool,
}

/// Place where the sign-preserving optimizer applies momentum.
#[derive(Clone, Copy, clap::ValueEnum)]
enum MomentumOn {
    /// `m <- beta m + g`, then `tanh(lr_in m)`.
    Gradient,
    /// `m <- beta m + (1 - beta) tanh(lr_in g)`.
    Tanh,
}

fn main() -> std::process::ExitCode {
    isonn::ops::keep_freed_memory();
    isonn::ops::keep_elementwise_ops_inline();
    let cli = Cli::parse();
    if let Err(e) = check_thread_variables() {
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let multi = MultiProgress::new();
    init_logging(cli.verbose, multi.clone());
    let progress = Progress::terminal(multi);
    install_stop_handler();
    // Every command runs on a rayon worker, so that the fast ops' GEMMs and
    // loops share rayon's threads with the caller instead of waking them
    // from outside (see `on_compute_threads`).
    match isonn::ops::on_compute_threads(|| run(cli.command, &progress)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(isonn::Error::Interrupted { checkpoint, .. }) = e.downcast_ref::<isonn::Error>() {
                let _ = writeln!(std::io::stderr(), "{e}");
                if checkpoint.is_some() {
                    let _ = writeln!(std::io::stderr(), "to continue the run, execute:\n  {}", resume_command());
                }
                return std::process::ExitCode::from(EXIT_INTERRUPTED);
            }
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Maximum thread count that `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS`
/// may set. Rayon starts every thread it is given, so a mistyped 100000 would
/// otherwise spend minutes starting threads until memory runs out.
const MAX_THREADS: usize = 1024;

/// Checks that the thread-count variables, where set, are whole numbers
/// from 1 to [`MAX_THREADS`]. Rayon and candle fall back to their defaults
/// on a value they cannot read, which would time another thread count
/// than the one the user set.
fn check_thread_variables() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    for name in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        let Some(value) = std::env::var_os(name) else { continue };
        let text = value.to_string_lossy();
        let count = text.parse::<usize>().ok().filter(|n| (1..=MAX_THREADS).contains(n));
        if count.is_none() {
            bail!(
                "invalid {name} {text:?}: expected a whole number of threads from 1 to {MAX_THREADS} \
                 (this machine has {cores} cores); unset it for the default"
            );
        }
    }
    Ok(())
}

/// Makes the first Ctrl-C or SIGTERM set [`STOP`], so training finishes its
/// batch and saves, and a second one exit at once. Every file is written
/// atomically, so exiting at any point leaves no partial file behind.
fn install_stop_handler() {
    let result = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            let _ = writeln!(std::io::stderr(), "second interrupt: exiting without saving");
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
        let _ = writeln!(
            std::io::stderr(),
            "interrupt: stopping after the current batch to save a checkpoint; interrupt again to exit at once"
        );
    });
    if let Err(e) = result {
        tracing::warn!("cannot install the Ctrl-C handler ({e}); an interrupt stops isonn without a checkpoint");
    }
}

/// Returns this process's command line with `--resume` in place of
/// `--force`, quoted for a POSIX shell.
fn resume_command() -> String {
    let mut args: Vec<String> = command_line().into_iter().filter(|a| a != "--force").collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    let quote = |a: &String| {
        let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Sends tracing output to standard error, above any progress bars.
fn init_logging(verbose: bool, multi: MultiProgress) {
    let level = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("isonn={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(move || SuspendingWriter(multi.clone()))
        .init();
}

/// Writes log lines while the progress bars are hidden.
struct SuspendingWriter(MultiProgress);

impl Write for SuspendingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Rejects an `--out` that is a file, or a non-empty directory unless
/// `force` is set, for commands without --resume. Nothing is deleted:
/// `force` only lets isonn replace the files it writes.
fn check_output(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {} exists and is not a directory; choose another --out", dir.display());
    }
    let non_empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if non_empty && !force {
        bail!(
            "{} already exists and is not empty; choose another --out, or pass --force to write \
             into it (isonn replaces only the files it writes)",
            dir.display()
        );
    }
    Ok(())
}

/// Checks `--out` as [`check_output`] does, for commands with --resume:
/// with `resume` it requires the checkpoint to continue from, and without
/// it the error for a directory with a checkpoint offers --resume.
fn check_resumable_output(dir: &Path, force: bool, resume: bool) -> Result<()> {
    let checkpoint = isonn::checkpoint::path_in(dir);
    if resume {
        if !checkpoint.is_file() {
            bail!(
                "--resume: {} does not exist, so there is no run to continue in {}; \
                 start the run without --resume",
                checkpoint.display(),
                dir.display()
            );
        }
        return Ok(());
    }
    if !force && checkpoint.is_file() {
        bail!(
            "{} already exists and is not empty; pass --resume to continue the run whose \
             checkpoint it contains, --force to start afresh (isonn replaces only the files it \
             writes), or choose another --out",
            dir.display()
        );
    }
    check_output(dir, force)
}

/// Rejects an output file path that is a directory or whose parent
/// directory does not exist, so that a command fails before its work
/// rather than after it. `option` is the flag that set `path`, and
/// `example` a file name to suggest.
fn check_output_file(path: &Path, option: &str, example: &str) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{option} {} is a directory; give the path of the file to write, e.g. {}",
            path.display(),
            path.join(example).display()
        );
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "{option} {}: the directory {} does not exist; create it first or choose another {option}",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Warns when the model in `dir` was trained on other data than `data`.
fn warn_data_mismatch(dir: &Path, provenance: &serde_json::Value, data: &DataRecord) {
    match provenance::trained_on(provenance) {
        Some(trained) => {
            if let Some(warning) = provenance::data_mismatch(&format!("model {}", dir.display()), &trained, data) {
                tracing::warn!("{warning}");
            }
        }
        None => tracing::debug!("model {} records no training data; cannot compare data sets", dir.display()),
    }
}

/// Parses `LO,HI` into a range.
fn parse_range(text: &str) -> std::result::Result<isonn::model::Range, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [lo, hi] = parts[..] else {
        return Err(format!("expected LO,HI such as 0,1, got {text:?}"));
    };
    let parse = |v: &str| v.parse::<f64>().map_err(|_| format!("{v:?} in {text:?} is not a number"));
    isonn::model::Range::new(parse(lo)?, parse(hi)?).map_err(|e| e.to_string())
}

fn load_model(dir: &Path) -> Result<(Model, serde_json::Value)> {
    store::load(dir).with_context(|| format!("cannot load model {}", dir.display()))
}

/// Warns that a learning rate of zero leaves every parameter where it is.
fn warn_if_frozen(flag: &str, lr: f64) {
    if lr == 0.0 {
        tracing::warn!("{flag} 0: training will not change any parameter; pass a positive value to train");
    }
}

fn command_line() -> Vec<String> {
    std::env::args().collect()
}

fn run(command: Command, progress: &Progress) -> Result<std::process::ExitCode> {
    match command {
        Command::Train {
            arch,
            activation,
            hidden,
            init,
            data,
            epochs,
            lr,
            momentum,
            batch_size,
            seed,
            no_shuffle,
            augment,
            out,
            force,
            resume,
        } => {
            let activation: Activation = activation.parse()?;
            let config = TrainConfig {
                epochs,
                batch_size,
                seed,
                eval_every_epoch: true,
                shuffle: !no_shuffle,
                augment,
            };
            config.validate()?;
            let hidden = hidden.unwrap_or_else(|| arch.default_hidden());
            if hidden.iter().any(|&h| h == 0 || h > MAX_WIDTH) {
                bail!("invalid --hidden {hidden:?}: every hidden width must lie in 1..={MAX_WIDTH}");
            }
            if batch_size > MAX_WIDTH {
                bail!("invalid --batch-size {batch_size}: must be at most {MAX_WIDTH}");
            }
            let mut sgd = Sgd::new(lr, momentum, 0.0)?;
            warn_if_frozen("--lr", lr);
            check_resumable_output(&out, force, resume)?;
            let dataset = data.load()?;
            let data_record = DataRecord::of(&dataset);
            let shape = dataset.train.sample_shape();
            let mut network =
                Network::build(arch, &shape, &hidden, dataset.classes, activation.clone(), init, seed)?;
            scenario::use_input_range_of(&mut network, &dataset, init, seed)?;
            tracing::info!("training {arch} with {activation}, init {init}, lr {lr}, batch {batch_size}, seed {seed}");
            let vars = network.make_trainable()?;
            isonn::fsio::create_dir_all(&out)?;
            let checkpointing = Checkpointing {
                dir: Some(out.clone()),
                resume,
                settings: serde_json::json!({
                    "command": "train", "arch": arch, "activation": activation, "hidden": hidden,
                    "init": init, "lr": lr, "momentum": momentum, "data": data_record.files,
                    "shuffle": !no_shuffle, "augment": augment,
                }),
                stop: Some(&STOP),
            };
            let metrics = {
                let forward = |x: &candle_core::Tensor, mode| network.forward_mode(x, mode);
                fit_checkpointed(&forward, &shape, &vars, &mut sgd, &dataset, &config, progress, &mut || Ok(()), &checkpointing)?
            };
            let provenance = provenance::record(
                &command_line(),
                Some(seed),
                Some(&data_record),
                serde_json::json!({
                    "trained_on": data_record,
                    "arch": arch, "activation": activation, "hidden": hidden, "init": init,
                    "training": config, "lr": lr, "momentum": momentum,
                    "dataset": dataset.name, "data_source": dataset.source,
                    "test_accuracy": metrics.test_accuracy,
                }),
            );
            store::save(&out, &Model::Regular(network.detached()), &provenance)?;
            isonn::fsio::write_json_atomic(&out.join("metrics.json"), &metrics)?;
            println!("test_accuracy {:.4}", metrics.test_accuracy);
            println!("model written to {}", out.display());
        }
        Command::Transform {
            model,
            out,
            dataset,
            data,
            npy,
            shift,
            activation_range,
            precision,
            f64,
            force,
        } => {
            let (loaded, source_provenance) = load_model(&model)?;
            let Model::Regular(network) = loaded else {
                bail!("{} is already a non-negative model; transform takes a regular one", model.display());
            };
            // The regular network's f32 parameters are exact in f64, so the
            // f64 network computes the same function in higher precision.
            let network = if f64 { network.to_dtype(candle_core::DType::F64)? } else { network };
            check_output(&out, force)?;
            let options = TransformOptions {
                shift,
                activation_range,
            };
            // Read the data before writing anything, so a bad --dataset or
            // --inputs leaves no output behind.
            let test = if dataset.is_some() || npy.inputs.is_some() {
                let args = DataArgs { dataset: dataset.unwrap_or_default(), data };
                Some(regular_test_data(&args, &npy, &network)?)
            } else {
                if data.is_some() {
                    bail!("--data without --dataset: name the data set to verify on, e.g. --dataset fashion-mnist");
                }
                None
            };
            if let Some((images, _)) = &test {
                verify::check_images(&network.input_shape, images)?;
            }
            let data_record = test.as_ref().map(|(_, record)| record.clone());
            if let Some(record) = &data_record {
                warn_data_mismatch(&model, &source_provenance, record);
            }
            let nonneg = transform(&network, &options)?;
            let reference = bound_reference(&model)?;
            let provenance = provenance::record(
                &command_line(),
                None,
                data_record.as_ref(),
                serde_json::json!({
                    "trained_on": source_provenance.get("trained_on"),
                    "transform": options,
                    "source_model": model,
                    "source_seed": source_provenance.get("seed"),
                    "reference": reference,
                }),
            );
            store::save(&out, &Model::Nonneg(nonneg.clone()), &provenance)?;
            println!("non-negative model written to {}", out.display());
            if let Some((images, record)) = test {
                let mut report = verify::verify(&network, &nonneg, &images, 1000, precision, progress)?;
                report.reference = reference;
                report.data = Some(record);
                isonn::fsio::write_json_atomic(&out.join("equivalence.json"), &report)?;
                println!("{}", report.summary());
                print_layer_table(&report);
                return Ok(verdict(&report, nonneg.dtype()));
            }
        }
        Command::Verify {
            regular,
            nonneg,
            data,
            npy,
            precision,
            report,
        } => {
            let (a, provenance_a) = load_model(&regular)?;
            let (b, provenance_b) = load_model(&nonneg)?;
            let (Model::Regular(a), Model::Nonneg(b)) = (a, b) else {
                bail!(
                    "verify takes a regular model, then a non-negative one: {} is {} and {} is {}",
                    regular.display(),
                    store::load(&regular).map(|m| m.0.kind()).unwrap_or("?"),
                    nonneg.display(),
                    store::load(&nonneg).map(|m| m.0.kind()).unwrap_or("?")
                );
            };
            if let Some(path) = &report {
                check_output_file(path, "--report", "equivalence.json")?;
            }
            let (images, record) = regular_test_data(&data, &npy, &a)?;
            warn_data_mismatch(&regular, &provenance_a, &record);
            warn_data_mismatch(&nonneg, &provenance_b, &record);
            let mut result = verify::verify(&a, &b, &images, 1000, precision, progress)?;
            result.reference = bound_reference(&regular)?;
            result.data = Some(record);
            let path = report.unwrap_or_else(|| nonneg.join("equivalence.json"));
            isonn::fsio::write_json_atomic(&path, &result)?;
            println!("{}", result.summary());
            print_layer_table(&result);
            println!("report written to {}", path.display());
            return Ok(verdict(&result, b.dtype()));
        }
        Command::Bound(args) => run_bound(args, progress)?,
        Command::Inspect {
            model,
            dataset,
            data,
            samples,
            json,
        } => run_inspect(&model, dataset, data, samples, json.as_deref(), progress)?,
        Command::Import {
            model,
            out,
            architecture,
            input_range,
            calibrate,
            force,
        } => {
            check_output(&out, force)?;
            let mut imported = import_any(&model, architecture.as_deref(), &input_range)?;
            let mut bound_record = None;
            if let Some(source) = &calibrate {
                if bound::relu_layers(&imported.network).is_empty() {
                    println!("the model has no ReLU, so --calibrate {source} has nothing to bound");
                } else {
                    let (calibration, test) = if source.ends_with(".npy") {
                        let images = isonn::interop::samples::images_from_npy(Path::new(source), &imported.network)?;
                        (images.clone(), images)
                    } else {
                        let dataset = data::load(source.parse::<DatasetName>()?, None)?;
                        (dataset.train.take(10_000), dataset.test)
                    };
                    let mode = BoundMode::Calibrate {
                        statistic: Statistic::Max,
                        margin: 0.0,
                        granularity: Granularity::Layer,
                    };
                    let bounded = bound::bound_network(&imported.network, &mode, &calibration, &test, progress)?;
                    println!("{}", bounded.record.reference);
                    imported.network = bounded.network;
                    bound_record = Some(bounded.record);
                }
            }
            let provenance = provenance::record(
                &command_line(),
                None,
                None,
                serde_json::json!({
                    "imported_from": model,
                    "architecture": architecture,
                    "output_function": imported.output_function,
                    "calibrated_on": calibrate,
                }),
            );
            store::save(&out, &Model::Regular(imported.network.clone()), &provenance)?;
            if let Some(record) = &bound_record {
                record.save(&out)?;
            }
            let layers: Vec<&str> = imported.network.layers.iter().map(|l| l.kind()).collect();
            println!("imported {} ({}) into {}", model.display(), layers.join(", "), out.display());
            if let Some(function) = imported.output_function {
                println!("the graph ends in {function}; the model outputs the logits before it, with the same argmax");
            }
        }
        Command::Convert {
            model,
            out,
            input_range,
            inputs,
            samples,
            shift,
        } => {
            let onnx = isonn::interop::read_model(&model)?;
            let network = isonn::interop::import_model(&onnx, &model, &input_range)?.network;
            let options = TransformOptions { shift, ..Default::default() };
            let nonneg = transform(&network, &options)?;
            let images = match &inputs {
                Some(path) => isonn::interop::samples::images_from_npy(path, &network)?,
                None => isonn::interop::samples::uniform_images(&network, samples, 0)?,
            };
            let report = verify::verify(&network, &nonneg, &images, 1000, Precision::Model, progress)?;
            isonn::interop::write_model(&out, &isonn::interop::export_nonneg(&nonneg)?)?;
            match &inputs {
                Some(path) => println!("verified on the {} inputs in {}", images.len(), path.display()),
                None => println!("verified on {} samples drawn from the input range (seed 0)", images.len()),
            }
            println!("labels are the imported model's predictions, so accuracy_isomorphic is the agreement");
            println!("{}", report.summary());
            println!("non-negative model written to {}", out.display());
            return Ok(verdict(&report, nonneg.dtype()));
        }
        Command::Predict { model, inputs, out } => {
            check_output_file(&out, "--out", "logits.npy")?;
            if let (Ok(input_file), Ok(output_file)) = (inputs.canonicalize(), out.canonicalize()) {
                if input_file == output_file {
                    bail!(
                        "--out {} is the --inputs file, which predict would overwrite; write the \
                         logits to another file",
                        out.display()
                    );
                }
            }
            let (loaded, _) = load_model(&model)?;
            let data = isonn::interop::npy::read_npy(&inputs)?;
            let (n, logits) = isonn::interop::samples::predict(&loaded, &data, &inputs)?;
            let classes = logits.len() / n.max(1);
            isonn::interop::npy::write_npy_f32(&out, &[n, classes], &logits)?;
            println!("wrote the logits of {n} inputs ({classes} classes) to {}", out.display());
        }
        Command::Export { model, format, out, device } => {
            let (loaded, _) = load_model(&model)?;
            let settings = device.settings()?;
            match format {
                ExportFormat::Onnx => {
                    if settings.is_some() {
                        bail!(
                            "--gain and the effect options describe the device mapping of a hardware \
                             manifest; add --format manifest or leave them out"
                        );
                    }
                    let onnx = isonn::interop::export_model(&loaded)?;
                    isonn::interop::write_model(&out, &onnx)?;
                }
                ExportFormat::Manifest => {
                    let Model::Nonneg(network) = &loaded else {
                        bail!(
                            "{} is a regular model; the hardware manifest describes a non-negative \
                             one, so run isonn transform first and export its output",
                            model.display()
                        );
                    };
                    isonn::interop::manifest::write_manifest(&out, network, settings.as_ref())?;
                }
            }
            println!("wrote {} model {} as {}", loaded.kind(), model.display(), out.display());
        }
        Command::Eval { model, data, npy } => {
            let (loaded, model_provenance) = load_model(&model)?;
            let (images, record) = test_data(&data, &npy, loaded.input_shape(), classes_of(&loaded)?, None)?;
            warn_data_mismatch(&model, &model_provenance, &record);
            let forward = |x: &candle_core::Tensor| loaded.forward(x);
            let accuracy =
                verify::accuracy(&forward, loaded.input_shape(), &images, 1000, loaded.dtype(), progress)?;
            let sample_noun = if npy.inputs.is_some() { "inputs" } else { "test images" };
            println!(
                "{} model, {} {sample_noun} from {}: accuracy {accuracy:.4}",
                loaded.kind(),
                images.len(),
                record.dataset
            );
        }
        Command::TrainNonneg {
            model,
            optimizer,
            lr_in,
            lr_out,
            lr,
            momentum,
            momentum_on,
            data,
            epochs,
            batch_size,
            seed,
            no_shuffle,
            augment,
            out,
            force,
            effects,
            gain,
            resume,
        } => {
            let effects = effects.to_effects()?;
            if resume && !effects.is_ideal() {
                bail!(
                    "--resume continues only runs without hardware effects (their noise draws are not \
                     checkpointed); rerun the hardware fine-tuning from its start with --force"
                );
            }
            let rule = match optimizer {
                NonnegOptimizerKind::Projected => {
                    if lr_in.is_some() || lr_out.is_some() {
                        bail!("--lr-in and --lr-out set the sign-preserving optimizer; projected SGD takes --lr");
                    }
                    NonnegOptimizer::Projected {
                        lr: lr.unwrap_or(0.0027),
                        momentum,
                    }
                }
                NonnegOptimizerKind::SignPreserving if lr.is_some() => {
                    bail!("--lr sets projected SGD; the sign-preserving optimizer takes --lr-in and --lr-out");
                }
                NonnegOptimizerKind::SignPreserving => NonnegOptimizer::SignPreserving {
                    lr_in: lr_in.unwrap_or(0.28),
                    lr_out: lr_out.unwrap_or(0.3),
                    momentum: match (momentum, momentum_on) {
                        (m, _) if m == 0.0 => Momentum::None,
                        (m, MomentumOn::Gradient) => Momentum::Gradient(m),
                        (m, MomentumOn::Tanh) => Momentum::Tanh(m),
                    },
                },
            };
            rule.build()?;
            match rule {
                NonnegOptimizer::Projected { lr, .. } => warn_if_frozen("--lr", lr),
                NonnegOptimizer::SignPreserving { lr_in, .. } => warn_if_frozen("--lr-in", lr_in),
            }
            let config = TrainConfig {
                epochs,
                batch_size,
                seed,
                eval_every_epoch: true,
                shuffle: !no_shuffle,
                augment,
            };
            config.validate()?;
            let (loaded, source_provenance) = load_model(&model)?;
            let Model::Nonneg(mut network) = loaded else {
                bail!(
                    "{} is a regular model; run `isonn transform` on it first, then train the result",
                    model.display()
                );
            };
            check_resumable_output(&out, force, resume)?;
            let dataset = data.load()?;
            let hardware = (!effects.is_ideal()).then_some(hardware::HardwareTraining {
                effects,
                granularity: gain,
                seed,
            });
            let data_record = DataRecord::of(&dataset);
            isonn::fsio::create_dir_all(&out)?;
            // The source model's bytes are part of the settings, so a resume
            // cannot continue from a different starting model.
            let source_tensors = isonn::fsio::read_capped(
                &model.join(store::MODEL_TENSORS),
                store::MAX_TENSOR_BYTES,
                store::MODEL_TENSORS,
            )?;
            let checkpointing = Checkpointing {
                dir: Some(out.clone()),
                resume,
                settings: serde_json::json!({
                    "command": "train-nonneg", "optimizer": rule, "data": data_record.files,
                    "shuffle": !no_shuffle, "augment": augment,
                    "source_model_sha256": isonn::data::sha256_hex(&source_tensors),
                }),
                stop: Some(&STOP),
            };
            let report = match &hardware {
                None => scenario::train_nonneg_checkpointed(&mut network, &dataset, &config, &rule, progress, &checkpointing)?,
                Some(h) => scenario::train_nonneg_on_hardware(&mut network, &dataset, &config, &rule, h, progress)?,
            };
            let provenance = provenance::record(
                &command_line(),
                Some(seed),
                Some(&data_record),
                serde_json::json!({
                    "hardware_training": hardware,
                    "trained_on": data_record,
                    "pretrained_on": source_provenance.get("trained_on"),
                    "source_model": model, "optimizer": rule, "training": config,
                    "dataset": dataset.name, "data_source": dataset.source,
                    "test_accuracy": report.metrics.test_accuracy,
                    "zeroed": report.zeroed,
                }),
            );
            store::save(&out, &Model::Nonneg(network), &provenance)?;
            isonn::fsio::write_json_atomic(&out.join("metrics.json"), &report)?;
            if report.zeroed > 0 {
                tracing::warn!("{} parameters became exactly 0 and can no longer change", report.zeroed);
            }
            println!("test_accuracy {:.4}", report.metrics.test_accuracy);
            println!("model written to {}", out.display());
        }
        Command::Bench {
            models,
            batches,
            batch_size,
            repetitions,
            workloads,
            json,
        } => {
            if batch_size > MAX_WIDTH {
                bail!("invalid --batch-size {batch_size}: must be at most {MAX_WIDTH}");
            }
            for (option, value) in [("--batches", batches), ("--batch-size", batch_size), ("--repetitions", repetitions)] {
                if value == 0 {
                    bail!("invalid {option} 0: must be at least 1");
                }
            }
            if let Some(path) = &json {
                check_output_file(path, "--json", "bench.json")?;
            }
            run_bench(&models, &workloads, batches, batch_size, repetitions, json.as_deref())?;
        }
        Command::Hardware(args) => run_hardware(args, progress)?,
        Command::Reproduce {
            out,
            quick,
            epochs,
            post_epochs,
            seeds,
            baseline_seeds,
            models,
            scenarios,
            activations,
            init,
            shuffle,
            resume,
            report_only,
            data,
        } => {
            if seeds == 0 || baseline_seeds == Some(0) {
                bail!("invalid --seeds 0 or --baseline-seeds 0: run at least one seed");
            }
            if epochs == Some(0) || post_epochs == Some(0) {
                bail!("invalid --epochs 0 or --post-epochs 0: each must be at least 1");
            }
            let activations = activations
                .iter()
                .map(|a| a.parse::<Activation>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            if quick && models.contains(&Arch::Cnn) {
                tracing::warn!("--quick runs the MLP only; the CNN is left out");
            }
            let models = if quick { vec![Arch::Mlp] } else { models };
            let config = ReproduceConfig {
                out: out.clone(),
                models,
                activations,
                scenarios: Scenario::parse_list(&scenarios)?,
                budget: epochs.unwrap_or(if quick { 5 } else { 50 }),
                post_epochs: post_epochs.unwrap_or(if quick { 2 } else { 5 }),
                seeds,
                baseline_seeds,
                init,
                shuffle,
                transform: TransformOptions::default(),
                resume,
                report_only,
            };
            let started = std::fs::read_dir(out.join("cells")).is_ok_and(|mut d| d.next().is_some());
            if !resume && !report_only && (started || out.join("results.json").exists()) {
                bail!(
                    "{} already contains results; pass --resume to continue that run, or choose another --out",
                    out.display()
                );
            }
            let dataset = data.load()?;
            isonn::fsio::create_dir_all(&out)?;
            let record = provenance::record(
                &command_line(),
                None,
                Some(&DataRecord::of(&dataset)),
                serde_json::json!({ "seeds": (0..seeds).collect::<Vec<u64>>(), "baseline_seeds": baseline_seeds }),
            );
            isonn::fsio::write_json_atomic(&out.join("provenance.json"), &record)?;
            let results = experiment::reproduce(&config, &dataset, progress)?;
            print!("{}", experiment::markdown(&results));
            println!("\nresults written to {}", out.display());
            let failed = results.cells.iter().any(|c| {
                c.result.equivalence.as_ref().is_some_and(|e| !e.passes(TOLERANCE_F32))
                    || c.result.negative_after_steps > 0
            });
            if failed {
                eprintln!(
                    "error: a network failed verification or went negative; see {}",
                    out.join("results.json").display()
                );
                return Ok(std::process::ExitCode::from(1));
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Exit code 0 when the report passes the tolerance of the stored
/// parameters' type, 1 otherwise.
///
/// A model stored in f32 contains its biases `c + s` rounded to f32, so even
/// an f64 comparison cannot beat f32 rounding. f64 models must agree to 1e-9.
fn verdict(report: &verify::EquivalenceReport, stored: candle_core::DType) -> std::process::ExitCode {
    let tolerance = match stored {
        candle_core::DType::F64 => TOLERANCE_F64,
        _ => TOLERANCE_F32,
    };
    let failures = report.failures(tolerance);
    if failures.is_empty() {
        println!("verification passed (relative tolerance {tolerance:e})");
        std::process::ExitCode::SUCCESS
    } else {
        println!("verification FAILED: {}", failures.join("; "));
        std::process::ExitCode::from(1)
    }
}

/// Prints the per-layer table of an equivalence report, after a blank line.
fn print_layer_table(report: &verify::EquivalenceReport) {
    if let Some(table) = report.layer_table() {
        println!("\n{table}");
    }
}

/// Runs `isonn inspect`: prints the structure and signal tables of the
/// model in `dir` and writes the JSON report when `json` is given.
fn run_inspect(
    dir: &Path,
    dataset: Option<String>,
    data: Option<PathBuf>,
    samples: Option<usize>,
    json: Option<&Path>,
    progress: &Progress,
) -> Result<()> {
    if dataset.is_none() && (data.is_some() || samples.is_some()) {
        bail!("--data and --samples need --dataset: name the data set to observe, e.g. --dataset fashion-mnist");
    }
    if samples == Some(0) {
        bail!("invalid --samples 0: observe at least one test image, or leave out --dataset for the figures without data");
    }

    let (model, model_provenance) = load_model(dir)?;
    let images = match dataset {
        Some(name) => {
            let dataset = DataArgs { dataset: name, data }.load()?;
            warn_data_mismatch(dir, &model_provenance, &DataRecord::of(&dataset));
            let images = match samples {
                Some(n) => dataset.test.take(n),
                None => dataset.test.clone(),
            };
            verify::check_images(model.input_shape(), &images)?;
            Some((dataset.name.to_string(), images))
        }
        None => None,
    };

    let reports = isonn::inspect::inspect_model(
        &model,
        &model_provenance,
        images.as_ref().map(|(_, i)| i),
        1000,
        progress,
    )?;
    let first = &reports[0].network;
    match &images {
        Some((name, i)) => println!("{} model {}, {} {name} test images\n", model.kind(), dir.display(), i.len()),
        None => println!("{} model {}, no data (pass --dataset to observe the signals)\n", model.kind(), dir.display()),
    }
    println!("{}", isonn::inspect::format_structure(first));
    let columns: Vec<(&str, &isonn::inspect::NetworkReport)> = reports
        .iter()
        .map(|r| (isonn::inspect::policy_name(r.policy), &r.network))
        .collect();
    print!("{}", isonn::inspect::format_signals(&columns));

    if let Some(path) = json {
        let report = isonn::inspect::InspectReport {
            model: dir.display().to_string(),
            kind: model.kind().into(),
            dataset: images.map(|(name, _)| name),
            policies: reports,
        };
        isonn::fsio::write_json_atomic(path, &report)?;
        println!("\nreport written to {}", path.display());
    }
    Ok(())
}

/// Runs `isonn bench`: prints one table row per model and workload, then the
/// GEMM throughput, and writes the JSON report when `json` is given.
fn run_bench(
    models: &[Arch],
    workloads: &[isonn::bench::Workload],
    batches: usize,
    batch_size: usize,
    repetitions: usize,
    json: Option<&Path>,
) -> Result<()> {
    use isonn::bench::{self, MeasurementSummary};
    // A closed stdout (`| head`) must not stop the run before the JSON
    // report is written, so the tables are printed without `println!`,
    // which panics on a write error.
    macro_rules! say {
        ($($arg:tt)*) => {{
            let _ = writeln!(std::io::stdout(), $($arg)*);
        }};
    }
    let environment = bench::Environment::current();
    say!(
        "isonn {}, {} thread(s), CPU {}, load average {}",
        environment.isonn,
        environment.threads,
        environment.cpu.as_deref().unwrap_or("unknown"),
        environment.load_average.map(|l| format!("{l:.2}")).unwrap_or_else(|| "unknown".into())
    );
    say!(
        "| model | workload | batches x size | min s | median s | max s | images/s | s per 60k epoch | median CPU s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut measurements = Vec::new();
    for &arch in models {
        let count = match arch {
            Arch::Mlp | Arch::Elman => batches,
            Arch::Cnn | Arch::Resnet | Arch::CifarCnn => (batches / 10).max(2),
        };
        for &workload in workloads {
            let m = MeasurementSummary::from(bench::measure(arch, workload, count, batch_size, repetitions)?);
            say!(
                "| {arch} | {} | {count} x {batch_size} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2} | {} |",
                workload.name(),
                m.min_seconds,
                m.median_seconds,
                m.max_seconds,
                m.images_per_second,
                m.seconds_per_epoch,
                m.median_cpu_seconds.map_or_else(|| "-".to_string(), |s| format!("{s:.3}"))
            );
            measurements.push(m);
        }
    }
    say!("\n| GEMM (f32) | m x k x n | median GFLOP/s |\n| --- | --- | --- |");
    let mut gemm = Vec::new();
    for (label, m, k, n) in bench::gemm_shapes(batch_size) {
        let g = bench::measure_gemm(label, m, k, n, repetitions);
        say!("| {label} | {m} x {k} x {n} | {:.1} |", g.gflops);
        gemm.push(g);
    }
    if let Some(path) = json {
        let report = bench::Report {
            environment,
            measurements,
            gemm,
        };
        isonn::fsio::write_json_atomic(path, &report)?;
        say!("report written to {}", path.display());
    }
    Ok(())
}

/// Imports the ONNX model or, when it starts as a safetensors file does,
/// the PyTorch state dict in `path`, with its `architecture`.
fn import_any(
    path: &Path,
    architecture: Option<&Path>,
    input_ranges: &[isonn::model::Range],
) -> Result<isonn::interop::Imported> {
    if path.is_dir() {
        bail!(
            "{} is a directory; pass the ONNX file or the PyTorch state dict (.safetensors) itself",
            path.display()
        );
    }
    let mut head = Vec::with_capacity(9);
    let file_len = std::fs::File::open(path)
        .and_then(|file| {
            let len = file.metadata()?.len();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, 9), &mut head)?;
            Ok(len)
        })
        .with_context(|| format!("cannot read {}", path.display()))?;
    let is_state_dict = isonn::interop::state_dict::is_safetensors(&head, file_len)
        || path.extension().is_some_and(|e| e == "safetensors");
    match (is_state_dict, architecture) {
        (true, Some(architecture)) => {
            let network = isonn::interop::state_dict::import_state_dict(path, architecture, input_ranges)?;
            Ok(isonn::interop::Imported { network, output_function: None })
        }
        (true, None) => bail!(
            "{} is a safetensors state dict, which contains no architecture; pass it with --model \
             FILE.json, an isonn model.json describing the layers (docs/INTEROP.md)",
            path.display()
        ),
        (false, Some(_)) => bail!(
            "--model describes the architecture of a safetensors state dict, but {} is not \
             one; an ONNX file carries its own architecture, so leave --model out",
            path.display()
        ),
        (false, None) if input_ranges.is_empty() => {
            bail!("--input-range LO,HI is required for an ONNX model: give the range of every input value, e.g. 0,1")
        }
        (false, None) => {
            let onnx = isonn::interop::read_model(path)?;
            Ok(isonn::interop::import_model(&onnx, path, input_ranges)?)
        }
    }
}

/// Returns the number of classes `model` outputs.
fn classes_of(model: &Model) -> Result<usize> {
    let shape = match model {
        Model::Regular(network) => network.output_shape()?,
        Model::Nonneg(network) => isonn::nonneg::inverse(network)?.output_shape()?,
    };
    Ok(shape.iter().product())
}

/// Reads the test images of a command: --inputs, labelled by --labels or
/// by the predictions of `labeller`, or else the data set's test split.
/// Returns them with the record of the files read.
fn test_data(
    data: &DataArgs,
    npy: &NpyArgs,
    input_shape: &[usize],
    classes: usize,
    labeller: Option<&Network>,
) -> Result<(data::Images, DataRecord)> {
    if let Some(inputs) = npy.load(input_shape, classes, labeller)? {
        return Ok((inputs.images, inputs.record));
    }
    let dataset = data.load()?;
    let record = DataRecord::of(&dataset);
    Ok((dataset.test, record))
}

/// Reads the images on which to compare the regular `network` with a
/// non-negative one; without --labels the network's predictions label
/// the inputs.
fn regular_test_data(data: &DataArgs, npy: &NpyArgs, network: &Network) -> Result<(data::Images, DataRecord)> {
    let classes = network.output_shape()?.iter().product();
    test_data(data, npy, &network.input_shape, classes, Some(network))
}

/// Returns the network a bounded regular model implements, from the
/// `bound.json` in its directory, or `None` for a model as trained.
fn bound_reference(regular: &Path) -> Result<Option<String>> {
    let record = BoundRecord::load(regular)
        .with_context(|| format!("cannot read the bound record of model {}", regular.display()))?;
    Ok(record.map(|r| r.reference))
}

/// Builds the bound mode from the command line, checking its values.
fn bound_mode(args: &BoundArgs) -> Result<BoundMode> {
    let mode = match (args.relu_n, &args.calibrate) {
        (Some(_), None) if args.margin.is_some() || args.per.is_some() => {
            bail!("--margin and --per set a calibrated bound: pass them with --calibrate, not with --relu-n")
        }
        (Some(n), None) => BoundMode::Fixed { n },
        (None, Some(statistic)) => BoundMode::Calibrate {
            statistic: statistic.parse::<Statistic>()?,
            margin: args.margin.unwrap_or(0.0),
            granularity: args.per.unwrap_or(Granularity::Layer),
        },
        _ => bail!("pass exactly one of --relu-n N and --calibrate max|percentile:P"),
    };
    mode.validate()?;
    Ok(mode)
}

/// Runs `isonn bound`: writes the bounded model and its bound.json.
fn run_bound(args: BoundArgs, progress: &Progress) -> Result<()> {
    let mode = bound_mode(&args)?;
    if args.calibration_samples == 0 {
        bail!("invalid --calibration-samples 0: calibrate on at least one image");
    }
    let (loaded, source_provenance) = load_model(&args.model)?;
    let Model::Regular(network) = loaded else {
        bail!(
            "{} is a non-negative model; bound the regular ReLU model it came from, then transform the result",
            args.model.display()
        );
    };
    if bound::unbounded_sites(&network).is_empty() {
        bail!(
            "{} has no ReLU or GELU layer, so there is nothing to bound; transform it directly with `isonn transform`",
            args.model.display()
        );
    }
    if matches!(mode, BoundMode::Calibrate { granularity: Granularity::Channel, .. }) {
        bound::check_per_channel(&network)?;
    }
    check_output(&args.out, args.force)?;
    let classes = network.output_shape()?.iter().product();
    let (train, test, data_record) = match args.npy.load(&network.input_shape, classes, Some(&network))? {
        Some(inputs) => (inputs.images.clone(), inputs.images, inputs.record),
        None => {
            let dataset = args.data.load()?;
            let record = DataRecord::of(&dataset);
            (dataset.train, dataset.test, record)
        }
    };
    warn_data_mismatch(&args.model, &source_provenance, &data_record);
    if args.calibration_samples > train.len() {
        tracing::info!(
            "--calibration-samples {} is more than the {} calibration images; calibrating on all of them",
            args.calibration_samples,
            train.len()
        );
    }
    let calibration = train.take(args.calibration_samples);
    tracing::info!("bounding {}: {}", args.model.display(), mode.reference());
    let bounded = bound::bound_network(&network, &mode, &calibration, &test, progress)?;
    let record = &bounded.record;
    let provenance = provenance::record(
        &command_line(),
        None,
        Some(&data_record),
        serde_json::json!({
            "trained_on": source_provenance.get("trained_on"),
            "source_model": args.model,
            "source_seed": source_provenance.get("seed"),
            "bound": { "mode": mode, "reference": record.reference },
        }),
    );
    store::save(&args.out, &Model::Regular(bounded.network), &provenance)?;
    record.save(&args.out)?;
    println!("{}", record.reference);
    for layer in &record.layers {
        println!(
            "{:<22} {} bound(s) in [{:.4}, {:.4}]  clip rate calibration {:.6}  test {:.6}",
            layer.path,
            layer.bounds.len(),
            layer.bounds.iter().copied().fold(f64::INFINITY, f64::min),
            layer.bounds.iter().copied().fold(0.0, f64::max),
            layer.calibration.rate,
            layer.test.rate
        );
    }
    println!(
        "clip rate          calibration {:.6} ({} images), test {:.6} ({} images)",
        record.clip_rate_calibration, record.calibration_samples, record.clip_rate_test, record.test_samples
    );
    println!(
        "test accuracy      unbounded {:.4}, bounded {:.4} (change {:+.4})",
        record.accuracy_unbounded,
        record.accuracy_bounded,
        record.accuracy_bounded - record.accuracy_unbounded
    );
    println!("bounded model written to {}", args.out.display());
    Ok(())
}

/// Runs `isonn hardware`: the cost table, one evaluation or a sweep.
fn run_hardware(args: HardwareArgs, progress: &Progress) -> Result<()> {
    if args.cost {
        return print_cost(&args);
    }
    let effects = args.device.effects.to_effects()?;
    if args.seeds == 0 {
        bail!("invalid --seeds 0: evaluate with at least one noise seed");
    }
    let sweep: Option<Sweep> = args.sweep.as_deref().map(str::parse).transpose()?;
    let mut models = Vec::with_capacity(args.models.len());
    for dir in &args.models {
        let (loaded, _) = load_model(dir)?;
        let Model::Nonneg(network) = loaded else {
            bail!(
                "{} contains a regular model; transform it first with `isonn transform {} --out DIR`",
                dir.display(),
                dir.display()
            );
        };
        // The directory name labels the model's line and table column.
        let label = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        models.push((label, network));
    }
    let dataset = args.data.load()?;
    let images = match args.test_images {
        Some(n) => dataset.test.take(n),
        None => dataset.test.clone(),
    };
    let seeds: Vec<u64> = (0..args.seeds).collect();
    let Some(sweep) = sweep else {
        for (label, network) in &models {
            let a = hardware::evaluate(network, args.device.granularity(), &effects, &images, &seeds, progress)?;
            println!(
                "{label}: {} test images, accuracy {:.4} +- {:.4} (mean +- std over {} seed(s))",
                images.len(),
                a.mean,
                a.std,
                a.accuracies.len()
            );
            if a.accuracies.len() < seeds.len() {
                println!(
                    "{label}: the chosen effects draw no noise, so one evaluation stands for all {} seeds",
                    seeds.len()
                );
            }
        }
        return Ok(());
    };
    let out = args
        .out
        .clone()
        .context("--sweep writes a table and a plot: pass --out DIR")?;
    let report = hardware::run_sweep(&models, &effects, &sweep, args.device.granularity(), &images, &seeds, progress)?;
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("accuracy against {}", sweep.parameter.axis_label()));
    report.write(&out, &title)?;
    print!("{}", report.to_markdown());
    println!("\nsweep written to {}", out.display());
    Ok(())
}

/// Prints (and with --out writes) the cost-of-signs table of each model.
fn print_cost(args: &HardwareArgs) -> Result<()> {
    let energies = args.energy.as_deref().map(hardware::Energies::load).transpose()?;
    let mut markdown = String::new();
    let mut tables = Vec::new();
    for dir in &args.models {
        let (loaded, _) = load_model(dir)?;
        let network = match loaded {
            Model::Regular(n) => n,
            Model::Nonneg(n) => isonn::nonneg::inverse(&n)?,
        };
        let table = hardware::cost_table(&network, energies.as_ref())?;
        markdown.push_str(&format!("### {}\n\n{}\n", dir.display(), table.to_markdown()));
        tables.push(serde_json::json!({ "model": dir.display().to_string(), "table": table }));
    }
    print!("{markdown}");
    if let Some(out) = &args.out {
        isonn::fsio::create_dir_all(out)?;
        isonn::fsio::write_atomic(&out.join("cost.md"), markdown.as_bytes())?;
        isonn::fsio::write_json_atomic(&out.join("cost.json"), &tables)?;
        println!("cost table written to {}", out.display());
    }
    Ok(())
}
