//! A builder for ONNX graphs: nodes named after the isonn layer they come
//! from, with their constants stored as initializers.

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use super::tensor::float_tensor;

/// The ONNX opset the exported graphs use. Opset 13 takes `Clip` bounds,
/// `Dropout` ratios and `Pad` amounts as inputs, as PyTorch exports them.
pub const OPSET: i64 = 13;

/// The ONNX IR version of exported files (8 goes with opsets up to 18).
pub const IR_VERSION: i64 = 8;

/// An ONNX graph under construction. Each node's single output has the
/// node's name, so a node name is also the name of the tensor it produces.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

/// Builds an integer-list attribute.
pub fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// Builds an integer attribute.
pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// Builds a float attribute.
pub fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

impl GraphBuilder {
    /// Adds a node `name` of `op` reading `inputs`; returns its output name,
    /// which is `name`.
    pub fn node(&mut self, op: &str, name: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute: attributes,
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a float initializer; returns its name.
    pub fn initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        self.initializers.push(float_tensor(name, dims, values));
        name.to_string()
    }

    /// Adds a scalar float initializer; returns its name.
    pub fn scalar(&mut self, name: &str, value: f64) -> String {
        self.initializer(name, &[], &[value as f32])
    }

    /// Adds an initializer of any type; returns its name.
    pub fn tensor(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name.clone().unwrap_or_default();
        self.initializers.push(tensor);
        name
    }

    /// Finishes the graph as a model with one float input `input` of shape
    /// `[batch, input_shape...]` and one output `output` of shape
    /// `[batch, output_shape...]`, the batch size left symbolic.
    pub fn finish(
        self,
        graph_name: &str,
        input: (&str, &[usize]),
        output: (&str, &[usize]),
        doc: &str,
    ) -> ModelProto {
        let value_info = |name: &str, shape: &[usize]| {
            let mut dims = vec![tensor_shape_proto::Dimension {
                value: Some(tensor_shape_proto::dimension::Value::DimParam("batch".into())),
                ..Default::default()
            }];
            dims.extend(shape.iter().map(|&d| tensor_shape_proto::Dimension {
                value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                ..Default::default()
            }));
            ValueInfoProto {
                name: Some(name.to_string()),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: Some(DataType::Float as i32),
                        shape: Some(TensorShapeProto { dim: dims }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("isonn".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.to_string()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some(graph_name.to_string()),
                initializer: self.initializers,
                input: vec![value_info(input.0, input.1)],
                output: vec![value_info(output.0, output.1)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
