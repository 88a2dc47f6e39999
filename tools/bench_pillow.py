#!/usr/bin/env python3
"""The reference PyTorch users run today for packing: Pillow decode + resize of the short side.

Usage: bench_pillow.py FOLDER [--short-side 256] [--repeats 5]
Decodes every JPEG in FOLDER with Pillow (`Image.open(f).convert("RGB")`), resizes the short side
to --short-side with antialiased bilinear (torchvision's Resize), on one thread, and prints one JSON
object with the median images/s over the repeats.
"""
import argparse
import glob
import json
import os
import statistics
import time

from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.folder, "**", "*.jpg"), recursive=True))
    rates = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                img = Image.open(fh).convert("RGB")
            w, h = img.size
            s = a.short_side
            if min(w, h) > s:
                size = (s, s * h // w) if w < h else (s * w // h, s)
                img = img.resize(size, Image.BILINEAR)
            img.tobytes()
        rates.append(len(files) / (time.perf_counter() - t))
    print(json.dumps({"images": len(files), "images_per_second": statistics.median(rates),
                      "runs": rates, "pillow": Image.__version__}))


if __name__ == "__main__":
    main()
