//! `isonn bench`: throughput of training and inference for the protocol's
//! networks, regular and non-negative, on synthetic batches.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Forward, backward and SGD step of the regular network.
    RegularTrain,
    /// Forward, backward and sign-preserving step of the non-negative network.
    NonnegTrain,
    /// Forward pass of the regular network.
    RegularForward,
    /// Physical forward pass of the non-negative network.
    NonnegForward,
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
}

impl Measurement {
    /// Returns (min, median, max) seconds per repetition.
    pub fn spread(&self) -> (f64, f64, f64) {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        (s[0], median, s[n - 1])
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

/// Times `workload` on `arch` with the photonic sigmoid: three warm-up batches,
/// then `repetitions` runs of `batches` batches of random images in [0, 1].
pub fn measure(
    arch: Arch,
    workload: Workload,
    batches: usize,
    batch_size: usize,
    repetitions: usize,
) -> Result<Measurement> {
    let shape = [1usize, 28, 28];
    let mut network = Network::build(arch, &shape, &[100, 200], 10, Activation::PhotonicSigmoid, Init::Xavier, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let pixels: Vec<f32> = (0..batch_size * 784).map(|_| rng.gen::<f32>()).collect();
    let x = Tensor::from_vec(pixels, (batch_size, 1, 28, 28), &Device::Cpu)?;
    let labels: Vec<u32> = (0..batch_size).map(|_| rng.gen_range(0..10)).collect();
    let y = Tensor::from_vec(labels, batch_size, &Device::Cpu)?;
    let mut nonneg = transform(&network, &TransformOptions::default())?;

    let mut run_once: Box<dyn FnMut() -> Result<()>> = match workload {
        Workload::RegularTrain => {
            let vars = network.make_trainable()?;
            let mut sgd = Sgd::new(0.01, 0.0, 0.0)?;
            Box::new(move || {
                let loss = candle_nn::loss::cross_entropy(&network.forward(&x)?, &y)?;
                sgd.step(&vars, &loss.backward()?)
            })
        }
        Workload::NonnegTrain => {
            let vars = nonneg.make_trainable()?;
            let mut rule = SignPreserving::new(0.28, 0.3, Momentum::None)?;
            Box::new(move || {
                let loss = candle_nn::loss::cross_entropy(&nonneg.forward(&x)?, &y)?;
                rule.step(&vars, &loss.backward()?)
            })
        }
        Workload::RegularForward => Box::new(move || {
            network.forward(&x)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        }),
        Workload::NonnegForward => Box::new(move || {
            nonneg.forward(&x)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        }),
    };
    for _ in 0..batches.min(3) {
        run_once()?;
    }
    let mut seconds = Vec::with_capacity(repetitions);
    for _ in 0..repetitions.max(1) {
        let start = Instant::now();
        for _ in 0..batches {
            run_once()?;
        }
        seconds.push(start.elapsed().as_secs_f64());
    }
    Ok(Measurement {
        arch,
        workload,
        batches,
        batch_size,
        seconds,
    })
}
