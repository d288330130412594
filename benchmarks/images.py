"""A benchmark image set made in code: JPEGs as a camera or a user would send them, the same
bytes from the same seed on every machine (Pillow's encoder is deterministic for a given
version and settings).

A random-noise image compresses badly and a flat one to almost nothing; neither is what a
decoder meets in practice. Each image here is a sky-to-ground gradient with a few filled
shapes (ellipses, rectangles, polygons) in random colours, some mild blur, and a little
sensor noise, encoded at ``size``×``size`` with quality 90: about 10–20 KB at 224×224, so
that 10,000 images a second is about 150 MB/s on the broker.
"""

from __future__ import annotations

import io

import numpy as np


def make_image(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """One structured RGB image as ``(size, size, 3)`` uint8."""
    from PIL import Image, ImageDraw, ImageFilter

    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = [(int(x), int(y)) for x, y in rng.integers(0, size, (5, 2))]
            draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0.0, 6.0, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_jpegs(n: int, seed: int = 21, size: int = 224, quality: int = 90) -> list[bytes]:
    """``n`` JPEG images from ``seed`` (the same bytes every time)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_image(rng, size), "RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
