"""Datasets generated offline: `builtin:digits` (scikit-learn's bundled handwritten digits) and
`builtin:shapes` (coloured shapes drawn at positions, with compositional captions)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions of a digit: each is one of these with the digit's word.
DIGIT_CAPTIONS = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a picture of a {}.")

SHAPE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPE_KINDS = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
SPLIT_STREAMS = {"train": 0, "test": 1, "validation": 2}


class DigitsSource:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), with templated captions.

    The split is fixed: every fifth image (index % 5 == 0) is `test` (360 images), the others
    `train` (1,437). Images are `(8, 8)` uint8 arrays (grey level * 255 / 16); the image
    processor resizes them to the tower's input size (bicubic), which is the documented
    upscaling.

    Args:
        split: `train` or `test`.
    """

    in_memory = True

    def __init__(self, split: str = "train", **options: Any) -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test"):
            raise ValueError(f"builtin:digits has splits 'train' and 'test', got {split!r}")
        if options:
            raise ValueError(f"builtin:digits takes no data_options, got {sorted(options)}")
        digits = load_digits()
        keep = np.arange(len(digits.target))
        keep = keep[(keep % 5 == 0) == (split == "test")]
        self.images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        self.labels = [int(t) for t in digits.target[keep]]
        self.class_names: tuple[str, ...] = DIGIT_WORDS
        self.name = f"builtin:digits[{split}]"

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        return self.images[index]

    def captions(self, index: int) -> list[str]:
        word = DIGIT_WORDS[self.labels[index]]
        return [template.format(word) for template in DIGIT_CAPTIONS]


class ShapesSource:
    """Two coloured shapes on a grey canvas, one placed relative to the other, with the caption
    saying so: "a red circle above a blue square". Each image is drawn from its own seeded
    generator (`seed`, split, index), so any size is reproducible and splits never overlap.

    Args:
        split: `train`, `test` or `validation`.
        num_train: Images in `train` (default 4096).
        num_test: Images in `test` / `validation` (default 512).
        canvas: Side of the square canvas in pixels (default 64).
        seed: Seed of the generator streams.
    """

    in_memory = True

    def __init__(
        self, split: str = "train", num_train: int = 4096, num_test: int = 512, canvas: int = 64, seed: int = 0
    ) -> None:
        if split not in SPLIT_STREAMS:
            raise ValueError(f"builtin:shapes has splits {sorted(SPLIT_STREAMS)}, got {split!r}")
        if canvas < 16:
            raise ValueError(f"canvas must be at least 16 pixels, got {canvas}")
        self.size = int(num_train if split == "train" else num_test)
        self.canvas = int(canvas)
        self.stream = (int(seed), SPLIT_STREAMS[split])
        self.labels = None
        self.class_names = None
        self.name = f"builtin:shapes[{split}]"
        self._scenes = [self._scene(i) for i in range(self.size)]

    def __len__(self) -> int:
        return self.size

    def _scene(self, index: int) -> tuple[tuple, tuple, str]:
        rng = np.random.default_rng([*self.stream, index])
        colors = list(SHAPE_COLORS)
        first = (colors[rng.integers(len(colors))], SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))])
        second = first
        while second == first:  # two different objects, so the caption is unambiguous
            second = (colors[rng.integers(len(colors))], SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))])
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        c, r = self.canvas, self.canvas // 6  # shape radius
        near, far = rng.uniform(r + 1, c / 2 - r), rng.uniform(c / 2 + r, c - r - 1)
        across1, across2 = rng.uniform(r + 1, c - r - 1, size=2)
        if relation in ("above", "below"):
            top, bottom = (across1, near), (across2, far)
            a, b = (top, bottom) if relation == "above" else (bottom, top)
        else:
            left, right = (near, across1), (far, across2)
            a, b = (left, right) if relation == "left of" else (right, left)
        return (first, a), (second, b), relation

    def image(self, index: int) -> Image.Image:
        (first, a), (second, b), _ = self._scenes[index]
        picture = Image.new("RGB", (self.canvas, self.canvas), (110, 110, 110))
        draw = ImageDraw.Draw(picture)
        r = self.canvas // 6
        for (color, kind), (x, y) in ((first, a), (second, b)):
            box = (x - r, y - r, x + r, y + r)
            fill = SHAPE_COLORS[color]
            if kind == "circle":
                draw.ellipse(box, fill=fill)
            elif kind == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        return picture

    def captions(self, index: int) -> list[str]:
        (first, _), (second, _), relation = self._scenes[index]
        return [f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"]


BUILTINS = {"digits": DigitsSource, "shapes": ShapesSource}
