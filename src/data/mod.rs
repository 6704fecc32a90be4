//! Image classification data sets: Fashion-MNIST, its embedded subset and
//! MNIST, read from IDX files, and CIFAR-10, read from its binary version.
//!
//! [`load`] finds the files of a data set (see its documentation for the
//! search order), [`load_dir`] reads them from a given directory and
//! [`load_embedded`] decodes the Fashion-MNIST subset compiled into the
//! binary. [`augment`] contains the random crops and flips of training.

pub mod augment;
pub mod cifar;
pub mod idx;
mod load;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::Range;

pub use augment::Augmentation;
pub use load::{load, load_dir, load_embedded, EMBEDDED_TEST, EMBEDDED_TRAIN, MAX_FILE_BYTES};

/// Environment variable naming a directory with the data set's files, used
/// when no `--data DIR` is given.
pub const ENV_VAR: &str = "ISONN_DATA";

/// Directory where the Debian package `dataset-fashion-mnist` installs the
/// full Fashion-MNIST.
pub const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Number of classes in MNIST, Fashion-MNIST and CIFAR-10.
pub const CLASSES: usize = 10;

/// Per-channel normalisation `x' = (x - mean[c]) / std[c]` of pixels `x`
/// scaled to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalisation {
    /// Mean of each channel, subtracted first.
    pub mean: Vec<f64>,
    /// Standard deviation of each channel, > 0, divided by second.
    pub std: Vec<f64>,
}

impl Normalisation {
    /// Returns the normalised value of `x` in channel `channel`.
    pub fn apply(&self, channel: usize, x: f64) -> f64 {
        (x - self.mean[channel]) / self.std[channel]
    }
}

/// Images with their class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Number of images.
    pub n: usize,
    /// Channels per image: 1 for grayscale, 3 for red, green and blue.
    pub channels: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `n * channels * rows * cols` values, image after image, each image
    /// channel after channel (`[c, h, w]`), each channel in row-major order.
    /// They are pixels scaled to `[0, 1]`, normalised per channel when
    /// `normalisation` is set.
    pub pixels: Vec<f32>,
    /// `n` class labels, one per image.
    pub labels: Vec<u8>,
    /// The normalisation already applied to `pixels`, `None` for pixels
    /// left in `[0, 1]`.
    pub normalisation: Option<Normalisation>,
}

impl Images {
    /// Returns the number of images.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Returns `true` when there are no images.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Returns the shape of one sample as `[channels, rows, cols]`.
    pub fn sample_shape(&self) -> [usize; 3] {
        [self.channels, self.rows, self.cols]
    }

    /// Returns the number of values of one image, `channels * rows * cols`.
    pub fn values_per_image(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// Returns the range of the values of each channel: `[0, 1]` for
    /// pixels left unnormalised, else `[(0 - mean) / std, (1 - mean) / std]`
    /// with both bounds rounded to f32, the type of `pixels`.
    ///
    /// Each range holds every value that a pixel of that channel can take,
    /// not only the values these images contain. The lower bound is the
    /// value of a black pixel, and so of the padding of a random crop.
    pub fn channel_ranges(&self) -> Vec<Range> {
        (0..self.channels)
            .map(|channel| match &self.normalisation {
                None => Range { lo: 0.0, hi: 1.0 },
                // Rounded to f32 as the pixels are, so a black pixel equals
                // its channel's lower bound exactly, also when a check
                // promotes both to f64.
                Some(n) => Range {
                    lo: n.apply(channel, 0.0) as f32 as f64,
                    hi: n.apply(channel, 1.0) as f32 as f64,
                },
            })
            .collect()
    }

    /// Copies the first `n` images, or all of them when there are fewer.
    pub fn take(&self, n: usize) -> Images {
        let n = n.min(self.n);
        Images {
            n,
            channels: self.channels,
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..n * self.values_per_image()].to_vec(),
            labels: self.labels[..n].to_vec(),
            normalisation: self.normalisation.clone(),
        }
    }

    /// Gathers the images at `indices` into a batch on `device`.
    ///
    /// Returns `x` of shape `[B, channels, rows, cols]` and dtype f32, and
    /// `y` of shape `[B]` and dtype u32, where `B = indices.len()`. An index
    /// of `len()` or more is an error.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        self.gather(indices, device, |_, image, x| x.extend_from_slice(image))
    }

    /// Gathers the images at `indices` like [`Images::batch`], each moved
    /// and mirrored by the augmentation at the same position.
    ///
    /// `augmentations` must have one entry per index. The pixels that a
    /// shift moves in from outside the image are black, so each takes the
    /// lower bound of its channel's range (see [`Images::channel_ranges`]).
    pub fn augmented_batch(
        &self,
        indices: &[usize],
        augmentations: &[Augmentation],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if augmentations.len() != indices.len() {
            return Err(Error::Shape(format!(
                "{} augmentations for a batch of {} images; pass one per image",
                augmentations.len(),
                indices.len()
            )));
        }
        let fill: Vec<f32> = self.channel_ranges().iter().map(|r| r.lo as f32).collect();
        let [channels, rows, cols] = self.sample_shape();
        self.gather(indices, device, |position, image, x| {
            augmentations[position].apply(image, [channels, rows, cols], &fill, x)
        })
    }

    /// Checks `indices`, appends each image with `append(position, image,
    /// buffer)` and builds the tensors of the batch.
    fn gather(
        &self,
        indices: &[usize],
        device: &Device,
        mut append: impl FnMut(usize, &[f32], &mut Vec<f32>),
    ) -> Result<(Tensor, Tensor)> {
        let values_per_image = self.values_per_image();
        let mut x = Vec::with_capacity(indices.len() * values_per_image);
        let mut y = Vec::with_capacity(indices.len());
        for (position, &index) in indices.iter().enumerate() {
            if index >= self.n {
                return Err(Error::Shape(format!(
                    "batch index {index} at position {position} is out of range for {} \
                     images",
                    self.n
                )));
            }
            let start = index * values_per_image;
            append(position, &self.pixels[start..start + values_per_image], &mut x);
            y.push(u32::from(self.labels[index]));
        }
        let batch = indices.len();
        let x = Tensor::from_vec(x, (batch, self.channels, self.rows, self.cols), device)?;
        let y = Tensor::from_vec(y, batch, device)?;
        Ok((x, y))
    }
}

/// A data set the library can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// Fashion-MNIST by Zalando Research: 60,000 training and 10,000 test
    /// images of clothing, 28x28 grayscale, 10 classes.
    FashionMnist,
    /// The first 10,000 training and 2,000 test images of Fashion-MNIST,
    /// embedded in the binary.
    FashionMnistSubset,
    /// MNIST handwritten digits, 28x28 grayscale, 10 classes. Only read from
    /// a directory given by `--data DIR` or `ISONN_DATA`.
    Mnist,
    /// CIFAR-10 by Krizhevsky, Nair and Hinton: 50,000 training and 10,000
    /// test colour images of 32x32 pixels, 10 classes, normalised per
    /// channel with [`cifar::MEAN`] and [`cifar::STD`]. Only read from a
    /// directory given by `--data DIR` or `ISONN_DATA`.
    Cifar10,
    /// CIFAR-10 turned to grayscale by [`cifar::luma`], 1x32x32, with
    /// values left in `[0, 1]`.
    Cifar10Gray,
}

impl DatasetName {
    /// All data sets, in the order error messages list them.
    pub const ALL: [DatasetName; 5] = [
        DatasetName::FashionMnist,
        DatasetName::FashionMnistSubset,
        DatasetName::Mnist,
        DatasetName::Cifar10,
        DatasetName::Cifar10Gray,
    ];

    /// Returns the name as the command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::FashionMnistSubset => "fashion-mnist-subset",
            DatasetName::Mnist => "mnist",
            DatasetName::Cifar10 => "cifar10",
            DatasetName::Cifar10Gray => "cifar10-gray",
        }
    }

    /// Returns `true` for the data sets read from the CIFAR-10 binary
    /// version.
    pub fn is_cifar(self) -> bool {
        matches!(self, DatasetName::Cifar10 | DatasetName::Cifar10Gray)
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = Error;

    /// Parses `fashion-mnist`, `fashion-mnist-subset`, `mnist`, `cifar10`
    /// or `cifar10-gray`.
    fn from_str(s: &str) -> Result<Self> {
        DatasetName::ALL
            .into_iter()
            .find(|name| name.as_str() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = DatasetName::ALL.iter().map(|n| n.as_str()).collect();
                Error::config(
                    "dataset",
                    s,
                    format!("unknown data set, valid names are {}", valid.join(", ")),
                )
            })
    }
}

/// Origin of the files of a loaded data set.
///
/// Serialises as `{"kind": "flag", "path": "..."}`, or `{"kind": "embedded"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "kebab-case")]
pub enum DataSource {
    /// The directory given by `--data DIR`.
    Flag(PathBuf),
    /// The directory named by the environment variable [`ENV_VAR`].
    Env(PathBuf),
    /// The system directory [`SYSTEM_DIR`] of the Debian package
    /// `dataset-fashion-mnist`.
    System(PathBuf),
    /// The Fashion-MNIST subset compiled into the binary.
    Embedded,
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Flag(dir) => write!(f, "{} (from --data)", dir.display()),
            DataSource::Env(dir) => write!(f, "{} (from {ENV_VAR})", dir.display()),
            DataSource::System(dir) => write!(
                f,
                "{} (system package dataset-fashion-mnist)",
                dir.display()
            ),
            DataSource::Embedded => f.write_str("embedded Fashion-MNIST subset"),
        }
    }
}

/// A loaded data set: training and test images with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Name of the data set.
    pub name: DatasetName,
    /// Training images.
    pub train: Images,
    /// Test images.
    pub test: Images,
    /// Origin of the files.
    pub source: DataSource,
    /// Number of classes. Every label is below it.
    pub classes: usize,
    /// The files read, with their checksums: for IDX data sets in the order
    /// train images, train labels, test images, test labels, and for
    /// CIFAR-10 `data_batch_1.bin` to `data_batch_5.bin`, then
    /// `test_batch.bin`.
    pub files: Vec<FileDigest>,
}

impl Dataset {
    /// Returns the range of the input values of each channel, as
    /// [`Images::channel_ranges`] defines it: `[0, 1]` for the MNIST data
    /// sets and `cifar10-gray`, `[(0 - mean) / std, (1 - mean) / std]` for
    /// each colour channel of `cifar10`.
    pub fn input_ranges(&self) -> Vec<Range> {
        self.train.channel_ranges()
    }

    /// Returns the smallest range that contains the range of every channel
    /// in [`Dataset::input_ranges`].
    pub fn enclosing_input_range(&self) -> Range {
        let ranges = self.input_ranges();
        let Some((first, rest)) = ranges.split_first() else {
            return Range { lo: 0.0, hi: 1.0 };
        };
        rest.iter().fold(*first, |all, range| all.including(range.lo).including(range.hi))
    }
}

/// A file read and the SHA-256 checksum of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// The path, or `embedded:NAME` for a file compiled into the binary.
    pub path: String,
    /// SHA-256 of the file's bytes as stored (gzipped or raw), in lowercase hex.
    pub sha256: String,
}

impl FileDigest {
    /// Computes the checksum of `bytes`, read from `path`.
    pub fn of(path: &str, bytes: &[u8]) -> Self {
        FileDigest {
            path: path.to_string(),
            sha256: sha256_hex(bytes),
        }
    }
}

/// Returns the SHA-256 checksum of `bytes` in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
