#!/usr/bin/env python3
"""Loads a `trainer export` file into torchvision and compares features with the trainer's.

    trainer export --checkpoint RUN --out r18.safetensors --probe probe.safetensors
    python3 tools/check_export.py r18.safetensors probe.safetensors
Needs torch, torchvision and safetensors. The model is built as the export's metadata says
(`arch`, `stem`: torchvision's ImageNet stem, or the small stem of the `*-small` presets, a 3x3
stride-1 conv1 and no max-pool). Exits non-zero if the export's width has no torchvision model, a
key other than fc.* is missing, a key is unexpected, or the features differ by more than 1e-4
(relative). An optional third argument names the architecture for exports without metadata.
"""
import sys

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

weights, probe = sys.argv[1], sys.argv[2]
with safe_open(weights, "pt") as f:
    meta = f.metadata() or {}
arch = meta.get("arch") or sys.argv[3]
stem = meta.get("stem", "imagenet")
print(f"export: {arch}, {stem} stem, width {meta.get('width', '1')}; torchvision: {meta.get('torchvision', '?')}")
if float(meta.get("width", "1")) != 1.0:
    sys.exit(f"no torchvision model has this backbone's width: {meta['torchvision']}")
model = getattr(torchvision.models, arch)()
if stem == "small":
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
result = model.load_state_dict(load_file(weights), strict=False)
print("missing:", result.missing_keys)
print("unexpected:", result.unexpected_keys)
assert all(k.startswith("fc.") for k in result.missing_keys), "missing backbone keys"
assert not result.unexpected_keys, "unexpected keys"
model.fc = torch.nn.Identity()
model.eval()
p = load_file(probe)
with torch.no_grad():
    ours = p["probe.features"]
    theirs = model(p["probe.input"])
rel = ((ours - theirs).norm() / theirs.norm()).item()
print(f"features {tuple(theirs.shape)}: relative difference {rel:.2e}")
assert rel < 1e-4, "features differ"
