#!/usr/bin/env python3
"""Writes torchvision's ResNet state_dict keys and shapes, one `name dim,dim,...` per line, to
trainer/tests/fixtures/<arch>_state_dict.txt. The trainer's tests compare its parameter names and
shapes (and `trainer export`'s output) against these lists.

    python3 tools/make_torchvision_keys.py   # needs torch and torchvision
"""
import pathlib

import torchvision

out = pathlib.Path(__file__).resolve().parent.parent / "trainer" / "tests" / "fixtures"
out.mkdir(parents=True, exist_ok=True)
for arch in ["resnet18", "resnet34", "resnet50"]:
    model = getattr(torchvision.models, arch)()
    lines = [f"{k} {','.join(str(d) for d in v.shape)}" for k, v in model.state_dict().items()]
    (out / f"{arch}_state_dict.txt").write_text("\n".join(lines) + "\n")
    print(arch, len(lines))
