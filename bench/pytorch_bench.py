#!/usr/bin/env python3
"""PyTorch versions of the `isonn bench` training workloads, for side-by-side runs.

Trains the MLP 784-100-200-10 and the MNIST-size CNN (conv 1->32 k3, 32->32
k3 s2, 32->64 k3, 64->64 k3 s2, fc 1024->128->10) with the photonic sigmoid on
synthetic batches of random images, as `isonn bench` does:

- regular-train: forward, cross-entropy, backward and an SGD step (lr 0.01);
- nonneg-train: the physical non-negative forward `P u + N (alpha - u) + bias`
  with two GEMMs (or convolutions) per layer, as the method's reference code
  computes it, then backward and the sign-preserving step
  `p <- p - lr_out |p| tanh(lr_in g)` (lr_in 0.28, lr_out 0.3).

Each workload runs 3 warm-up batches, then `--repetitions` timed runs of
`--batches` batches (the CNN runs a tenth, at least 2, like `isonn bench`).
Needs torch and numpy; CI does not run it.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

# Fitted constants of the photonic sigmoid, as in isonn's activation module.
A1, A2, X0, D, CUTOFF = 0.060, 1.005, 0.145, 0.033, 2.0
ALPHA = A2 - A1  # width of a hidden signal's range
SHIFT = X0  # keeps the shifted pre-activations on the steep part


def photonic_sigmoid(x):
    t = (torch.clamp(x, max=X0 + CUTOFF) - X0) / D
    return A1 + (A2 - A1) * torch.sigmoid(t)


def xavier(shape, generator):
    fan_out, fan_in = shape[0], 1
    for d in shape[1:]:
        fan_in *= d
    if len(shape) == 4:
        fan_out *= shape[2] * shape[3]
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def layer_specs(model):
    """Returns (kind, weight shape, stride) per affine layer."""
    if model == "mlp":
        return [("linear", (100, 784), 1), ("linear", (200, 100), 1), ("linear", (10, 200), 1)]
    return [
        ("conv", (32, 1, 3, 3), 1),
        ("conv", (32, 32, 3, 3), 2),
        ("conv", (64, 32, 3, 3), 1),
        ("conv", (64, 64, 3, 3), 2),
        ("linear", (128, 1024), 1),
        ("linear", (10, 128), 1),
    ]


def affine(kind, u, weight, stride):
    if kind == "linear":
        return u.flatten(1) @ weight.t()
    return F.conv2d(u, weight, stride=stride)


def regular_workload(model, x, y, generator):
    specs = layer_specs(model)
    params = []
    for _, shape, _ in specs:
        params.append(xavier(shape, generator).requires_grad_())
        params.append(torch.zeros(shape[0]).requires_grad_())

    def step():
        h = x
        for i, (kind, _, stride) in enumerate(specs):
            w, b = params[2 * i], params[2 * i + 1]
            z = affine(kind, h, w, stride)
            z = z + (b if kind == "linear" else b.view(1, -1, 1, 1))
            h = photonic_sigmoid(z) if i + 1 < len(specs) else z
        loss = F.cross_entropy(h, y)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.01 * p.grad

    return step


def nonneg_workload(model, x, y, generator, lr_in=0.28, lr_out=0.3):
    specs = layer_specs(model)
    params = []
    for _, shape, _ in specs:
        w = xavier(shape, generator)
        params.append(w.clamp(min=0).requires_grad_())  # P
        params.append((-w).clamp(min=0).requires_grad_())  # N
        params.append(torch.full((shape[0],), SHIFT).requires_grad_())  # shifted bias

    def step():
        u, alpha = x, 1.0
        for i, (kind, _, stride) in enumerate(specs):
            p, n, b = params[3 * i], params[3 * i + 1], params[3 * i + 2]
            complement = torch.relu(alpha - u)
            z = affine(kind, u, p, stride) + affine(kind, complement, n, stride)
            z = z + (b if kind == "linear" else b.view(1, -1, 1, 1))
            if i + 1 < len(specs):
                u = torch.clamp(photonic_sigmoid(z - SHIFT), A1, A2) - A1
                alpha = ALPHA
            else:
                u = z
        loss = F.cross_entropy(u, y)
        for q in params:
            q.grad = None
        loss.backward()
        with torch.no_grad():
            for q in params:
                q -= lr_out * q.abs() * torch.tanh(lr_in * q.grad)

    return step


def measure(model, workload, batches, batch_size, repetitions):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch_size, 1, 28, 28), generator=generator)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    build = regular_workload if workload == "regular-train" else nonneg_workload
    step = build(model, x, y, generator)
    for _ in range(min(batches, 3)):
        step()
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(batches):
            step()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    images_per_second = batches * batch_size / median
    return {
        "arch": model,
        "workload": workload,
        "batches": batches,
        "batch_size": batch_size,
        "seconds": seconds,
        "min_seconds": min(seconds),
        "median_seconds": median,
        "max_seconds": max(seconds),
        "images_per_second": images_per_second,
        "seconds_per_epoch": 60000 / images_per_second,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--workloads", default="regular-train,nonneg-train", help="comma-separated")
    parser.add_argument("--batches", type=int, default=100, help="batches per repetition for the MLP")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    parser.add_argument("--repetitions", type=int, default=5, help="timed repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    print(f"torch {environment['torch']}, {environment['threads']} thread(s), load average {environment['load_average']:.2f}")
    print("| model | workload | batches x size | min s | median s | max s | images/s | s per 60k epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    measurements = []
    for model in args.models.split(","):
        count = args.batches if model == "mlp" else max(args.batches // 10, 2)
        for workload in args.workloads.split(","):
            m = measure(model, workload, count, args.batch_size, args.repetitions)
            print(
                f"| {model} | {workload} | {count} x {args.batch_size} | {m['min_seconds']:.3f} | "
                f"{m['median_seconds']:.3f} | {m['max_seconds']:.3f} | {m['images_per_second']:.0f} | "
                f"{m['seconds_per_epoch']:.2f} |"
            )
            measurements.append(m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "measurements": measurements}, f, indent=2)


if __name__ == "__main__":
    main()
