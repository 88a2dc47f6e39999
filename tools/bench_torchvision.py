#!/usr/bin/env python3
"""The reference input pipeline: torchvision's BYOL transform on PIL images, one thread.

Usage: bench_torchvision.py FOLDER [--short-side 256] [--samples 256] [--repeats 3]
Loads every JPEG in FOLDER once, resizes it so the short side is --short-side (what the shards
hold), then times making both BYOL views (RandomResizedCrop 224 bicubic, flip, ColorJitter
(0.4, 0.4, 0.2, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur(23) p 1.0 / 0.1, RandomSolarize
p 0.0 / 0.2, ToTensor, Normalize) per sample. Prints one JSON object with the median samples/s.
Needs torch, torchvision and Pillow.
"""
import argparse
import glob
import json
import os
import statistics
import time

import torch
import torchvision
from PIL import Image
from torchvision import transforms as T


def view(blur_p, solarize_p):
    return T.Compose([
        T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(128, p=solarize_p),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = []
    for f in sorted(glob.glob(os.path.join(a.folder, "*.jpg"))):
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = a.short_side
        images.append(img.resize((s, s * h // w) if w < h else (s * w // h, s), Image.BILINEAR))
    v1, v2 = view(1.0, 0.0), view(0.1, 0.2)
    rates = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for k in range(a.samples):
            img = images[k % len(images)]
            v1(img), v2(img)
        rates.append(a.samples / (time.perf_counter() - t))
    print(json.dumps({"samples_per_second": statistics.median(rates), "runs": rates,
                      "torch": torch.__version__, "torchvision": torchvision.__version__}))


if __name__ == "__main__":
    main()
