//! `isonn bench`: throughput of training and inference for the protocol's
//! networks, regular and non-negative, on synthetic batches, and of the
//! GEMM kernel that the fast CPU ops call.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::error::Result;
use crate::model::{Arch, Init, Network};
use crate::nonneg::{transform, TransformOptions};
use crate::optim::{Momentum, Optimizer, Sgd, SignPreserving};

/// Operation that one benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Forward, backward and SGD step of the regular network.
    RegularTrain,
    /// Forward (training form), backward and sign-preserving step of the
    /// non-negative network: what `train-nonneg` runs.
    NonnegTrain,
    /// The same with the physical forward pass `P u + N (alpha - u)`:
    /// what noise-aware training runs, without its effects.
    NonnegTrainPhysical,
    /// Forward pass of the regular network.
    RegularForward,
    /// Physical forward pass of the non-negative network.
    NonnegForward,
}

impl Workload {
    /// Every workload, in the order `isonn bench` runs them.
    pub const ALL: [Workload; 5] = [
        Workload::RegularTrain,
        Workload::NonnegTrain,
        Workload::NonnegTrainPhysical,
        Workload::RegularForward,
        Workload::NonnegForward,
    ];

    /// Returns the name used on the command line and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::RegularTrain => "regular-train",
            Workload::NonnegTrain => "nonneg-train",
            Workload::NonnegTrainPhysical => "nonneg-train-physical",
            Workload::RegularForward => "regular-forward",
            Workload::NonnegForward => "nonneg-forward",
        }
    }
}

/// Timings of one workload over several repetitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Architecture.
    pub arch: Arch,
    /// Workload.
    pub workload: Workload,
    /// Batches per repetition.
    pub batches: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seconds of each repetition.
    pub seconds: Vec<f64>,
    /// CPU seconds (user and system, every thread of the process) of each
    /// repetition. On a loaded machine they vary less than the wall-clock
    /// seconds, which include the time spent waiting for a core.
    #[serde(default)]
    pub cpu_seconds: Vec<f64>,
}

impl Measurement {
    /// Returns (min, median, max) seconds per repetition.
    pub fn spread(&self) -> (f64, f64, f64) {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        (s[0], median(&s), s[s.len() - 1])
    }

    /// Returns the median CPU seconds per repetition, `None` when they were
    /// not measured.
    pub fn median_cpu_seconds(&self) -> Option<f64> {
        if self.cpu_seconds.is_empty() {
            return None;
        }
        Some(median(&self.cpu_seconds))
    }

    /// Returns the median images per second.
    pub fn images_per_second(&self) -> f64 {
        (self.batches * self.batch_size) as f64 / self.spread().1
    }

    /// Returns the median seconds for one epoch of `samples` images.
    pub fn seconds_per_epoch(&self, samples: usize) -> f64 {
        samples as f64 / self.images_per_second()
    }
}

/// Returns the median of `values`, which must not be empty.
fn median(values: &[f64]) -> f64 {
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Returns the CPU seconds (user and system) that this process has used,
/// or 0 where the operating system does not report it.
fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes only into the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return seconds(usage.ru_utime) + seconds(usage.ru_stime);
        }
    }
    0.0
}

/// Times `workload` on `arch` with the photonic sigmoid: three warm-up batches,
/// then `repetitions` runs of `batches` batches of random images in [0, 1],
/// 3x32x32 for the CIFAR-10 CNN and 1x28x28 otherwise.
pub fn measure(
    arch: Arch,
    workload: Workload,
    batches: usize,
    batch_size: usize,
    repetitions: usize,
) -> Result<Measurement> {
    let shape = match arch {
        Arch::CifarCnn => [3usize, 32, 32],
        _ => [1, 28, 28],
    };
    let mut network = Network::build(
        arch,
        &shape,
        &[100, 200],
        10,
        Activation::PhotonicSigmoid,
        Init::Xavier,
        0,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let values = batch_size * shape.iter().product::<usize>();
    let pixels: Vec<f32> = (0..values).map(|_| rng.gen::<f32>()).collect();
    let x = Tensor::from_vec(
        pixels,
        (batch_size, shape[0], shape[1], shape[2]),
        &Device::Cpu,
    )?;
    let labels: Vec<u32> = (0..batch_size).map(|_| rng.gen_range(0..10)).collect();
    let y = Tensor::from_vec(labels, batch_size, &Device::Cpu)?;
    let mut nonneg = transform(&network, &TransformOptions::default())?;

    let mut run_once: Box<dyn FnMut() -> Result<()> + Send> = match workload {
        Workload::RegularTrain => {
            let vars = network.make_trainable()?;
            let mut sgd = Sgd::new(0.01, 0.0, 0.0)?;
            Box::new(move || {
                let loss = candle_nn::loss::cross_entropy(&network.forward(&x)?, &y)?;
                sgd.step(&vars, &loss.backward()?)
            })
        }
        Workload::NonnegTrain | Workload::NonnegTrainPhysical => {
            let vars = nonneg.make_trainable()?;
            let mut rule = SignPreserving::new(0.28, 0.3, Momentum::None)?;
            let physical = workload == Workload::NonnegTrainPhysical;
            Box::new(move || {
                let logits = if physical {
                    nonneg.forward(&x)?
                } else {
                    nonneg.forward_training(&x)?
                };
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                rule.step(&vars, &loss.backward()?)
            })
        }
        Workload::RegularForward => Box::new(move || {
            network
                .forward(&x)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(())
        }),
        Workload::NonnegForward => Box::new(move || {
            nonneg
                .forward(&x)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(())
        }),
    };
    for _ in 0..batches.min(3) {
        run_once()?;
    }
    let mut seconds = Vec::with_capacity(repetitions);
    let mut cpu_seconds = Vec::with_capacity(repetitions);
    for _ in 0..repetitions.max(1) {
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        crate::ops::on_compute_threads(|| {
            for _ in 0..batches {
                run_once()?;
            }
            Ok::<_, crate::Error>(())
        })?;
        seconds.push(start.elapsed().as_secs_f64());
        cpu_seconds.push(process_cpu_seconds() - cpu_start);
    }
    Ok(Measurement {
        arch,
        workload,
        batches,
        batch_size,
        seconds,
        cpu_seconds,
    })
}

/// Throughput of one GEMM shape through the fast ops' GEMM call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GemmMeasurement {
    /// Name of the shape, e.g. the layer it comes from.
    pub label: String,
    /// `[m, k] x [k, n]`.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
    /// Median GFLOP/s (2 m n k floating-point operations per product).
    pub gflops: f64,
}

/// Measures the f32 GEMM throughput of [`crate::ops::linear`]'s kernel on
/// `[m, k] x [k, n]`, median over `repetitions` timed runs of enough
/// products to take about 50 ms each.
pub fn measure_gemm(
    label: &str,
    m: usize,
    k: usize,
    n: usize,
    repetitions: usize,
) -> GemmMeasurement {
    use crate::ops::linear::{gemm_into, Operand};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let lhs: Vec<f32> = (0..m * k).map(|_| rng.gen::<f32>()).collect();
    let rhs: Vec<f32> = (0..k * n).map(|_| rng.gen::<f32>()).collect();
    let mut dst = vec![0f32; m * n];
    let mut product = || {
        let lhs = Operand {
            values: &lhs,
            rows: m,
            cols: k,
            transposed: false,
        };
        let rhs = Operand {
            values: &rhs,
            rows: k,
            cols: n,
            transposed: false,
        };
        gemm_into(&mut dst, lhs, rhs, false);
    };
    let flop = 2.0 * (m * n * k) as f64;
    let start = Instant::now();
    product();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let count = ((0.05 / once) as usize).clamp(1, 100_000);
    let mut rates = Vec::with_capacity(repetitions);
    for _ in 0..repetitions.max(1) {
        let start = Instant::now();
        for _ in 0..count {
            product();
        }
        rates.push(flop * count as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    GemmMeasurement {
        label: label.to_string(),
        m,
        k,
        n,
        gflops: rates[rates.len() / 2],
    }
}

/// Returns the GEMM shapes of the MLP 784-100-200-10 at `batch_size`
/// (forward, input gradient and weight gradient of its first layer) and a
/// square 1024 product as the best case.
pub fn gemm_shapes(batch_size: usize) -> Vec<(&'static str, usize, usize, usize)> {
    vec![
        ("mlp layer 1 forward x W^T", batch_size, 784, 100),
        ("mlp layer 2 forward x W^T", batch_size, 100, 200),
        ("mlp layer 1 weight gradient g^T x", 100, batch_size, 784),
        ("square 1024 (best case)", 1024, 1024, 1024),
    ]
}

/// The machine and software that a benchmark ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    /// isonn's version.
    pub isonn: String,
    /// CPU model from /proc/cpuinfo, when readable.
    pub cpu: Option<String>,
    /// Rayon threads that the ops use (`RAYON_NUM_THREADS`).
    pub threads: usize,
    /// The 1-minute load average from /proc/loadavg at the start, when readable.
    pub load_average: Option<f64>,
}

impl Environment {
    /// Reads the environment of this process.
    pub fn current() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            });
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| text.split_whitespace().next().and_then(|v| v.parse().ok()));
        Environment {
            isonn: env!("CARGO_PKG_VERSION").to_string(),
            cpu,
            threads: rayon::current_num_threads(),
            load_average,
        }
    }
}

/// Everything one `isonn bench` run measured, as written with `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Machine, thread count and load of the run.
    pub environment: Environment,
    /// One entry per architecture and workload.
    pub measurements: Vec<MeasurementSummary>,
    /// GEMM throughput per shape.
    pub gemm: Vec<GemmMeasurement>,
}

/// A [`Measurement`] with its derived figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasurementSummary {
    /// The raw timings.
    #[serde(flatten)]
    pub measurement: Measurement,
    /// Minimum seconds per repetition.
    pub min_seconds: f64,
    /// Median seconds per repetition.
    pub median_seconds: f64,
    /// Maximum seconds per repetition.
    pub max_seconds: f64,
    /// Median images per second.
    pub images_per_second: f64,
    /// Median seconds for 60,000 images.
    pub seconds_per_epoch: f64,
    /// Median CPU seconds per repetition, all threads together.
    pub median_cpu_seconds: Option<f64>,
}

impl From<Measurement> for MeasurementSummary {
    fn from(measurement: Measurement) -> Self {
        let (min_seconds, median_seconds, max_seconds) = measurement.spread();
        MeasurementSummary {
            images_per_second: measurement.images_per_second(),
            median_cpu_seconds: measurement.median_cpu_seconds(),
            seconds_per_epoch: measurement.seconds_per_epoch(EPOCH_SAMPLES),
            measurement,
            min_seconds,
            median_seconds,
            max_seconds,
        }
    }
}

/// Images in one epoch of Fashion-MNIST's training set.
pub const EPOCH_SAMPLES: usize = 60_000;
