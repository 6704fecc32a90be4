//! Reading and writing whole ONNX model files.

use std::path::Path;

use prost::Message;

use super::proto::ModelProto;
use crate::error::{Error, Result};

/// Largest ONNX file isonn reads: 2 GiB, the size limit of one protobuf
/// message. Larger models keep their tensors in external files, which
/// isonn does not read.
pub const MAX_ONNX_BYTES: u64 = (2 << 30) - 1;

/// Reads the ONNX model in `path`, rejecting a file over
/// [`MAX_ONNX_BYTES`] before reading it.
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = crate::fsio::read_capped(path, MAX_ONNX_BYTES, "ONNX model")?;
    decode_model(&bytes, path)
}

/// Decodes an ONNX model from `bytes`; `path` names the source in errors.
///
/// Decoding allocates at most a small multiple of `bytes.len()`: prost
/// copies the fields that are present, and the tensors' declared sizes are
/// checked only later, by [`super::decode_tensor`].
pub fn decode_model(bytes: &[u8], path: &Path) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes).map_err(|e| {
        Error::data(
            path,
            format!(
                "not a valid ONNX protobuf ({e}); the file is truncated or not an ONNX model, \
                 so export it again"
            ),
        )
    })?;
    if model.graph.is_none() {
        return Err(Error::data(
            path,
            "the ONNX model has no graph; the file is empty or not an ONNX model",
        ));
    }
    Ok(model)
}

/// Encodes `model` as protobuf bytes.
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Writes `model` to `path` atomically (a temporary sibling, then a rename).
pub fn write_model(path: &Path, model: &ModelProto) -> Result<()> {
    crate::fsio::write_atomic(path, &encode_model(model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::proto::{GraphProto, NodeProto};

    fn small_model() -> ModelProto {
        let node = NodeProto {
            input: vec!["x".into()],
            output: vec!["y".into()],
            name: Some("relu".into()),
            op_type: Some("Relu".into()),
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            graph: Some(GraphProto {
                node: vec![node],
                name: Some("g".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn model_round_trips_through_bytes() {
        let model = small_model();
        let decoded = decode_model(&encode_model(&model), Path::new("m.onnx")).unwrap();
        assert_eq!(decoded, model);
    }

    #[test]
    fn truncated_model_is_an_error() {
        let bytes = encode_model(&small_model());
        for cut in 1..bytes.len() {
            // Every cut either fails to decode or decodes to a different
            // message; none panics.
            match decode_model(&bytes[..cut], Path::new("cut.onnx")) {
                Err(e) => assert!(e.to_string().contains("cut.onnx"), "{e}"),
                Ok(m) => assert_ne!(m, small_model(), "cut at {cut} decoded to the whole model"),
            }
        }
    }

    #[test]
    fn empty_file_has_no_graph() {
        let message = decode_model(&[], Path::new("empty.onnx")).unwrap_err().to_string();
        assert!(message.contains("no graph"), "{message}");
    }

    #[test]
    fn write_then_read_gives_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        write_model(&path, &small_model()).unwrap();
        assert_eq!(read_model(&path).unwrap(), small_model());
    }
}
