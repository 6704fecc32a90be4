//! Feeds arbitrary bytes to the ONNX importer as a model file, with one
//! input range for every channel. When a model imports, its forward pass
//! runs on one all-zero input, which must not panic either. Any panic,
//! abort or allocation past the fuzzer's limit is a bug.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = Path::new("fuzz-input.onnx");
    let Ok(model) = isonn::interop::decode_model(bytes, path) else {
        return;
    };
    let range = isonn::model::Range { lo: 0.0, hi: 1.0 };
    let Ok(imported) = isonn::interop::import_model(&model, path, &[range]) else {
        return;
    };
    let network = imported.network;
    let shape = network.input_shape.clone();
    let elements: usize = shape.iter().product();
    // Inputs up to 1 MiB keep each run fast; larger ones only cost time.
    if elements <= 1 << 18 {
        let mut dims = vec![1];
        dims.extend_from_slice(&shape);
        if let Ok(x) = candle_core::Tensor::zeros(dims, candle_core::DType::F32, &candle_core::Device::Cpu) {
            let _ = network.forward(&x);
        }
    }
});
