#!/usr/bin/env python3
"""Reference for `trainer bench convs`: PyTorch's convolutions on the same shapes.

Reads the JSON that `trainer bench convs --json` prints (a file, or - for stdin), times
`torch.nn.functional.conv2d` and `torch.ops.aten.convolution_backward` (weight gradient, and
input gradient where the trainer computes one) on as many images, and prints the same JSON with
PyTorch's times in place of ours: one warm-up call, then the median of --reps calls.

    trainer bench convs --preset byol-r18-imagenet --batch 32 --size 64 --json > ours.json
    python3 tools/bench_torch_convs.py ours.json --threads 2
"""
import argparse
import json
import statistics
import sys
import time

import torch


def median_ms(reps, run):
    run()
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median_high(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", help="`trainer bench convs --json` output, or - for stdin")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=9, help="timed calls of each pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = sys.stdin.read() if args.shapes == "-" else open(args.shapes).read()
    ours = json.loads(text.strip().splitlines()[-1])
    n = ours["convs"]["images"]
    layers = []
    for layer in ours["convs"]["layers"]:
        c, side, co, k = layer["c_in"], layer["side"], layer["c_out"], layer["k"]
        s, p = layer["stride"], layer["padding"]
        x = torch.randn(n, c, side, side)
        w = torch.randn(co, c, k, k) * 0.1
        dy = torch.randn_like(torch.nn.functional.conv2d(x, w, stride=s, padding=p))
        mask = [layer["input_gradient"], True, False]

        def forward():
            torch.nn.functional.conv2d(x, w, stride=s, padding=p)

        def backward():
            torch.ops.aten.convolution_backward(
                dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

        layers.append(dict(layer, forward_ms=median_ms(args.reps, forward),
                           backward_ms=median_ms(args.reps, backward)))
    total = lambda key: sum(l["count"] * l[key] for l in layers)
    print(json.dumps({
        "library": f"torch {torch.__version__}",
        "instruction_set": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "convs": {"images": n, "layers": layers, "forward_ms": total("forward_ms"),
                  "backward_ms": total("backward_ms")},
    }))


if __name__ == "__main__":
    main()
