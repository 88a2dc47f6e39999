#!/usr/bin/env python3
"""Writes the small image fixtures the tests decode (tests/fixtures/formats).

Run once with Pillow installed (`pip install pillow`); the output is committed. For every valid
image `NAME.EXT` it also writes `expected/NAME.png`: what Pillow's `Image.open(f).convert("RGB")`
gives, which the Rust decoder is compared with. Broken files go to `broken/`.
"""
import io
import os
import sys

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "formats")


def photo_like(w=48, h=36):
    """A smooth colour image with some edges, so that every decoder path is exercised."""
    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255) // (w - 1), (y * 255) // (h - 1), ((x + y) * 7) % 256 if (x // 8 + y // 8) % 2 else 40)
    return img


def main():
    valid = os.path.join(ROOT, "valid")
    expected = os.path.join(ROOT, "expected")
    broken = os.path.join(ROOT, "broken")
    for d in (valid, expected, broken):
        os.makedirs(d, exist_ok=True)
    base = photo_like()
    files = {}

    def save(name, img, **kw):
        buf = io.BytesIO()
        img.save(buf, **kw)
        files[name] = buf.getvalue()

    save("jpeg_420.jpg", base, format="JPEG", quality=95, subsampling=2)
    save("jpeg_422.jpg", base, format="JPEG", quality=95, subsampling=1)
    save("jpeg_444.jpg", base, format="JPEG", quality=95, subsampling=0)
    save("jpeg_progressive.jpg", base, format="JPEG", quality=95, progressive=True)
    save("jpeg_gray.jpg", base.convert("L"), format="JPEG", quality=95)
    save("jpeg_cmyk.jpg", base.convert("CMYK"), format="JPEG", quality=95)
    save("png_rgb.png", base, format="PNG")
    rgba = base.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    save("png_rgba.png", rgba, format="PNG")
    save("png_palette.png", base.convert("P", palette=Image.ADAPTIVE, colors=32), format="PNG")
    save("png_gray.png", base.convert("L"), format="PNG")
    gray16 = Image.new("I;16", base.size)
    gray16.putdata([(x * 1300 + y * 97) % 65536 for y in range(base.height) for x in range(base.width)])
    save("png_gray16.png", gray16, format="PNG")
    save("webp_lossless.webp", base, format="WEBP", lossless=True)
    save("bmp_rgb.bmp", base, format="BMP")
    frames = [base, base.transpose(Image.FLIP_LEFT_RIGHT)]
    save("gif_animated.gif", frames[0].convert("P", palette=Image.ADAPTIVE), format="GIF",
         save_all=True, append_images=[f.convert("P", palette=Image.ADAPTIVE) for f in frames[1:]])
    save("tiff_rgb.tif", base, format="TIFF")
    # ImageNet holds a PNG named .JPEG: the content decides the format.
    files["png_named.JPEG"] = files["png_rgb.png"]

    for name, data in files.items():
        with open(os.path.join(valid, name), "wb") as f:
            f.write(data)
        ref = Image.open(io.BytesIO(data)).convert("RGB")
        ref.save(os.path.join(expected, os.path.splitext(name)[0] + ".png"))

    jpeg = files["jpeg_420.jpg"]
    broken_files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": files["png_rgb.png"][:200],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "header_only.png": files["png_rgb.png"][:33],
    }
    for name, data in broken_files.items():
        with open(os.path.join(broken, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(files)} valid and {len(broken_files)} broken fixtures to {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
