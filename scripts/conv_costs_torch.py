"""PyTorch's side of `cargo run --release --example conv_costs` (BENCHMARKS.md, "Convolution
backward"): the same layers, the same protocol (forward, then forward + backward of the sum
with the input and the kernel tracking gradients, alternated in one process, 16 rounds of
which the first is dropped; the fastest and the median of each, and backward : forward from
the fastest), on PyTorch's CPU kernels.

Run it with the peers' virtual environment (../shared/peers/README.md), back to back with
the example:

    /tmp/peers-venv/bin/python scripts/conv_costs_torch.py [--threads N]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def layers():
    out = []
    for k in [(3, 3, 3), (3, 1, 1), (1, 3, 3)]:
        pad = tuple(d // 2 for d in k)
        # Ours takes [N, T, C, H, W]; PyTorch's conv3d takes [N, C, T, H, W].
        out.append((
            "conv3d %dx%dx%d, [2, 8, 64, 28, 28] -> 64" % k,
            (2, 64, 8, 28, 28),
            (64, 64) + k,
            lambda x, w, pad=pad: F.conv3d(x, w, padding=pad),
        ))
    for name, (n, ci, h, co, stride) in [
        ("conv2d resnet 3x3, [8, 64, 56, 56] -> 64", (8, 64, 56, 64, 1)),
        ("conv2d small cnn 3x3/2, [80, 16, 16, 16] -> 32", (80, 16, 16, 32, 2)),
    ]:
        out.append((
            name,
            (n, ci, h, h),
            (co, ci, 3, 3),
            lambda x, w, stride=stride: F.conv2d(x, w, stride=stride, padding=1),
        ))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("torch %s, %d threads" % (torch.__version__, torch.get_num_threads()))
    print("layer | forward min / median ms | fwd+bwd min / median ms | bwd : fwd (min)")
    for name, xs, ws, f in layers():
        x = torch.randn(xs, requires_grad=True)
        w = torch.randn(ws, requires_grad=True)
        fwd, both = [], []
        for r in range(16):
            t = time.perf_counter()
            y = f(x, w)
            del y
            a = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            y = f(x, w)
            y.sum().backward()
            x.grad, w.grad = None, None
            del y
            b = (time.perf_counter() - t) * 1e3
            if r > 0:
                fwd.append(a)
                both.append(b)
        fwd.sort()
        both.sort()
        f_min, f_med = fwd[0], fwd[len(fwd) // 2]
        b_min, b_med = both[0], both[len(both) // 2]
        print("%s | %.2f / %.2f | %.2f / %.2f | %.2f"
              % (name, f_min, f_med, b_min, b_med, (b_min - f_min) / f_min))


if __name__ == "__main__":
    main()
