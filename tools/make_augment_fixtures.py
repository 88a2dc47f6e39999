#!/usr/bin/env python3
"""Reference outputs of each augmentation for fixed parameters (tests/fixtures/augment).

The references follow torchvision's functional ops on PIL images (torchvision.transforms.functional
with a PIL input calls exactly these Pillow functions); Gaussian blur follows torchvision's tensor
kernel (the PIL path converts to a tensor for it) in numpy. Run once with Pillow and numpy
installed (`pip install pillow numpy`); the output is committed.
Checked on 2026-11-27 against torchvision 0.29.2 itself (torchvision.transforms.functional on the
same PIL input): every reference is identical, except one pixel off by 1 in each blur.
Usage: make_augment_fixtures.py [PHOTO]   (default ../shared/data/photos/0000.jpg)
"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "augment")


def hue(img, factor):
    # torchvision.transforms.functional_pil.adjust_hue
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.array(factor * 255).astype(np.int8).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def blur(img, ksize, sigma):
    # torchvision.transforms.functional_tensor.gaussian_blur: reflect padding, float conv, round.
    x = np.arange(ksize, dtype=np.float32) - (ksize - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    a = np.asarray(img, dtype=np.float32)
    r = ksize // 2
    p = np.pad(a, ((r, r), (r, r), (0, 0)), mode="reflect")
    h = sum(k[t] * p[:, t:t + a.shape[1], :] for t in range(ksize))
    v = sum(k[t] * h[t:t + a.shape[0], :, :] for t in range(ksize))
    return Image.fromarray(np.clip(np.round(v), 0, 255).astype(np.uint8), "RGB")


def main():
    photo = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "shared", "data", "photos", "0000.jpg")
    os.makedirs(OUT, exist_ok=True)
    src = Image.open(photo).convert("RGB")
    src = src.crop((40, 30, 40 + 96, 30 + 72))
    src.save(os.path.join(OUT, "input.png"))
    cases = {
        "brightness_1.3": ImageEnhance.Brightness(src).enhance(1.3),
        "brightness_0.7": ImageEnhance.Brightness(src).enhance(0.7),
        "contrast_1.4": ImageEnhance.Contrast(src).enhance(1.4),
        "contrast_0.6": ImageEnhance.Contrast(src).enhance(0.6),
        "saturation_1.2": ImageEnhance.Color(src).enhance(1.2),
        "saturation_0.8": ImageEnhance.Color(src).enhance(0.8),
        "hue_0.1": hue(src, 0.1),
        "hue_-0.07": hue(src, -0.07),
        "grayscale": src.convert("L").convert("RGB"),
        "solarize_128": ImageOps.solarize(src, 128),
        "hflip": src.transpose(Image.FLIP_LEFT_RIGHT),
        "blur_9_1.5": blur(src, 9, 1.5),
        "blur_23_0.4": blur(src, 23, 0.4),
        # resized_crop(img, top=10, left=20, height=50, width=60, size=32, BICUBIC)
        "crop_10_20_50_60_to_32": src.crop((20, 10, 80, 60)).resize((32, 32), Image.BICUBIC),
    }
    for name, img in cases.items():
        img.save(os.path.join(OUT, f"{name}.png"))
    print(f"wrote {len(cases)} references to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
