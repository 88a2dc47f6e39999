#!/usr/bin/env python3
"""Loads a `trainer export` file into torchvision and compares features with the trainer's.

    trainer export --checkpoint RUN --out r18.safetensors --probe probe.safetensors
    python3 tools/check_export.py r18.safetensors probe.safetensors resnet18
Needs torch, torchvision and safetensors. Exits non-zero if a key other than fc.* is missing, a
key is unexpected, or the features differ by more than 1e-4 (relative).
"""
import sys

import torch
import torchvision
from safetensors.torch import load_file

weights, probe, arch = sys.argv[1], sys.argv[2], sys.argv[3]
model = getattr(torchvision.models, arch)()
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
