//! The non-negative optimizers keep every parameter >= 0, and the
//! sign-preserving one keeps every sign and every zero.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use isonn::optim::{Momentum, Optimizer, Projected, Sgd, SignPreserving};
use proptest::prelude::*;

/// Runs one step of `optimizer` on `var` with gradient `g`.
fn step_with(optimizer: &mut dyn Optimizer, var: &Var, g: &Tensor) {
    let loss = var.as_tensor().mul(g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    optimizer.step(std::slice::from_ref(var), &grads).unwrap();
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn parameters_and_gradients() -> impl Strategy<Value = (Vec<f64>, Vec<Vec<f64>>)> {
    let p = prop::collection::vec(prop_oneof![Just(0.0), 1e-30f64..1e-20, 0.0f64..10.0], 1..40);
    p.prop_flat_map(|p| {
        let n = p.len();
        let g = prop::collection::vec(prop::collection::vec(-1e4f64..1e4, n), 1..12);
        (Just(p), g)
    })
}

fn momentum_strategy() -> impl Strategy<Value = Momentum> {
    prop_oneof![
        Just(Momentum::None),
        (0.0f64..0.99).prop_map(Momentum::Gradient),
        (0.0f64..0.99).prop_map(Momentum::Tanh),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sign_preserving_keeps_signs_and_zeros(
        (p, gs) in parameters_and_gradients(),
        lr_in in 0.0f64..20.0,
        lr_out in 0.01f64..=1.0,
        momentum in momentum_strategy(),
        f64_params in any::<bool>(),
    ) {
        let dtype = if f64_params { DType::F64 } else { DType::F32 };
        let device = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(p.as_slice(), &device).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let mut optimizer = SignPreserving::new(lr_in, lr_out, momentum).unwrap();
        let mut previous = values(var.as_tensor());
        let mut zeroed = 0usize;
        for g in &gs {
            let g = Tensor::new(g.as_slice(), &device).unwrap().to_dtype(dtype).unwrap();
            step_with(&mut optimizer, &var, &g);
            let now = values(var.as_tensor());
            for (before, after) in previous.iter().zip(&now) {
                prop_assert!(*after >= 0.0, "negative parameter {after}");
                prop_assert!(after.is_finite(), "non-finite parameter {after}");
                if *before == 0.0 {
                    prop_assert_eq!(*after, 0.0, "a zero became non-zero");
                } else if *after == 0.0 {
                    zeroed += 1;
                }
            }
            previous = now;
        }
        prop_assert_eq!(optimizer.zeroed(), zeroed, "zeroed entries are counted");
    }

    #[test]
    fn projected_keeps_parameters_non_negative(
        (p, gs) in parameters_and_gradients(),
        lr in 0.0f64..1.0,
        momentum in 0.0f64..0.99,
    ) {
        let device = Device::Cpu;
        let var = Var::new(p.as_slice(), &device).unwrap();
        let mut optimizer = Projected::new(lr, momentum).unwrap();
        for g in &gs {
            step_with(&mut optimizer, &var, &Tensor::new(g.as_slice(), &device).unwrap());
            for v in values(var.as_tensor()) {
                prop_assert!(v >= 0.0, "negative parameter {v}");
            }
        }
    }

    #[test]
    fn zero_rates_change_nothing((p, gs) in parameters_and_gradients(), lr_out in 0.01f64..=1.0) {
        let device = Device::Cpu;
        let optimizers: Vec<Box<dyn Optimizer>> = vec![
            Box::new(SignPreserving::new(0.0, lr_out, Momentum::None).unwrap()),
            Box::new(SignPreserving::new(0.0, lr_out, Momentum::Tanh(0.9)).unwrap()),
            Box::new(Projected::new(0.0, 0.0).unwrap()),
            Box::new(Sgd::new(0.0, 0.5, 0.0).unwrap()),
        ];
        for mut optimizer in optimizers {
            let var = Var::new(p.as_slice(), &device).unwrap();
            for g in &gs {
                step_with(optimizer.as_mut(), &var, &Tensor::new(g.as_slice(), &device).unwrap());
            }
            prop_assert_eq!(values(var.as_tensor()), p.clone());
        }
    }
}

#[test]
fn sign_preserving_matches_formula() {
    let device = Device::Cpu;
    let p = [0.5f64, 2.0, 0.0, 1.0];
    let g = [0.1f64, -3.0, 5.0, 0.0];
    let (lr_in, lr_out) = (0.7, 0.3);
    let var = Var::new(&p, &device).unwrap();
    let mut optimizer = SignPreserving::new(lr_in, lr_out, Momentum::None).unwrap();
    step_with(&mut optimizer, &var, &Tensor::new(&g, &device).unwrap());
    for ((p, g), got) in p.iter().zip(g).zip(values(var.as_tensor())) {
        let want = p - lr_out * p.abs() * (lr_in * g).tanh();
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }
}

#[test]
fn projected_matches_formula() {
    let device = Device::Cpu;
    let var = Var::new(&[0.5f64, 0.1, 2.0], &device).unwrap();
    let mut optimizer = Projected::new(0.2, 0.0).unwrap();
    step_with(&mut optimizer, &var, &Tensor::new(&[1.0f64, 1.0, -1.0], &device).unwrap());
    let got = values(var.as_tensor());
    let want = [0.3, 0.0, 2.2];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-15, "{got:?} vs {want:?}");
    }
}

/// With lr_out = 1 and a gradient large enough that tanh rounds to 1, the
/// factor 1 - lr_out * t is exactly 0: the entry becomes 0 for good.
#[test]
fn saturated_tanh_zeroes_and_counts() {
    let device = Device::Cpu;
    let var = Var::new(&[1.0f32, 2.0, 3.0], &device).unwrap();
    let mut optimizer = SignPreserving::new(1.0, 1.0, Momentum::None).unwrap();
    step_with(&mut optimizer, &var, &Tensor::new(&[100.0f32, 0.01, 100.0], &device).unwrap());
    assert_eq!(values(var.as_tensor())[0], 0.0);
    assert_eq!(values(var.as_tensor())[2], 0.0);
    assert!(values(var.as_tensor())[1] > 0.0);
    assert_eq!(optimizer.zeroed(), 2);
    step_with(&mut optimizer, &var, &Tensor::new(&[-100.0f32, 0.0, -100.0], &device).unwrap());
    assert_eq!(values(var.as_tensor())[0], 0.0, "a zero never moves again");
}

/// The reference code's momentum `m <- beta m + t` grows to 1 / (1 - beta)
/// and flips signs; the bounded average used here does not.
#[test]
fn bounded_tanh_momentum_never_flips() {
    let beta = 0.9;
    let (mut unbounded, mut bounded) = (0.0f64, 0.0f64);
    let (mut p_reference, mut p_ours) = (1.0f64, 1.0f64);
    for _ in 0..3 {
        let t = 1.0f64.tanh(); // a constant gradient of 1 with lr_in 1
        unbounded = beta * unbounded + t;
        bounded = beta * bounded + (1.0 - beta) * t;
        p_reference *= 1.0 - 1.0 * unbounded;
        p_ours *= 1.0 - 1.0 * bounded;
    }
    assert!(p_reference < 0.0 || unbounded > 1.0, "the reference form leaves (-1, 1): m = {unbounded}");
    assert!(bounded.abs() < 1.0);
    assert!(p_ours > 0.0);

    let device = Device::Cpu;
    let var = Var::new(&[1.0f64], &device).unwrap();
    let mut optimizer = SignPreserving::new(1.0, 1.0, Momentum::Tanh(beta)).unwrap();
    for _ in 0..200 {
        step_with(&mut optimizer, &var, &Tensor::new(&[50.0f64], &device).unwrap());
        assert!(values(var.as_tensor())[0] >= 0.0);
    }
}

#[test]
fn invalid_settings_are_rejected() {
    for lr_out in [0.0, -0.5, 1.5, f64::NAN] {
        let message = SignPreserving::new(0.3, lr_out, Momentum::None).unwrap_err().to_string();
        assert!(message.contains("--lr-out"), "{message}");
        assert!(message.contains("(0, 1]"), "{message}");
        assert!(message.contains("flip"), "the message explains why: {message}");
    }
    assert!(SignPreserving::new(-1.0, 0.5, Momentum::None).is_err());
    assert!(SignPreserving::new(0.3, 0.5, Momentum::Gradient(1.0)).is_err());
    assert!(Projected::new(-0.1, 0.0).is_err());
    assert!(Projected::new(0.1, 1.2).is_err());
    assert!(Sgd::new(f64::INFINITY, 0.0, 0.0).is_err());
}

/// Returns a scalar that depends on every logit with a different weight.
fn weighted_sum(logits: &Tensor) -> Tensor {
    let weights = Tensor::arange(0.0f64, logits.elem_count() as f64, &Device::Cpu)
        .unwrap()
        .reshape(logits.dims())
        .unwrap()
        .affine(0.01, -0.3)
        .unwrap();
    logits.mul(&weights).unwrap().sum_all().unwrap()
}

/// Autograd through the physical forward pass of a non-negative network
/// agrees with central finite differences, for P, N and the biases.
#[test]
fn nonneg_gradients_match_finite_differences() {
    use isonn::model::Range;
    use isonn::nonneg::{transform, NonnegLayer, TransformOptions};
    for (seed, cnn) in [(1u64, false), (2, true), (3, false)] {
        let range = Range { lo: 0.0, hi: 1.0 };
        let network = if cnn {
            common::random_cnn(seed, DType::F64, range)
        } else {
            common::random_mlp(seed, DType::F64, range)
        };
        let mut nonneg = transform(&network, &TransformOptions::default()).unwrap();
        let x = common::random_inputs(seed, &network, 3, DType::F64);
        let probe = |n: &isonn::nonneg::NonnegNetwork| -> f64 {
            weighted_sum(&n.forward(&x).unwrap()).to_scalar::<f64>().unwrap()
        };
        let vars = nonneg.make_trainable().unwrap();
        let grads = weighted_sum(&nonneg.forward(&x).unwrap()).backward().unwrap();
        let frozen = nonneg.to_dtype(DType::F64).unwrap();
        let h = 1e-6;
        let mut slot = 0;
        for (layer_index, layer) in frozen.layers.iter().enumerate() {
            let NonnegLayer::Affine(a) = layer else { continue };
            for (which, tensor) in a.parameters().iter().enumerate() {
                let grad = values(grads.get(&vars[slot]).unwrap());
                slot += 1;
                let base = values(tensor);
                for j in (0..base.len()).step_by((base.len() / 4).max(1)) {
                    let nudge = |delta: f64| {
                        let mut changed = frozen.clone();
                        let NonnegLayer::Affine(b) = &mut changed.layers[layer_index] else { unreachable!() };
                        let mut v = base.clone();
                        v[j] += delta;
                        let t = Tensor::from_vec(v, tensor.dims(), &Device::Cpu).unwrap();
                        *b.parameters_mut()[which] = t;
                        probe(&changed)
                    };
                    let numeric = (nudge(h) - nudge(-h)) / (2.0 * h);
                    assert!(
                        (grad[j] - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
                        "layer {layer_index} tensor {which} entry {j}: autograd {} vs {numeric}",
                        grad[j]
                    );
                }
            }
        }
    }
}
