from __future__ import annotations

import io

from PIL import Image

from benchmarks.images import make_jpegs


def test_the_image_set_is_the_same_from_the_same_seed() -> None:
    first = make_jpegs(4, seed=3)
    assert make_jpegs(4, seed=3) == first
    assert make_jpegs(4, seed=4) != first


def test_images_are_224_jpegs_of_realistic_size() -> None:
    for data in make_jpegs(8):
        assert data.startswith(b"\xff\xd8\xff")
        assert 8_000 <= len(data) <= 25_000  # what a 224x224 photo at quality 90 weighs
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (224, 224) and image.mode == "RGB"
