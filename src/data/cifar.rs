//! Reader for the binary version of CIFAR-10.
//!
//! Each file is a sequence of [`RECORD_BYTES`]-byte records: 1 label byte
//! (0 to 9), then 3072 pixel bytes, which are the 1024 red, the 1024 green
//! and the 1024 blue values of a 32x32 image, each plane in row-major
//! order. The training set is `data_batch_1.bin` to `data_batch_5.bin` and
//! the test set `test_batch.bin`, 10,000 records each in the published
//! data set. The reader accepts any positive number of records per file.

use std::path::{Path, PathBuf};

use super::{DataSource, Dataset, DatasetName, FileDigest, Images, Normalisation, CLASSES, MAX_FILE_BYTES};
use crate::error::{Error, Result};

/// Rows and columns of a CIFAR-10 image.
pub const SIDE: usize = 32;

/// Pixels of one colour plane, `SIDE * SIDE`.
pub const PLANE: usize = SIDE * SIDE;

/// Bytes of one record: the label byte and three colour planes.
pub const RECORD_BYTES: usize = 1 + 3 * PLANE;

/// The training files, in the order they are read.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";

/// The folder that the CIFAR-10 binary archive unpacks into. A data
/// directory may contain the files directly or inside this folder.
pub const SUBFOLDER: &str = "cifar-10-batches-bin";

/// The page to download the data set from.
pub const DOWNLOAD_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar.html";

/// Per-channel mean (red, green, blue) of the pixels scaled to `[0, 1]`,
/// as the method's reference code normalises them.
pub const MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];

/// Per-channel standard deviation (red, green, blue) that goes with
/// [`MEAN`], from the method's reference code.
pub const STD: [f64; 3] = [0.2023, 0.1994, 0.2010];

/// Weights of red, green and blue in the luma of ITU-R BT.601.
pub const LUMA_WEIGHTS: [f64; 3] = [0.299, 0.587, 0.114];

/// Returns the ITU-R BT.601 luma `0.299 r + 0.587 g + 0.114 b`.
///
/// torchvision's `Grayscale` weights red with 0.2989 instead in its tensor
/// kernel (`transforms.v2.functional.rgb_to_grayscale`), a difference of at
/// most 1e-4 on values in `[0, 1]`.
pub fn luma(r: f64, g: f64, b: f64) -> f64 {
    LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b
}

/// Returns the normalisation of the `cifar10` data set.
pub fn normalisation() -> Normalisation {
    Normalisation {
        mean: MEAN.to_vec(),
        std: STD.to_vec(),
    }
}

/// Loads `cifar10` or `cifar10-gray` from `dir` or its [`SUBFOLDER`].
///
/// `cifar10` keeps the three colour channels and normalises each with
/// [`MEAN`] and [`STD`]. `cifar10-gray` keeps one channel, the [`luma`] of
/// the pixels scaled to `[0, 1]`, and leaves it unnormalised. `source` is
/// recorded in the result and named in errors.
pub fn load_dir(dir: &Path, name: DatasetName, source: DataSource) -> Result<Dataset> {
    let gray = match name {
        DatasetName::Cifar10 => false,
        DatasetName::Cifar10Gray => true,
        other => {
            return Err(Error::config(
                "dataset",
                other,
                "is not read from the CIFAR-10 binary version; choose cifar10 or cifar10-gray",
            ))
        }
    };

    if !dir.is_dir() {
        return Err(Error::DataNotFound(format!(
            "data directory {source} does not exist or is not a directory; {}",
            expected_files()
        )));
    }

    let dir = data_folder(dir);
    let mut missing = Vec::new();
    for file in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        if !dir.join(file).is_file() {
            missing.push(*file);
        }
    }
    if !missing.is_empty() {
        return Err(Error::DataNotFound(format!(
            "data directory {source} is missing {}; {}",
            missing.join(", "),
            expected_files()
        )));
    }

    let train_paths: Vec<PathBuf> = TRAIN_FILES.iter().map(|file| dir.join(file)).collect();
    let test_path = dir.join(TEST_FILE);
    let mut files = Vec::with_capacity(TRAIN_FILES.len() + 1);
    let train = read_split(&train_paths, gray, &mut files)?;
    let test = read_split(std::slice::from_ref(&test_path), gray, &mut files)?;
    Ok(Dataset {
        name,
        train,
        test,
        source,
        classes: CLASSES,
        files,
    })
}

/// Returns `dir`, or its [`SUBFOLDER`] when `dir` contains none of the
/// files and the subfolder exists.
fn data_folder(dir: &Path) -> PathBuf {
    let has_files = TRAIN_FILES.iter().chain([&TEST_FILE]).any(|file| dir.join(file).is_file());
    let nested = dir.join(SUBFOLDER);
    if !has_files && nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Describes the files a CIFAR-10 directory must contain and where to get them.
fn expected_files() -> String {
    format!(
        "it must contain {} and {TEST_FILE}, directly or in a {SUBFOLDER} subfolder; download \
         the \"CIFAR-10 binary version (suitable for C programs)\" from {DOWNLOAD_URL}, unpack \
         it and pass its folder with --data DIR",
        TRAIN_FILES.join(", ")
    )
}

/// Reads the files of one split into one set of images, adding each file's
/// digest to `files`.
///
/// Every file is read and its size checked before the values are
/// allocated, so the buffer is sized once from sizes known to be valid.
fn read_split(paths: &[PathBuf], gray: bool, files: &mut Vec<FileDigest>) -> Result<Images> {
    let mut contents = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = crate::fsio::read_capped(path, MAX_FILE_BYTES, "CIFAR-10 batch file")?;
        check_size(bytes.len(), path)?;
        files.push(FileDigest::of(&path.display().to_string(), &bytes));
        contents.push(bytes);
    }
    let channels = if gray { 1 } else { 3 };
    let records: usize = contents.iter().map(|bytes| bytes.len() / RECORD_BYTES).sum();
    let mut pixels = Vec::with_capacity(records * channels * PLANE);
    let mut labels = Vec::with_capacity(records);
    for (bytes, path) in contents.iter().zip(paths) {
        decode(bytes, path, gray, &mut pixels, &mut labels)?;
    }
    Ok(Images {
        n: labels.len(),
        channels,
        rows: SIDE,
        cols: SIDE,
        pixels,
        labels,
        normalisation: (!gray).then(normalisation),
    })
}

/// Checks the records in `bytes`, read from `path`, and appends their
/// values and labels.
///
/// Colour images are appended as normalised red, green and blue planes,
/// grayscale ones as one plane of luma in `[0, 1]`.
fn decode(bytes: &[u8], path: &Path, gray: bool, pixels: &mut Vec<f32>, labels: &mut Vec<u8>) -> Result<()> {
    check_size(bytes.len(), path)?;
    let normalisation = normalisation();
    for (index, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if usize::from(label) >= CLASSES {
            return Err(Error::data(
                path,
                format!(
                    "record {index} (byte offset {}) has label {label}, but CIFAR-10 labels are 0 \
                     to {}; the file is damaged or not from the CIFAR-10 binary version (CIFAR-100 \
                     files have two label bytes per record), so download it again from \
                     {DOWNLOAD_URL}",
                    index * RECORD_BYTES,
                    CLASSES - 1
                ),
            ));
        }
        labels.push(label);
        let scaled = |byte: u8| f64::from(byte) / 255.0;
        let (red, rest) = record[1..].split_at(PLANE);
        let (green, blue) = rest.split_at(PLANE);
        if gray {
            let values = red.iter().zip(green).zip(blue);
            pixels.extend(values.map(|((&r, &g), &b)| luma(scaled(r), scaled(g), scaled(b)) as f32));
        } else {
            for (channel, plane) in [red, green, blue].into_iter().enumerate() {
                pixels.extend(plane.iter().map(|&byte| normalisation.apply(channel, scaled(byte)) as f32));
            }
        }
    }
    Ok(())
}

/// Rejects a file that is empty or not a whole number of records.
fn check_size(len: usize, path: &Path) -> Result<()> {
    if len == 0 {
        return Err(Error::data(
            path,
            format!(
                "is empty, but a CIFAR-10 batch file contains {RECORD_BYTES}-byte records; \
                 download it again from {DOWNLOAD_URL}"
            ),
        ));
    }
    if len % RECORD_BYTES != 0 {
        return Err(Error::data(
            path,
            format!(
                "is {len} bytes, not a whole number of {RECORD_BYTES}-byte records (1 label byte \
                 and {} pixel bytes each): {} whole records and {} bytes left over; the file is \
                 truncated or not from the CIFAR-10 binary version, so download it again from \
                 {DOWNLOAD_URL}",
                RECORD_BYTES - 1,
                len / RECORD_BYTES,
                len % RECORD_BYTES
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one record of label 3 whose byte at plane offset `i` is `i % 256`
    /// in red, `255 - i % 256` in green and 7 in blue.
    fn record() -> Vec<u8> {
        let mut bytes = vec![3u8];
        bytes.extend((0..PLANE).map(|i| (i % 256) as u8));
        bytes.extend((0..PLANE).map(|i| 255 - (i % 256) as u8));
        bytes.extend(std::iter::repeat_n(7u8, PLANE));
        bytes
    }

    #[test]
    fn decode_normalises_each_plane() {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        decode(&record(), Path::new("one.bin"), false, &mut pixels, &mut labels).unwrap();
        assert_eq!(labels, [3]);
        assert_eq!(pixels.len(), 3 * PLANE);
        let expected = |channel: usize, byte: f64| ((byte / 255.0 - MEAN[channel]) / STD[channel]) as f32;
        assert!((pixels[5] - expected(0, 5.0)).abs() < 1e-6);
        assert!((pixels[PLANE + 5] - expected(1, 250.0)).abs() < 1e-6);
        assert!((pixels[2 * PLANE + 5] - expected(2, 7.0)).abs() < 1e-6);
    }

    #[test]
    fn decode_gray_weights_channels() {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        decode(&record(), Path::new("one.bin"), true, &mut pixels, &mut labels).unwrap();
        assert_eq!(pixels.len(), PLANE);
        let expected = (0.299 * 10.0 + 0.587 * 245.0 + 0.114 * 7.0) / 255.0;
        assert!((f64::from(pixels[10]) - expected).abs() < 1e-6);
    }

    #[test]
    fn size_check_names_leftover() {
        let error = check_size(2 * RECORD_BYTES + 5, Path::new("x.bin")).unwrap_err().to_string();
        assert!(error.starts_with("x.bin: is 6151 bytes"), "{error}");
        assert!(error.contains("2 whole records and 5 bytes left over"), "{error}");
        assert!(check_size(RECORD_BYTES, Path::new("x.bin")).is_ok());
    }
}
