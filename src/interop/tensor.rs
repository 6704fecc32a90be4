//! Conversion between ONNX tensors and flat `f64` values, with the checks
//! that keep a hostile file from causing a large allocation.

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;

/// The values of a decoded tensor, row-major, with its dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// The dimensions; empty for a scalar.
    pub dims: Vec<usize>,
    /// The values, converted to `f64`.
    pub values: Vec<f64>,
}

/// Decodes a float, double, int32 or int64 tensor.
///
/// The element count implied by `dims` must equal the number of values the
/// tensor carries (in `raw_data` or in the typed field). It is checked
/// before any buffer is allocated, so a tensor that declares more values
/// than the file contains is an error, not an allocation. Errors name the
/// tensor and what is wrong.
pub fn decode_tensor(tensor: &TensorProto) -> Result<TensorData, String> {
    let name = tensor.name.as_deref().unwrap_or("(unnamed)");
    if tensor.data_location == Some(DataLocation::External as i32) || !tensor.external_data.is_empty() {
        return Err(format!(
            "tensor {name} keeps its data in an external file, which isonn does not read; save \
             the model with every tensor inside it (onnx.save_model(..., save_as_external_data=False))"
        ));
    }
    let mut dims = Vec::with_capacity(tensor.dims.len());
    let mut count: usize = 1;
    for &d in &tensor.dims {
        let d = usize::try_from(d).map_err(|_| format!("tensor {name} has a negative dimension in {:?}", tensor.dims))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| format!("tensor {name} declares dimensions {:?}, more values than memory holds", tensor.dims))?;
        dims.push(d);
    }
    let data_type = tensor.data_type.unwrap_or(0);
    let (element_bytes, typed_len) = match DataType::try_from(data_type) {
        Ok(DataType::Float) => (4, tensor.float_data.len()),
        Ok(DataType::Double) => (8, tensor.double_data.len()),
        Ok(DataType::Int32) => (4, tensor.int32_data.len()),
        Ok(DataType::Int64) => (8, tensor.int64_data.len()),
        _ => {
            return Err(format!(
                "tensor {name} has ONNX data type {data_type}; isonn reads float (1), int32 (6), \
                 int64 (7) and double (11) tensors"
            ))
        }
    };
    let values = match &tensor.raw_data {
        Some(raw) => {
            let expected = count.checked_mul(element_bytes);
            if expected != Some(raw.len()) {
                return Err(format!(
                    "tensor {name} declares dimensions {dims:?} ({count} values of {element_bytes} \
                     bytes) but carries {} bytes; the file is damaged or was cut short",
                    raw.len()
                ));
            }
            decode_raw(raw, DataType::try_from(data_type).expect("checked above"))
        }
        None => {
            if typed_len != count {
                return Err(format!(
                    "tensor {name} declares dimensions {dims:?} ({count} values) but carries \
                     {typed_len}; the file is damaged or was cut short"
                ));
            }
            match DataType::try_from(data_type).expect("checked above") {
                DataType::Float => tensor.float_data.iter().map(|&v| v as f64).collect(),
                DataType::Double => tensor.double_data.clone(),
                DataType::Int32 => tensor.int32_data.iter().map(|&v| v as f64).collect(),
                _ => tensor.int64_data.iter().map(|&v| v as f64).collect(),
            }
        }
    };
    Ok(TensorData { dims, values })
}

/// Decodes little-endian `raw` bytes whose length is a multiple of the
/// element size of `data_type`.
fn decode_raw(raw: &[u8], data_type: DataType) -> Vec<f64> {
    match data_type {
        DataType::Float => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")) as f64)
            .collect(),
        DataType::Int32 => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("chunks of 4")) as f64)
            .collect(),
        DataType::Int64 => raw
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8")) as f64)
            .collect(),
        _ => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
            .collect(),
    }
}

/// Builds a float tensor named `name` with the values in `raw_data`.
pub fn float_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    debug_assert_eq!(dims.iter().product::<usize>(), values.len());
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// Builds a one-dimensional int64 tensor named `name`, for shapes and axes.
pub fn int64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![values.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_tensor_round_trips() {
        let values = [1.5f32, -2.25, 0.0, 3.0e-7, 1.0e30, -0.5];
        let decoded = decode_tensor(&float_tensor("w", &[2, 3], &values)).unwrap();
        assert_eq!(decoded.dims, vec![2, 3]);
        let expected: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        assert_eq!(decoded.values, expected);
    }

    #[test]
    fn typed_fields_decode() {
        let int64 = decode_tensor(&int64_tensor("shape", &[-1, 784])).unwrap();
        assert_eq!(int64.values, vec![-1.0, 784.0]);
        let double = TensorProto {
            dims: vec![2],
            data_type: Some(DataType::Double as i32),
            double_data: vec![0.25, -4.0],
            ..Default::default()
        };
        assert_eq!(decode_tensor(&double).unwrap().values, vec![0.25, -4.0]);
        let scalar = TensorProto {
            data_type: Some(DataType::Float as i32),
            float_data: vec![6.0],
            ..Default::default()
        };
        let scalar = decode_tensor(&scalar).unwrap();
        assert!(scalar.dims.is_empty());
        assert_eq!(scalar.values, vec![6.0]);
    }

    #[test]
    fn short_raw_data_is_an_error() {
        let mut t = float_tensor("layers.0.weight", &[2, 3], &[0.0; 6]);
        t.raw_data.as_mut().unwrap().truncate(20);
        let message = decode_tensor(&t).unwrap_err();
        assert!(message.contains("layers.0.weight"), "{message}");
        assert!(message.contains("carries 20 bytes"), "{message}");
    }

    #[test]
    fn huge_declared_tensor_is_rejected() {
        // 2^62 values declared, 24 bytes carried: the check must fail on
        // the sizes, before anything of that size is allocated.
        let mut t = float_tensor("big", &[2, 3], &[0.0; 6]);
        t.dims = vec![1 << 31, 1 << 31];
        let message = decode_tensor(&t).unwrap_err();
        assert!(message.contains("big"), "{message}");
        t.dims = vec![i64::MAX, i64::MAX];
        let message = decode_tensor(&t).unwrap_err();
        assert!(message.contains("more values than memory holds"), "{message}");
        t.dims = vec![-4, 2];
        assert!(decode_tensor(&t).unwrap_err().contains("negative dimension"));
    }

    #[test]
    fn typed_count_mismatch_is_an_error() {
        let t = TensorProto {
            name: Some("b".into()),
            dims: vec![4],
            data_type: Some(DataType::Float as i32),
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        assert!(decode_tensor(&t).unwrap_err().contains("carries 2"));
    }

    #[test]
    fn external_and_unsupported_types_are_errors() {
        let mut t = float_tensor("w", &[1], &[1.0]);
        t.data_location = Some(DataLocation::External as i32);
        assert!(decode_tensor(&t).unwrap_err().contains("external file"));
        let mut t = float_tensor("w", &[1], &[1.0]);
        t.data_type = Some(DataType::Float16 as i32);
        assert!(decode_tensor(&t).unwrap_err().contains("data type 10"));
    }
}
