//! Feeds arbitrary model directories to the loader: the first two bytes
//! give the length of the `model.json` part (little-endian, capped at the
//! input length), the rest is `model.safetensors`. When a model loads, its
//! forward pass runs on one all-zero input, which must not panic either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([bytes[0], bytes[1]]) as usize).min(bytes.len() - 2);
    let (json, tensors) = bytes[2..].split_at(split);
    let loaded = isonn::store::load_bytes(
        json,
        Path::new("model.json"),
        tensors,
        Path::new("model.safetensors"),
    );
    if let Ok((model, _)) = loaded {
        let shape = model.input_shape();
        let elements: usize = shape.iter().product();
        // Inputs up to 1 MiB keep each run fast; larger ones only cost time.
        if elements <= 1 << 18 {
            let mut dims = vec![1];
            dims.extend_from_slice(shape);
            if let Ok(x) = candle_core::Tensor::zeros(dims, model.dtype(), &candle_core::Device::Cpu) {
                let _ = model.forward(&x);
            }
        }
    }
});
