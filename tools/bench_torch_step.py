#!/usr/bin/env python3
"""Reference for `trainer bench`: the same two-view step in PyTorch.

torchvision ResNet (18 or 50), projector and predictor MLPs (C -> hidden -> 256), an EMA target
(backbone + projector), the symmetric BYOL loss on global-average-pooled C5, SGD with momentum.
Prints one JSON object with `views_per_second` (median over the timed steps).

    python3 tools/bench_torch_step.py --arch resnet18 --size 32 --batch 32 --threads 2
    python3 tools/bench_torch_step.py --arch resnet50 --size 224 --batch 128 --device cuda --bf16
    python3 tools/bench_torch_step.py --small-stem --width 0.25 --size 32 --batch 64 \
        --hidden 512 --dim 128   # the demo's backbone and heads
"""
import argparse
import copy
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models.resnet as R


def mlp(c_in, hidden, out):
    return nn.Sequential(nn.Linear(c_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def scaled_resnet(arch, width):
    """torchvision's ResNet with every stage's width multiplied by `width` (rounded, as the trainer
    does); torchvision itself only scales the bottleneck's inner width."""
    if width == 1.0:
        return getattr(torchvision.models, arch)()
    block, layers = {"resnet18": (R.BasicBlock, [2, 2, 2, 2]),
                     "resnet50": (R.Bottleneck, [3, 4, 6, 3])}[arch]
    widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    net = R.ResNet(block, layers)
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    for i, (c, n) in enumerate(zip(widths, layers)):
        setattr(net, f"layer{i + 1}", net._make_layer(block, c, n, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(widths[3] * block.expansion, 1000)
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256, help="projection (and prediction) size")
    ap.add_argument("--small-stem", action="store_true")
    ap.add_argument("--width", type=float, default=1.0, help="stage width multiplier")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)

    backbone = scaled_resnet(a.arch, a.width)
    if a.small_stem:
        backbone.conv1 = nn.Conv2d(3, backbone.conv1.out_channels, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    feat = backbone.fc.in_features
    backbone.fc = nn.Identity()
    online = nn.Sequential(backbone, mlp(feat, a.hidden, a.dim)).to(dev)
    predictor = mlp(a.dim, a.hidden, a.dim).to(dev)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    if a.channels_last:
        online = online.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last)
    params = list(online.parameters()) + list(predictor.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    x = torch.randn(2 * a.batch, 3, a.size, a.size, device=dev)
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def loss_fn(p, z):
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            p = predictor(online(x))
            with torch.no_grad():
                z = target(x)
            p1, p2 = p.float().chunk(2)
            z1, z2 = z.float().chunk(2)
            loss = (loss_fn(p1, z2) + loss_fn(p2, z1)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(0.99).add_(po.detach(), alpha=0.01)
        return loss

    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(a.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"arch": a.arch, "width": a.width, "size": a.size, "batch": a.batch,
                      "device": a.device, "bf16": a.bf16, "threads": a.threads, "step_ms": med * 1e3,
                      "views_per_second": 2 * a.batch / med,
                      "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}))


if __name__ == "__main__":
    main()
