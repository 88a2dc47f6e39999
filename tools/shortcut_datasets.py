"""Variants of the embedded shape dataset, to test which per-image nuisances a short BYOL-style
run learns instead of the shapes (BENCHMARKS.md, "Shortcuts", session 6).

Ten shape classes (disk, square, triangle, star, ring, cross, hexagon, crescent, arrow, bowtie),
64 px PNGs in `OUT/train/<class>/` (100 per class) and `OUT/val/<class>/` (NVAL per class), in the
folder layout `loader pack` reads. Each variant fixes what is random per image:

  colour    random solid object and background colours; shape centred, upright, one size
  rainbow   hue sweeps across object and background; moved, slightly turned; object randomly
            lighter or darker than the background
  grey      random grey levels; moved, slightly turned; random light/dark polarity
  fixed     one palette for every image (yellow on blue); moved, any rotation
  upright   `fixed`, slightly turned only
  small     `fixed` with radius 0.15-0.4 of the image instead of 0.25-0.4
  upsmall   `upright` with radius 0.12-0.4: size and position vary, rotation hardly
  lighting  `fixed` plus random brightness/contrast per image
  ramp      `lighting` plus a luminance ramp across the background in a random direction

Usage: python tools/shortcut_datasets.py VARIANT OUT [NVAL]   (needs numpy and Pillow)
"""
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

KINDS = ["disk", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent", "arrow", "bowtie"]
SIZE = 64
# Pixel coordinates as fractions of the side, shared by every colour field.
YY, XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE

# variant: (object fill, background fill, pose, light/dark polarity, brightness/contrast, ramp,
# smallest radius)
VARIANTS = {
    "colour": ("solid", "solid", "centred", False, False, False, 0.25),
    "rainbow": ("rainbow", "rainbow", "turned", True, False, False, 0.25),
    "grey": ("grey", "grey", "turned", True, False, False, 0.25),
    "fixed": ("yellow", "blue", "rotated", False, False, False, 0.25),
    "upright": ("yellow", "blue", "turned", False, False, False, 0.25),
    "small": ("yellow", "blue", "rotated", False, False, False, 0.15),
    "upsmall": ("yellow", "blue", "turned", False, False, False, 0.12),
    "lighting": ("yellow", "blue", "rotated", False, True, False, 0.25),
    "ramp": ("yellow", "blue", "rotated", False, True, True, 0.25),
}


def polygon(kind):
    """Corners of a polygonal shape in unit coordinates."""
    if kind == "square":
        return [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]
    if kind == "triangle":
        return [(0, -0.9), (0.85, 0.7), (-0.85, 0.7)]
    if kind == "hexagon":
        return [(0.9 * math.cos(a), 0.9 * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
    if kind == "star":
        tips = [(0.95 if k % 2 == 0 else 0.4, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
        return [(r * math.cos(a), r * math.sin(a)) for r, a in tips]
    if kind == "cross":
        return [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3), (0.3, 0.9),
                (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)]
    if kind == "arrow":
        return [(-0.9, -0.25), (0.2, -0.25), (0.2, -0.7), (0.9, 0), (0.2, 0.7), (0.2, 0.25), (-0.9, 0.25)]
    if kind == "bowtie":
        return [(-0.9, -0.7), (0, 0), (0.9, -0.7), (0.9, 0.7), (0, 0), (-0.9, 0.7)]
    raise ValueError(kind)


def mask(kind, cx, cy, r, angle, sup=4):
    """Coverage (0-1) of the shape, drawn at 4x and box-filtered down."""
    big = Image.new("L", (SIZE * sup, SIZE * sup), 0)
    d = ImageDraw.Draw(big)

    def to_canvas(p):
        x, y = p
        c, s = math.cos(angle), math.sin(angle)
        return ((cx + r * (c * x - s * y)) * sup, (cy + r * (s * x + c * y)) * sup)

    def disk(x, y, radius, fill):
        d.ellipse([(x - radius) * sup, (y - radius) * sup, (x + radius) * sup, (y + radius) * sup], fill=fill)

    if kind in ("disk", "ring", "crescent"):
        disk(cx, cy, 0.9 * r, 255)
        if kind == "ring":
            disk(cx, cy, 0.5 * r, 0)
        if kind == "crescent":
            ox, oy = to_canvas((0.45, 0))
            disk(ox / sup, oy / sup, 0.8 * r, 0)
    else:
        d.polygon([to_canvas(p) for p in polygon(kind)], fill=255)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255.0


def hsv_to_rgb(h, s, v):
    h = (h % 1.0) * 6
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], -1)


def fill(rng, mode):
    """A (SIZE, SIZE, 3) colour field."""
    if mode == "solid":
        return np.broadcast_to(rng.random(3), (SIZE, SIZE, 3)).copy()
    if mode == "yellow":
        return np.broadcast_to(np.array([0.9, 0.85, 0.3]), (SIZE, SIZE, 3)).copy()
    if mode == "blue":
        return np.broadcast_to(np.array([0.15, 0.25, 0.45]), (SIZE, SIZE, 3)).copy()
    if mode == "grey":
        return np.full((SIZE, SIZE, 3), rng.random(), np.float32)
    if mode == "rainbow":
        a, f = rng.random() * 2 * np.pi, rng.uniform(1, 2)
        h = rng.random() + f * (XX * math.cos(a) + YY * math.sin(a))
        return hsv_to_rgb(h, np.full_like(XX, rng.uniform(0.5, 1)), np.full_like(XX, rng.uniform(0.3, 1)))
    raise ValueError(mode)


def draw(rng, c, variant):
    fg_mode, bg_mode, pose, polarity, lighting, ramp, r_min = VARIANTS[variant]
    bg, fg = fill(rng, bg_mode), fill(rng, fg_mode)
    if ramp:
        a = rng.random() * 2 * np.pi
        bg = bg * (0.7 + 0.6 * (XX * math.cos(a) + YY * math.sin(a)))[..., None]
    if polarity:
        if rng.random() < 0.5:
            fg, bg = 0.55 + 0.45 * fg, 0.45 * bg
        else:
            fg, bg = 0.45 * fg, 0.55 + 0.45 * bg
    if pose == "centred":
        cx = cy = SIZE / 2
        r, angle = SIZE * 0.38, 0.0
    else:
        r = SIZE * rng.uniform(r_min, 0.4)
        cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
        angle = rng.uniform(0, 2 * np.pi) if pose == "rotated" else rng.uniform(-0.3, 0.3)
    m = mask(KINDS[c], cx, cy, r, angle)[..., None]
    img = m * fg + (1 - m) * bg
    if lighting:
        brightness, contrast = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)
        img = img * brightness
        img = (img - img.mean()) * contrast + img.mean()
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def main():
    variant, out = sys.argv[1], sys.argv[2]
    n_val = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    if variant not in VARIANTS:
        sys.exit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    for split, n in (("train", 100), ("val", n_val)):
        for c, kind in enumerate(KINDS):
            folder = os.path.join(out, split, f"{c:02}-{kind}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([c, i, split == "val"])
                Image.fromarray(draw(rng, c, variant)).save(os.path.join(folder, f"{i:05}.png"))


if __name__ == "__main__":
    main()
