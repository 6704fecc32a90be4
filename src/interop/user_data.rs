//! Inputs and class labels from `.npy` files, in place of a data set, for
//! the commands that read data: `eval`, `verify`, `transform` and `bound`.
//!
//! The inputs are float32 or float64 `[n, channels, height, width]`, the
//! labels a 1-D array of `n` class indices of any integer type. Without
//! labels the caller labels each input with a network's prediction, so
//! accuracies measure agreement with that network.

use std::path::Path;

use crate::data::{FileDigest, Images};
use crate::error::{Error, Result};
use crate::interop::npy::{self, MAX_NPY_BYTES};
use crate::model::Network;
use crate::provenance::DataRecord;

/// The `source` of the [`DataRecord`] of inputs read from `.npy` files.
pub const SOURCE: &str = "user .npy files (--inputs, --labels)";

/// Inputs read from a `.npy` file, with their labels once known.
#[derive(Debug, Clone)]
pub struct UserData {
    /// The inputs, with empty `labels` until [`UserData::read_labels`] or
    /// [`UserData::label_with`] fills them.
    pub images: Images,
    /// The files read, named by path, with their checksums; the inputs'
    /// path is the data set name.
    pub record: DataRecord,
}

impl UserData {
    /// Reads the inputs in `path` and checks that each sample has the
    /// shape `input_shape` (`[channels, height, width]`).
    pub fn read_inputs(path: &Path, input_shape: &[usize]) -> Result<UserData> {
        let bytes = crate::fsio::read_capped(path, MAX_NPY_BYTES, ".npy inputs")?;
        let data = npy::parse_npy(&bytes).map_err(|m| Error::data(path, m))?;
        let [n, sample @ ..] = data.dims.as_slice() else {
            return Err(Error::data(
                path,
                "the array is a scalar; save the inputs as [n, channels, height, width]",
            ));
        };
        let [channels, rows, cols] = *input_shape else {
            return Err(Error::Shape(format!(
                "expected a [c, h, w] model input shape, got {input_shape:?}"
            )));
        };
        if sample != input_shape {
            return Err(Error::data(
                path,
                format!(
                    "the samples have shape {sample:?} (array {:?}) but the model reads samples of \
                     shape {input_shape:?}; save the inputs as [n, {channels}, {rows}, {cols}]",
                    data.dims
                ),
            ));
        }
        if *n == 0 {
            return Err(Error::data(
                path,
                "the array holds no samples; save at least one input",
            ));
        }
        check_finite(&data.values, channels * rows * cols).map_err(|m| Error::data(path, m))?;
        let display = path.display().to_string();
        let images = Images {
            n: *n,
            channels,
            rows,
            cols,
            pixels: data.values.iter().map(|&v| v as f32).collect(),
            labels: Vec::new(),
            normalisation: None,
        };
        let record = DataRecord {
            dataset: display.clone(),
            source: SOURCE.into(),
            files: vec![FileDigest::of(&display, &bytes)],
        };
        Ok(UserData { images, record })
    }

    /// Reads the class labels in `path`: a 1-D integer array with one
    /// label in `0..classes` per input.
    pub fn read_labels(&mut self, path: &Path, classes: usize) -> Result<()> {
        let bytes = crate::fsio::read_capped(path, MAX_NPY_BYTES, ".npy labels")?;
        let data = npy::parse_npy_integers(&bytes).map_err(|m| Error::data(path, m))?;
        self.images.labels =
            check_labels(&data, self.images.n, classes).map_err(|m| Error::data(path, m))?;
        let display = path.display().to_string();
        self.record.files.push(FileDigest::of(&display, &bytes));
        Ok(())
    }

    /// Labels every input with the class `network` predicts for it.
    pub fn label_with(&mut self, network: &Network) -> Result<()> {
        super::samples::check_label_classes(network)
            .map_err(|m| Error::data(self.record.dataset.clone(), m))?;
        self.images.labels =
            super::samples::predictions(network, &self.images.pixels, self.images.n)?;
        Ok(())
    }
}

/// Checks that every input value is finite, since a NaN or infinity
/// propagates to every output it reaches and makes any comparison of
/// outputs meaningless. `values` contains samples of `per_sample` elements in
/// C order; the error names the first non-finite element.
pub fn check_finite(values: &[f64], per_sample: usize) -> std::result::Result<(), String> {
    let Some(index) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let per_sample = per_sample.max(1);
    Err(format!(
        "sample {} has the non-finite value {} at element {} (flat index within the sample); \
         remove or replace the non-finite values, e.g. with numpy.nan_to_num",
        index / per_sample,
        values[index],
        index % per_sample
    ))
}

/// Checks labels read from a file against the number of inputs `n` and the
/// model's `classes`, returning them as isonn's 8-bit labels.
fn check_labels(
    data: &npy::IntegerData,
    n: usize,
    classes: usize,
) -> std::result::Result<Vec<u8>, String> {
    let [count] = data.dims[..] else {
        return Err(format!(
            "the labels have shape {:?}; save a 1-D array of {n} class indices, e.g. labels.reshape(-1)",
            data.dims
        ));
    };
    if count != n {
        return Err(format!(
            "{count} labels for {n} inputs; save exactly one label per input, in the inputs' order"
        ));
    }
    let mut labels = Vec::with_capacity(n);
    for (i, &label) in data.values.iter().enumerate() {
        if label < 0 {
            return Err(format!(
                "label {i} is {label}, but labels are class indices >= 0; map the classes to 0..{classes}"
            ));
        }
        if label >= classes as i128 {
            return Err(format!(
                "label {i} is {label}, but the model has {classes} classes (0..={}); pass the labels \
                 of this model's classes",
                classes - 1
            ));
        }
        let label = u8::try_from(label).map_err(|_| {
            format!("label {i} is {label}, but isonn supports at most 256 classes (labels 0..=255)")
        })?;
        labels.push(label);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(values: &[i128]) -> npy::IntegerData {
        npy::IntegerData {
            dims: vec![values.len()],
            values: values.to_vec(),
        }
    }

    #[test]
    fn labels_within_classes_pass() {
        assert_eq!(
            check_labels(&labels(&[0, 9, 3]), 3, 10).unwrap(),
            vec![0, 9, 3]
        );
    }

    #[test]
    fn non_finite_inputs_name_the_sample() {
        assert!(check_finite(&[0.0, 1.0, -2.5], 3).is_ok());
        let message = check_finite(&[0.0, 1.0, 2.0, 3.0, f64::NAN, 5.0], 3).unwrap_err();
        assert!(
            message.contains("sample 1 has the non-finite value NaN at element 1"),
            "{message}"
        );
        let message = check_finite(&[f64::NEG_INFINITY], 1).unwrap_err();
        assert!(
            message.contains("sample 0 has the non-finite value -inf at element 0"),
            "{message}"
        );
    }

    #[test]
    fn bad_labels_are_errors() {
        let negative = check_labels(&labels(&[0, -1]), 2, 10).unwrap_err();
        assert!(negative.contains("label 1 is -1"), "{negative}");
        let too_large = check_labels(&labels(&[0, 10]), 2, 10).unwrap_err();
        assert!(too_large.contains("has 10 classes"), "{too_large}");
        let count = check_labels(&labels(&[0, 1, 2]), 2, 10).unwrap_err();
        assert!(count.contains("3 labels for 2 inputs"), "{count}");
        let two_d = npy::IntegerData {
            dims: vec![2, 1],
            values: vec![0, 1],
        };
        let shape = check_labels(&two_d, 2, 10).unwrap_err();
        assert!(shape.contains("shape [2, 1]"), "{shape}");
        let wide = check_labels(&labels(&[300]), 1, 1000).unwrap_err();
        assert!(wide.contains("at most 256 classes"), "{wide}");
    }
}
