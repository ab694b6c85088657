#!/usr/bin/env python3
"""PyTorch on the same GPU, for the ratios in BENCHMARKS.md's "GPU (CUDA)" section.

    python3 scripts/gpu_peers_torch.py --peers ../shared/peers [--device cuda:0] [--json OUT]

Measures what `vdg device throughput --scale paper` measures, with PyTorch on the same device:
  - one small operation (an add of two 40 x 256 float32 tensors, in chains of 1000): what
    each op of a graph of small ops costs the host;
  - the APN step on 2048-d features (B = 40, M = 5, D = 256, FFN 1024), plain and with
    Algorithm 1 (ADA*), by running ../shared/peers/apn_torch.py's own model and steps on the
    GPU (its batch and model moved there, the device synchronised after every step);
  - torchvision ResNet-50 inference (eval mode, no grad) on 64 frames of 224 x 224, float32,
    once with cuDNN's TF32 convolutions (PyTorch's default) and once without (the float32
    arithmetic vdg's kernels do).
Random weights and data; speed does not depend on them. Prints one line per measurement and
writes them as JSON.
"""
import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch


def load_peer(peers):
    spec = importlib.util.spec_from_file_location("apn_torch", f"{peers}/apn_torch.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["apn_torch"] = mod
    spec.loader.exec_module(mod)
    return mod


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, min_time, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_time:
        fn()
        sync()
        n += 1
    return (time.perf_counter() - t0) / n, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", required=True, help="folder holding apn_torch.py")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--min-time", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="gpu-peers.json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []

    def report(work, shapes, per_second, unit, extra=""):
        rows.append(dict(work=work, shapes=shapes, per_second=per_second, unit=unit, note=extra))
        print(f"torch {torch.__version__} {name}: {work} ({shapes}){extra}: "
              f"{per_second:.1f} {unit}/s", flush=True)

    # One small operation (vdg's `small_op` row): chains of 1000 adds of 40 x 256 float32.
    x0 = torch.randn(40, 256, device=dev)
    b = torch.randn(40, 256, device=dev)

    def chain():
        x = x0
        for _ in range(1000):
            x = x + b

    secs = [timed(chain, min(a.min_time, 2.0))[0] for _ in range(a.reps)]
    report("small_op", "add of two 40x256 float32 tensors, chains of 1000",
           1000 / statistics.median(secs), "ops", f" [median of {a.reps}]")

    peer = load_peer(a.peers)
    peer.LR = 0.001
    gen = torch.Generator().manual_seed(0)
    for key, step in (("plain", peer.plain_step), ("ada_star", peer.ada_step)):
        torch.manual_seed(0)
        peer.random.seed(0)
        model = peer.build("apn", "feat", 12, 256, 5, 1024).to(dev).train()
        opt = peer.sgd(model)
        x, y = peer.make_batch("feat", 40, 5, 12, gen)
        x, y = x.to(dev), y.to(dev)
        secs = [timed(lambda: step(model, opt, x, y), a.min_time)[0] for _ in range(a.reps)]
        report(f"apn_step_{key}", "B=40, M=5, 2048-d features, D=256, FFN 1024, 12 classes",
               40 / statistics.median(secs), "clips",
               f" [median of {a.reps}; min-max {40 / max(secs):.1f}-{40 / min(secs):.1f}]")

    import torchvision

    net = torchvision.models.resnet50().eval().to(dev)
    frames = torch.randn(64, 3, 224, 224, generator=gen).to(dev)
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad():
            secs = [timed(lambda: net(frames), a.min_time)[0] for _ in range(a.reps)]
        report("resnet50_inference", "64 frames of 224x224", 64 / statistics.median(secs), "frames",
               f" [cuDNN TF32 {'on (default)' if tf32 else 'off'}; median of {a.reps}]")
    with open(a.json, "w") as f:
        json.dump(dict(torch=torch.__version__, device=name, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
