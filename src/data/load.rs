//! Finding a data set's files, and reading the four IDX files of the MNIST
//! data sets.

use std::path::{Path, PathBuf};

use super::idx::{self, IdxImages};
use super::{cifar, DataSource, Dataset, DatasetName, FileDigest, Images, CLASSES, ENV_VAR, SYSTEM_DIR};
use crate::error::{Error, Result};

/// Number of training images in the embedded Fashion-MNIST subset.
pub const EMBEDDED_TRAIN: usize = 10_000;

/// Number of test images in the embedded Fashion-MNIST subset.
pub const EMBEDDED_TEST: usize = 2_000;

/// Largest IDX file, raw or gzipped, that is read: 4 GiB, far above the
/// 47 MB of the uncompressed Fashion-MNIST training images.
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// The embedded subset, written by `data/make-subset.py`.
const EMBEDDED_FILES: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/train-images-idx3-ubyte.gz"),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/train-labels-idx1-ubyte.gz"),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/t10k-images-idx3-ubyte.gz"),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!("../../data/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"),
    ),
];

/// File stems of a data set directory: train images, train labels, test
/// images, test labels. Each may also end in `.gz`.
const FILE_STEMS: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads a data set, logging where it came from.
///
/// `fashion-mnist`, `mnist`, `cifar10` and `cifar10-gray` are read from
/// `data_dir` (the `--data DIR` option) when it is given, else from the
/// directory in the environment variable [`ENV_VAR`] when that is set and
/// not empty. Given either, the files must be there: a missing directory or
/// file is an error, never a fallback. Without both, `fashion-mnist` is read
/// from [`SYSTEM_DIR`] when that directory exists and otherwise falls back
/// to the embedded subset, while the other data sets are an error: no
/// Debian package installs MNIST or CIFAR-10.
///
/// `fashion-mnist-subset` is always the embedded subset, whatever `data_dir`
/// and the environment set, so results with it do not depend on the machine.
pub fn load(name: DatasetName, data_dir: Option<&Path>) -> Result<Dataset> {
    let env_dir = std::env::var_os(ENV_VAR)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from);
    let dataset = resolve(name, data_dir, env_dir, Path::new(SYSTEM_DIR))?;
    tracing::info!(
        "data source: {}, {} train / {} test images",
        dataset.source,
        dataset.train.len(),
        dataset.test.len()
    );
    Ok(dataset)
}

/// Implements [`load`] with the environment variable's value and the system
/// directory passed in, so tests can vary them.
pub(super) fn resolve(
    name: DatasetName,
    data_dir: Option<&Path>,
    env_dir: Option<PathBuf>,
    system_dir: &Path,
) -> Result<Dataset> {
    if name == DatasetName::FashionMnistSubset {
        if let Some(dir) = data_dir {
            tracing::warn!(
                "--data {} is ignored: fashion-mnist-subset always uses the embedded \
                 subset; choose the data set fashion-mnist to read the directory",
                dir.display()
            );
        }
        return load_embedded();
    }
    if let Some(dir) = data_dir {
        return load_dir(dir, name, DataSource::Flag(dir.to_path_buf()));
    }
    if let Some(dir) = env_dir {
        return load_dir(&dir, name, DataSource::Env(dir.clone()));
    }
    match name {
        DatasetName::Mnist => Err(Error::DataNotFound(format!(
            "mnist is not bundled and has no system location: pass --data DIR or set \
             {ENV_VAR}=DIR, where DIR contains {}",
            expected_names()
        ))),
        DatasetName::Cifar10 | DatasetName::Cifar10Gray => Err(Error::DataNotFound(format!(
            "{name} is not bundled and has no system location: pass --data DIR or set \
             {ENV_VAR}=DIR, where DIR contains {} and {}; download the \"CIFAR-10 binary \
             version (suitable for C programs)\" from {}",
            cifar::TRAIN_FILES.join(", "),
            cifar::TEST_FILE,
            cifar::DOWNLOAD_URL
        ))),
        _ if system_dir.is_dir() => load_dir(
            system_dir,
            name,
            DataSource::System(system_dir.to_path_buf()),
        ),
        _ => {
            tracing::info!(
                "{} not found, using the embedded subset of {EMBEDDED_TRAIN} train / \
                 {EMBEDDED_TEST} test images; for the full Fashion-MNIST run \
                 `apt-get install dataset-fashion-mnist` or pass --data DIR",
                system_dir.display()
            );
            load_embedded()
        }
    }
}

/// Loads the files of data set `name` from `dir`.
///
/// For `cifar10` and `cifar10-gray`, see [`cifar::load_dir`]. For the
/// others, `dir` contains `train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
/// `t10k-labels-idx1-ubyte`, each raw or gzipped, with or without a `.gz`
/// suffix. `source` is recorded in the result and named in errors.
pub fn load_dir(dir: &Path, name: DatasetName, source: DataSource) -> Result<Dataset> {
    if name.is_cifar() {
        return cifar::load_dir(dir, name, source);
    }
    if !dir.is_dir() {
        return Err(Error::DataNotFound(format!(
            "data directory {source} does not exist or is not a directory; it must \
             contain {}",
            expected_names()
        )));
    }
    let paths = find_files(dir, &source)?;
    let mut files = Vec::with_capacity(paths.len());
    let mut contents = Vec::with_capacity(paths.len());
    for path in &paths {
        let bytes = crate::fsio::read_capped(path, MAX_FILE_BYTES, "IDX file")?;
        files.push(FileDigest::of(&path.display().to_string(), &bytes));
        contents.push(bytes);
    }
    let [train_images, train_labels, test_images, test_labels] = &paths;
    let train = pair(
        idx::parse_images(&contents[0], train_images)?,
        train_images,
        idx::parse_labels(&contents[1], train_labels, CLASSES)?,
        train_labels,
    )?;
    let test = pair(
        idx::parse_images(&contents[2], test_images)?,
        test_images,
        idx::parse_labels(&contents[3], test_labels, CLASSES)?,
        test_labels,
    )?;
    check_splits(&train, train_images, &test, test_images)?;
    Ok(Dataset {
        name,
        train,
        test,
        source,
        classes: CLASSES,
        files,
    })
}

/// Decodes the Fashion-MNIST subset embedded in the binary: the first
/// [`EMBEDDED_TRAIN`] training and first [`EMBEDDED_TEST`] test images.
pub fn load_embedded() -> Result<Dataset> {
    let [train_images, train_labels, test_images, test_labels] =
        EMBEDDED_FILES.map(|(file, bytes)| (PathBuf::from(format!("embedded:{file}")), bytes));

    let train = pair(
        idx::parse_images(train_images.1, &train_images.0)?,
        &train_images.0,
        idx::parse_labels(train_labels.1, &train_labels.0, CLASSES)?,
        &train_labels.0,
    )?;
    let test = pair(
        idx::parse_images(test_images.1, &test_images.0)?,
        &test_images.0,
        idx::parse_labels(test_labels.1, &test_labels.0, CLASSES)?,
        &test_labels.0,
    )?;
    check_splits(&train, &train_images.0, &test, &test_images.0)?;
    Ok(Dataset {
        name: DatasetName::FashionMnistSubset,
        train,
        test,
        source: DataSource::Embedded,
        classes: CLASSES,
        files: EMBEDDED_FILES
            .iter()
            .map(|(file, bytes)| FileDigest::of(&format!("embedded:{file}"), bytes))
            .collect(),
    })
}

/// Returns the paths of the four files in `dir`, in [`FILE_STEMS`] order.
fn find_files(dir: &Path, source: &DataSource) -> Result<[PathBuf; 4]> {
    let mut found = Vec::with_capacity(FILE_STEMS.len());
    let mut missing = Vec::new();
    for stem in FILE_STEMS {
        let candidates = [dir.join(format!("{stem}.gz")), dir.join(stem)];
        match candidates.into_iter().find(|path| path.is_file()) {
            Some(path) => found.push(path),
            None => missing.push(format!("{stem}[.gz]")),
        }
    }
    if !missing.is_empty() {
        return Err(Error::DataNotFound(format!(
            "data directory {source} is missing {}; it must contain {}",
            missing.join(", "),
            expected_names()
        )));
    }
    Ok(found.try_into().expect("one path per stem"))
}

fn expected_names() -> String {
    let names: Vec<String> = FILE_STEMS.iter().map(|s| format!("{s}[.gz]")).collect();
    names.join(", ")
}

/// Joins an image file with its label file, which must have as many entries.
fn pair(
    images: IdxImages,
    images_path: &Path,
    labels: Vec<u8>,
    labels_path: &Path,
) -> Result<Images> {
    if images.n != labels.len() {
        return Err(Error::data(
            images_path,
            format!(
                "contains {} images but {} contains {} labels; both files must come \
                 from the same data set and split",
                images.n,
                labels_path.display(),
                labels.len()
            ),
        ));
    }
    Ok(Images {
        n: images.n,
        channels: 1,
        rows: images.rows,
        cols: images.cols,
        pixels: images.pixels,
        labels,
        normalisation: None,
    })
}

/// Checks that both splits are non-empty and have images of the same size.
fn check_splits(train: &Images, train_path: &Path, test: &Images, test_path: &Path) -> Result<()> {
    for (images, path) in [(train, train_path), (test, test_path)] {
        if images.is_empty() {
            return Err(Error::data(
                path,
                "contains 0 images; training and evaluation need at least one image in \
                 each split",
            ));
        }
    }
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(Error::data(
            test_path,
            format!(
                "contains {}x{} images but {} contains {}x{} images; the training and \
                 test files must come from the same data set",
                test.rows,
                test.cols,
                train_path.display(),
                train.rows,
                train.cols
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a tiny raw IDX data set of 3 training and 2 test images.
    fn write_dataset(dir: &Path) {
        for (prefix, n) in [("train", 3u32), ("t10k", 2u32)] {
            let mut images = idx::IMAGES_MAGIC.to_be_bytes().to_vec();
            for size in [n, 2, 2] {
                images.extend_from_slice(&size.to_be_bytes());
            }
            images.extend(std::iter::repeat_n(255u8, 4 * n as usize));
            std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();

            let mut labels = idx::LABELS_MAGIC.to_be_bytes().to_vec();
            labels.extend_from_slice(&n.to_be_bytes());
            labels.extend((0..n).map(|i| i as u8));
            std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
        }
    }

    fn missing_dir() -> PathBuf {
        PathBuf::from("/nonexistent/isonn-test-data")
    }

    #[test]
    fn resolve_prefers_flag_over_env() {
        let flag = tempfile::tempdir().unwrap();
        write_dataset(flag.path());
        let dataset = resolve(
            DatasetName::FashionMnist,
            Some(flag.path()),
            Some(missing_dir()),
            &missing_dir(),
        )
        .unwrap();
        assert_eq!(dataset.source, DataSource::Flag(flag.path().to_path_buf()));
        assert_eq!(dataset.train.len(), 3);
        assert_eq!(dataset.test.len(), 2);
    }

    #[test]
    fn resolve_uses_env_before_system() {
        let env = tempfile::tempdir().unwrap();
        write_dataset(env.path());
        let system = tempfile::tempdir().unwrap();
        let dataset = resolve(
            DatasetName::Mnist,
            None,
            Some(env.path().to_path_buf()),
            system.path(),
        )
        .unwrap();
        assert_eq!(dataset.source, DataSource::Env(env.path().to_path_buf()));
        assert_eq!(dataset.name, DatasetName::Mnist);
    }

    #[test]
    fn resolve_missing_flag_dir_is_error() {
        let error = resolve(
            DatasetName::FashionMnist,
            Some(&missing_dir()),
            None,
            &missing_dir(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("/nonexistent/isonn-test-data (from --data)"),
            "{error}"
        );
        assert!(error.contains("does not exist"), "{error}");
        assert!(error.contains("train-images-idx3-ubyte[.gz]"), "{error}");
    }

    #[test]
    fn resolve_missing_env_dir_is_error() {
        let error = resolve(
            DatasetName::FashionMnist,
            None,
            Some(missing_dir()),
            &missing_dir(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("(from ISONN_DATA)"), "{error}");
        assert!(error.contains("does not exist"), "{error}");
    }

    #[test]
    fn resolve_uses_system_dir() {
        let system = tempfile::tempdir().unwrap();
        write_dataset(system.path());
        let dataset = resolve(DatasetName::FashionMnist, None, None, system.path()).unwrap();
        assert_eq!(
            dataset.source,
            DataSource::System(system.path().to_path_buf())
        );
    }

    #[test]
    fn resolve_incomplete_system_dir_is_error() {
        let system = tempfile::tempdir().unwrap();
        let error = resolve(DatasetName::FashionMnist, None, None, system.path())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("system package dataset-fashion-mnist"),
            "{error}"
        );
        assert!(
            error.contains("is missing train-images-idx3-ubyte[.gz]"),
            "{error}"
        );
    }

    #[test]
    fn resolve_falls_back_to_embedded() {
        let dataset = resolve(DatasetName::FashionMnist, None, None, &missing_dir()).unwrap();
        assert_eq!(dataset.source, DataSource::Embedded);
        assert_eq!(dataset.train.len(), EMBEDDED_TRAIN);
        // The fallback reports the subset's name, so results never claim the full set.
        assert_eq!(dataset.name, DatasetName::FashionMnistSubset);
    }

    #[test]
    fn resolve_mnist_without_dir_is_error() {
        let system = tempfile::tempdir().unwrap();
        write_dataset(system.path());
        let error = resolve(DatasetName::Mnist, None, None, system.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("mnist"), "{error}");
        assert!(error.contains("--data DIR"), "{error}");
        assert!(error.contains("ISONN_DATA=DIR"), "{error}");
    }

    #[test]
    fn resolve_cifar_without_dir_is_error() {
        // A system directory with Fashion-MNIST must not be read as CIFAR-10.
        let system = tempfile::tempdir().unwrap();
        write_dataset(system.path());
        for name in [DatasetName::Cifar10, DatasetName::Cifar10Gray] {
            let error = resolve(name, None, None, system.path()).unwrap_err().to_string();
            assert!(error.contains(&format!("{name} is not bundled")), "{error}");
            assert!(error.contains("ISONN_DATA=DIR"), "{error}");
            assert!(error.contains("data_batch_1.bin"), "{error}");
            assert!(error.contains(cifar::DOWNLOAD_URL), "{error}");
        }
    }

    #[test]
    fn resolve_subset_ignores_dirs() {
        let flag = tempfile::tempdir().unwrap();
        write_dataset(flag.path());
        let dataset = resolve(
            DatasetName::FashionMnistSubset,
            Some(flag.path()),
            Some(flag.path().to_path_buf()),
            flag.path(),
        )
        .unwrap();
        assert_eq!(dataset.source, DataSource::Embedded);
        assert_eq!(dataset.test.len(), EMBEDDED_TEST);
    }
}
