//! Image classification data sets: Fashion-MNIST, its embedded subset and
//! MNIST, read from IDX files.
//!
//! [`load`] finds the files of a data set (see its documentation for the
//! search order), [`load_dir`] reads them from a given directory and
//! [`load_embedded`] decodes the Fashion-MNIST subset compiled into the
//! binary.

pub mod idx;
mod load;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

pub use load::{load, load_dir, load_embedded, EMBEDDED_TEST, EMBEDDED_TRAIN, MAX_FILE_BYTES};

/// Environment variable naming a directory with the IDX files, used when no
/// `--data DIR` is given.
pub const ENV_VAR: &str = "ISONN_DATA";

/// Directory where the Debian package `dataset-fashion-mnist` installs the
/// full Fashion-MNIST.
pub const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Number of classes in MNIST and Fashion-MNIST.
pub const CLASSES: usize = 10;

/// Grayscale images with their class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `n * rows * cols` pixels in `[0, 1]`, image after image, each in
    /// row-major order.
    pub pixels: Vec<f32>,
    /// `n` class labels, one per image.
    pub labels: Vec<u8>,
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

    /// Returns the shape of one sample as `[channels, rows, cols]`, with one
    /// channel.
    pub fn sample_shape(&self) -> [usize; 3] {
        [1, self.rows, self.cols]
    }

    /// Copies the first `n` images, or all of them when there are fewer.
    pub fn take(&self, n: usize) -> Images {
        let n = n.min(self.n);
        let pixels_per_image = self.rows * self.cols;
        Images {
            n,
            rows: self.rows,
            cols: self.cols,
            pixels: self.pixels[..n * pixels_per_image].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// Gathers the images at `indices` into a batch on `device`.
    ///
    /// Returns `x` of shape `[B, 1, rows, cols]` and dtype f32, and `y` of
    /// shape `[B]` and dtype u32, where `B = indices.len()`. An index of
    /// `len()` or more is an error.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let pixels_per_image = self.rows * self.cols;
        let mut x = Vec::with_capacity(indices.len() * pixels_per_image);
        let mut y = Vec::with_capacity(indices.len());
        for (position, &index) in indices.iter().enumerate() {
            if index >= self.n {
                return Err(Error::Shape(format!(
                    "batch index {index} at position {position} is out of range for {} \
                     images",
                    self.n
                )));
            }
            let start = index * pixels_per_image;
            x.extend_from_slice(&self.pixels[start..start + pixels_per_image]);
            y.push(u32::from(self.labels[index]));
        }
        let batch = indices.len();
        let x = Tensor::from_vec(x, (batch, 1, self.rows, self.cols), device)?;
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
}

impl DatasetName {
    /// All data sets, in the order error messages list them.
    pub const ALL: [DatasetName; 3] = [
        DatasetName::FashionMnist,
        DatasetName::FashionMnistSubset,
        DatasetName::Mnist,
    ];

    /// Returns the name as the command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::FashionMnistSubset => "fashion-mnist-subset",
            DatasetName::Mnist => "mnist",
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = Error;

    /// Parses `fashion-mnist`, `fashion-mnist-subset` or `mnist`.
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
    /// The files read, with their checksums, in the order train images,
    /// train labels, test images, test labels.
    pub files: Vec<FileDigest>,
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
