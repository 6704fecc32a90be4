//! PyTorch state dicts saved as safetensors (`safetensors.torch.save_file`),
//! read with an isonn `model.json` that describes the architecture.
//!
//! The architecture file has the schema of a saved model's `model.json`
//! (docs/MODEL_FORMAT.md); `format`, `schema_version` and `kind` may be left
//! out. Each layer with parameters takes the tensors of one PyTorch module,
//! named by its prefix in the state dict (`fc1` for `fc1.weight` and
//! `fc1.bias`). A layer may name its prefix with `"torch_name"`. Without
//! any `torch_name`, the prefixes are taken in natural order (numeric parts
//! compared as numbers, so `features.2` comes before `features.10`), which
//! is the layer order of an `nn.Sequential`. safetensors sorts its keys, so
//! the file's order cannot be used.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::{Network, Range};
use crate::store::{self, Model};

/// The field of a layer in the architecture file that names its module's
/// prefix in the state dict.
pub const TORCH_NAME: &str = "torch_name";

/// Returns `true` when `head`, the first bytes of a file of `file_len`
/// bytes, starts as a safetensors file does: an 8-byte little-endian header
/// length that fits in the file, then the JSON header's `{`.
pub fn is_safetensors(head: &[u8], file_len: u64) -> bool {
    let Some((length, rest)) = head.split_first_chunk::<8>() else {
        return false;
    };
    let header_len = u64::from_le_bytes(*length);
    rest.first() == Some(&b'{') && header_len >= 2 && header_len <= file_len.saturating_sub(8)
}

/// A layer of the architecture that takes tensors from the state dict.
#[derive(Debug)]
struct Slot {
    /// The isonn path, `layers.{i}` or `layers.{i}.main.{j}`.
    path: String,
    /// The layer type, e.g. `conv2d`.
    kind: String,
    /// The module prefix named in the architecture file, if any.
    torch_name: Option<String>,
    /// The tensor names after the prefix, with their PyTorch shapes.
    tensors: Vec<(&'static str, Vec<usize>)>,
    /// `false` when the layer sets `"bias": false`, as a PyTorch module
    /// built with `bias=False`: isonn then uses a zero bias.
    has_bias: bool,
}

/// Reads the network that the state dict in `weights` and the architecture
/// in `architecture` describe. `input_ranges`, when not empty, replaces the
/// architecture's input range: one range, or one per input channel.
pub fn import_state_dict(
    weights: &Path,
    architecture: &Path,
    input_ranges: &[Range],
) -> Result<Network> {
    let text = crate::fsio::read_capped(architecture, store::MAX_MODEL_JSON_BYTES, "architecture")?;
    let mut description: Value = serde_json::from_slice(&text).map_err(|e| {
        model_error(
            architecture,
            format!("invalid JSON ({e}); write the architecture as model.json"),
        )
    })?;
    complete_header(&mut description, architecture, input_ranges)?;
    let mut slots = Vec::new();
    let layers = description
        .get_mut("layers")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            model_error(
                architecture,
                "no \"layers\" list; describe the layers as in model.json".into(),
            )
        })?;
    collect_slots(layers, "layers", &mut slots).map_err(|m| model_error(architecture, m))?;
    // torch_name and bias are removed by now, so only misspelt or foreign
    // fields remain unknown.
    if let Some(message) = store::unknown_layer_fields(layers, "layers").first() {
        return Err(model_error(
            architecture,
            format!(
                "{message}, plus torch_name and bias in an architecture file; remove or rename \
                 the field"
            ),
        ));
    }

    let bytes = crate::fsio::read_capped(weights, store::MAX_TENSOR_BYTES, "state dict")?;
    let mut tensors = read_state_dict(&bytes, weights)?;
    let renamed = assign(&slots, &mut tensors).map_err(|m| model_error(weights, m))?;
    if let Some(name) = tensors.keys().next() {
        return Err(model_error(
            weights,
            format!(
                "unused tensor {name}: no layer of {} takes it; describe its module in the \
                 architecture or remove it from the state dict",
                architecture.display()
            ),
        ));
    }

    let dtype = if renamed.iter().all(|(_, t)| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let renamed = renamed
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    let serialised = store::serialize_tensors(&renamed, None, weights)?;
    let json = serde_json::to_vec(&description).expect("a serde_json::Value serialises");
    match store::load_bytes(&json, architecture, &serialised, weights)? {
        (Model::Regular(network), _) => Ok(network),
        (Model::Nonneg(_), _) => unreachable!("complete_header rejects kind \"nonneg\""),
    }
}

fn model_error(path: &Path, message: String) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        message,
    }
}

/// Fills in `format`, `schema_version` and `kind` where the architecture
/// leaves them out, and sets the input range from `input_ranges`.
fn complete_header(description: &mut Value, path: &Path, input_ranges: &[Range]) -> Result<()> {
    let object = description.as_object_mut().ok_or_else(|| {
        model_error(
            path,
            "the architecture is not a JSON object; write it as model.json".into(),
        )
    })?;
    object.entry("format").or_insert(store::FORMAT.into());
    object
        .entry("schema_version")
        .or_insert(store::SCHEMA_VERSION.into());
    let kind = object.entry("kind").or_insert("regular".into());
    if *kind != "regular" {
        return Err(model_error(
            path,
            format!("kind {kind} cannot come from a PyTorch state dict; set \"kind\": \"regular\" or leave it out"),
        ));
    }
    if input_ranges.is_empty() {
        return Ok(());
    }
    let input = object
        .get_mut("input")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
            model_error(
                path,
                "no \"input\" object; give the input's \"shape\" [c, h, w]".into(),
            )
        })?;
    let lo = input_ranges
        .iter()
        .map(|r| r.lo)
        .fold(f64::INFINITY, f64::min);
    let hi = input_ranges
        .iter()
        .map(|r| r.hi)
        .fold(f64::NEG_INFINITY, f64::max);
    input.insert("range".into(), serde_json::json!({ "lo": lo, "hi": hi }));
    input.remove("channel_ranges");
    if input_ranges.len() > 1 {
        input.insert(
            "channel_ranges".into(),
            serde_json::to_value(input_ranges).expect("ranges serialise"),
        );
    }
    Ok(())
}

/// Reads an integer field of a layer description.
fn size(layer: &Map<String, Value>, field: &str, path: &str) -> std::result::Result<usize, String> {
    layer
        .get(field)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| format!("layer {path}: missing or invalid integer field \"{field}\""))
}

/// Walks the layer descriptions (residual branches too, main before
/// shortcut), removing `torch_name` and `bias` and recording every layer
/// with parameters in `slots`.
fn collect_slots(
    layers: &mut [Value],
    prefix: &str,
    slots: &mut Vec<Slot>,
) -> std::result::Result<(), String> {
    for (i, layer) in layers.iter_mut().enumerate() {
        let path = format!("{prefix}.{i}");
        let object = layer
            .as_object_mut()
            .ok_or_else(|| format!("layer {path} is not a JSON object"))?;
        let kind = object
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let torch_name = match object.remove(TORCH_NAME) {
            None => None,
            Some(Value::String(name)) => Some(name),
            Some(other) => {
                return Err(format!(
                    "layer {path}: {TORCH_NAME} {other} is not a string"
                ))
            }
        };
        let has_bias = match object.remove("bias") {
            None | Some(Value::Bool(true)) => true,
            Some(Value::Bool(false)) => false,
            Some(other) => {
                return Err(format!(
                    "layer {path}: \"bias\" {other} is not true or false"
                ))
            }
        };
        let tensors = match kind.as_str() {
            "linear" => {
                let (inputs, outputs) = (
                    size(object, "in_features", &path)?,
                    size(object, "out_features", &path)?,
                );
                vec![("weight", vec![outputs, inputs]), ("bias", vec![outputs])]
            }
            "conv2d" | "conv1d" => {
                let outputs = size(object, "out_channels", &path)?;
                let groups = size(object, "groups", &path)?.max(1);
                let mut weight = vec![outputs, size(object, "in_channels", &path)? / groups];
                match object.get("kernel") {
                    Some(Value::Array(k)) if kind == "conv2d" => {
                        weight.extend(k.iter().filter_map(Value::as_u64).map(|v| v as usize))
                    }
                    Some(k) if kind == "conv1d" => weight.extend(k.as_u64().map(|v| v as usize)),
                    _ => {
                        return Err(format!(
                            "layer {path} ({kind}): missing or invalid \"kernel\""
                        ))
                    }
                }
                vec![("weight", weight), ("bias", vec![outputs])]
            }
            "batch-norm" => {
                let channels = size(object, "channels", &path)?;
                for (field, default) in [("eps", "1e-5"), ("momentum", "0.1")] {
                    if !object.get(field).is_some_and(Value::is_number) {
                        return Err(format!(
                            "layer {path} (batch-norm): missing or invalid number field \"{field}\"; \
                             set it to the module's {field} (PyTorch's default is {default})"
                        ));
                    }
                }
                ["weight", "bias", "running_mean", "running_var"]
                    .map(|n| (n, vec![channels]))
                    .to_vec()
            }
            "residual" => {
                for branch in ["main", "shortcut"] {
                    if let Some(Value::Array(inner)) = object.get_mut(branch) {
                        collect_slots(inner, &format!("{path}.{branch}"), slots)?;
                    }
                }
                Vec::new()
            }
            "elman" => {
                return Err(format!(
                    "layer {path} (elman) cannot be read from a state dict: PyTorch's nn.RNN reads \
                     its input in another layout; train the Elman network with isonn"
                ))
            }
            _ => Vec::new(),
        };
        if tensors.is_empty() {
            if torch_name.is_some() {
                return Err(format!("layer {path} ({kind}) has no parameters, so it takes no {TORCH_NAME}; remove it"));
            }
            continue;
        }
        slots.push(Slot {
            path,
            kind,
            torch_name,
            tensors,
            has_bias,
        });
    }
    Ok(())
}

/// Reads every tensor of a safetensors file as f32 or f64, converting
/// f16 and bf16 to f32. BatchNorm's `num_batches_tracked` is dropped.
fn read_state_dict(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        model_error(
            path,
            format!("cannot read the state dict ({e}); the file is truncated or not safetensors, so save it again with safetensors.torch.save_file"),
        )
    })?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(model_error(
                    path,
                    format!("tensor {name} has type {other:?}; save the parameters as float32, float64, float16 or bfloat16"),
                ))
            }
        };
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        let tensor = if matches!(dtype, DType::F16 | DType::BF16) {
            tensor.to_dtype(DType::F32)?
        } else {
            tensor
        };
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// One part of a module prefix, for the natural order of prefixes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part<'a> {
    Number(u64),
    Text(&'a str),
}

/// Compares prefixes part by part, numbers as numbers: `2` < `10` < `fc`.
fn natural_order(a: &str, b: &str) -> Ordering {
    parts(a).cmp(&parts(b))
}

fn parts(prefix: &str) -> Vec<Part<'_>> {
    prefix
        .split('.')
        .map(|p| p.parse().map_or(Part::Text(p), Part::Number))
        .collect()
}

/// Returns the module prefix of a tensor name: `features.0` for
/// `features.0.weight`.
fn prefix_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(prefix, _)| prefix)
}

/// Takes each slot's tensors out of `tensors`, checking their shapes, and
/// returns them under their isonn names.
fn assign(
    slots: &[Slot],
    tensors: &mut BTreeMap<String, Tensor>,
) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let mut prefixes: Vec<String> = Vec::new();
    for name in tensors.keys() {
        let prefix = prefix_of(name);
        if !prefixes.iter().any(|p| p == prefix) {
            prefixes.push(prefix.to_string());
        }
    }
    prefixes.sort_by(|a, b| natural_order(a, b));
    let describe = |slots: &[Slot]| {
        slots
            .iter()
            .map(|s| format!("{} ({})", s.path, s.kind))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let named = slots.iter().filter(|s| s.torch_name.is_some()).count();
    let modules: Vec<String> = if named == slots.len() {
        let modules: Vec<String> = slots
            .iter()
            .map(|s| s.torch_name.clone().expect("all named"))
            .collect();
        for (i, module) in modules.iter().enumerate() {
            if let Some(j) = modules[..i].iter().position(|m| m == module) {
                return Err(format!(
                    "layers {} and {} both name the module {module:?} with {TORCH_NAME}; give \
                     each layer with parameters its own module",
                    slots[j].path, slots[i].path
                ));
            }
        }
        modules
    } else if named == 0 {
        if prefixes.len() != slots.len() {
            return Err(format!(
                "the state dict has {} modules with parameters ({}) but the architecture has {} layers \
                 with parameters ({}); describe one layer per module, or give each layer a {TORCH_NAME}",
                prefixes.len(),
                prefixes.join(", "),
                slots.len(),
                describe(slots)
            ));
        }
        prefixes.clone()
    } else {
        let unnamed: Vec<&Slot> = slots.iter().filter(|s| s.torch_name.is_none()).collect();
        return Err(format!(
            "only some layers name their module with {TORCH_NAME}; give it to every layer with \
             parameters or to none (missing on {})",
            unnamed
                .iter()
                .map(|s| s.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };

    let hint = if named == 0 {
        format!(
            "the modules in natural order are {}; if that is not the layer order, give each layer a {TORCH_NAME}",
            prefixes.join(", ")
        )
    } else {
        format!("the modules are {}", prefixes.join(", "))
    };
    let mut renamed = Vec::new();
    for (slot, module) in slots.iter().zip(&modules) {
        for (suffix, shape) in &slot.tensors {
            let name = if module.is_empty() {
                suffix.to_string()
            } else {
                format!("{module}.{suffix}")
            };
            let target = format!("{}.{suffix}", slot.path);
            // The weight comes first and has been checked against a tensor
            // of the file, so the zero bias's size is bounded by the file.
            // It also takes the weight's dtype, so that a float64 state dict
            // still gives a float64 model.
            if *suffix == "bias" && !slot.has_bias {
                let dtype = renamed
                    .last()
                    .map_or(DType::F32, |(_, weight): &(String, Tensor)| weight.dtype());
                let zeros = Tensor::zeros(shape.as_slice(), dtype, &Device::Cpu)
                    .map_err(|e| e.to_string())?;
                renamed.push((target, zeros));
                continue;
            }
            let Some(tensor) = tensors.remove(&name) else {
                return Err(format!(
                    "missing tensor {name} for layer {} ({}); {hint}",
                    slot.path, slot.kind
                ));
            };
            if tensor.dims() != shape.as_slice() {
                return Err(format!(
                    "tensor {name} has shape {:?}, but layer {} ({}) expects {shape:?}; {hint}",
                    tensor.dims(),
                    slot.path,
                    slot.kind
                ));
            }
            check_values(&name, suffix, &tensor)?;
            renamed.push((target, tensor));
        }
    }
    Ok(renamed)
}

/// Checks the values of the state dict tensor `name`, the parameter
/// `suffix` of its module. Every value must be finite, because a NaN or
/// infinite parameter makes every output it reaches NaN or infinite, and a
/// BatchNorm's `running_var` must be >= 0.
fn check_values(name: &str, suffix: &str, tensor: &Tensor) -> std::result::Result<(), String> {
    let values = tensor
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(|e| e.to_string())?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "tensor {name} has the non-finite value {} at flat index {index}; remove or replace \
             the non-finite values in the PyTorch model (e.g. retrain, or torch.nan_to_num) and \
             save the state dict again",
            values[index]
        ));
    }
    if suffix == "running_var" {
        if let Some(index) = values.iter().position(|&v| v < 0.0) {
            return Err(format!(
                "tensor {name} has the negative variance {} at index {index}; a running variance \
                 is >= 0, so save the state dict again from the trained model",
                values[index]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_compares_numbers() {
        let mut names = vec![
            "features.10",
            "classifier",
            "features.2",
            "features.1.0",
            "0",
            "fc",
        ];
        names.sort_by(|a, b| natural_order(a, b));
        assert_eq!(
            names,
            [
                "0",
                "classifier",
                "fc",
                "features.1.0",
                "features.2",
                "features.10"
            ]
        );
    }

    #[test]
    fn prefix_is_all_but_the_last_part() {
        assert_eq!(prefix_of("features.0.weight"), "features.0");
        assert_eq!(prefix_of("weight"), "");
    }

    #[test]
    fn safetensors_magic_needs_a_json_header() {
        let file = b"\x07\0\0\0\0\0\0\0{\"a\":1}";
        assert!(is_safetensors(file, file.len() as u64));
        assert!(!is_safetensors(file, 10), "a header longer than the file");
        assert!(!is_safetensors(b"\x08\x01\x12\x00", 4));
        assert!(
            !is_safetensors(b"\x08\x01\x12\x00\0\0\0\0{", 100),
            "an ONNX-like header length"
        );
    }
}
