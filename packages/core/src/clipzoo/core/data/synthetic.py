"""A deterministic synthetic image–caption dataset with held-out attribute combinations,
small enough for demos and learning tests on a CPU."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 210, 220),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "val", "heldout")

# Caption templates; every one names all four attributes.
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "a {size} {colour} {shape} in the {position} corner",
    "there is a {size} {colour} {shape} in the {position}",
    "a picture of a {size} {colour} {shape} in the {position}",
    "in the {position} there is a {size} {colour} {shape}",
    "a {colour} {shape}, {size}, in the {position} of the image",
)

# Geometry as fractions of the image side: one object per quadrant-sized cell.
_DIAMETER = {"small": 0.28, "large": 0.46}
_JITTER = 0.03  # centre jitter
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges
_BACKGROUND = (90, 150)  # grey level range
_PIXEL_NOISE = 5.0  # std of per-pixel noise, in grey levels
_COLOUR_JITTER = 18  # max per-channel offset of the object colour
HELDOUT_PER_SHAPE = 2  # colours held out per shape
_STREAMS = {"train": 1, "val": 2, "heldout": 3}

Combination = tuple[str, str, str, str]  # (shape, colour, size, position)
RGB = tuple[int, ...]


class SyntheticShapes(torch.utils.data.Dataset):
    """One coloured shape on a grey background, with a caption naming its attributes.

    Attributes: ``shape`` (:data:`SHAPES`, 6), ``colour`` (:data:`COLOURS`, 6 well
    separated RGB values), ``size`` (small / large) and ``position`` (a 2×2 grid: "top
    left", ...). At 32 px each object sits inside its own 16-px quadrant, i.e. within 2×2 of
    the 8-px patches of a tiny ViT, and objects are drawn 4× larger and downsampled so even
    small ones (≈9 px) keep their outline. Nuisances — a random grey background level, mild per-pixel
    noise, slight colour and position jitter, and one of :data:`TEMPLATES` for the caption —
    vary per sample so a model must read the attributes rather than memorise pixels.

    **Compositional generalisation.** For every shape two colours are held out, assigned by
    a permutation drawn from ``seed`` so that each colour is also held out with exactly two
    shapes: ``split="train"`` and ``split="val"`` only ever show the other 24 (shape, colour)
    pairs, ``split="heldout"`` only the 12 held-out pairs (:attr:`heldout_pairs`). Every
    shape and every colour occurs in training, but never in those pairs; and since each
    held-out colour comes with two shapes, colour, size and position alone never single out
    a held-out image. Retrieving held-out images from their captions therefore works only
    if a model has learned shape and colour as separate, recombinable factors. ``val`` draws training combinations from an index
    stream of its own.

    **Samples** (rendered on the fly, cheap): ``{"image": PIL RGB image_size×image_size,
    "text": str, "label": shape index (for zero-shot over :meth:`classnames`), "id":
    f"{split}-{index}", "image_id": the same, "attributes": {"shape", "colour", "size",
    "position"}}``.

    **Determinism.** A sample depends only on ``(split, seed, index)`` (and ``image_size``):
    each item uses its own ``numpy`` generator seeded with ``(seed, split stream, index)``,
    never a global RNG, so two processes produce identical bytes and captions.

    **unique=True** (retrieval galleries): the first ``n`` of a seeded permutation of the
    split's full (shape, colour, size, position) combinations, so each caption has exactly
    one correct image. The train/val splits have 192 combinations, heldout 96.
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 32, unique: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"SyntheticShapes: split {split!r} is not one of {SPLITS}")
        if n < 0:
            raise ValueError(f"SyntheticShapes: n must be >= 0, got {n}")
        if image_size < 16:
            raise ValueError(f"SyntheticShapes: image_size must be >= 16 px to draw the shapes, got {image_size}")
        self.n, self.split, self.seed, self.image_size, self.unique = n, split, int(seed), int(image_size), unique
        self._heldout = _heldout_pairs(self.seed)
        self.combinations = _combinations(self._heldout, held_out=split == "heldout")
        self._order: list[int] | None = None
        if unique:
            if n > len(self.combinations):
                raise ValueError(
                    f"SyntheticShapes(unique=True): n={n} exceeds the {len(self.combinations)} distinct "
                    f"(shape, colour, size, position) combinations of split {split!r}"
                )
            rng = np.random.default_rng([self.seed, _STREAMS[split], 0])
            self._order = [int(i) for i in rng.permutation(len(self.combinations))[:n]]

    # -- names ---------------------------------------------------------------------------
    @staticmethod
    def classnames() -> list[str]:
        """Shape names, in label order."""
        return list(SHAPES)

    @staticmethod
    def colours() -> list[str]:
        return list(COLOURS)

    @staticmethod
    def sizes() -> list[str]:
        return list(SIZES)

    @staticmethod
    def positions() -> list[str]:
        return list(POSITIONS)

    @staticmethod
    def templates() -> list[str]:
        return list(TEMPLATES)

    @property
    def heldout_pairs(self) -> list[tuple[str, str]]:
        """The (shape, colour) pairs that never occur in ``train`` or ``val``."""
        return sorted(self._heldout, key=lambda p: (SHAPES.index(p[0]), list(COLOURS).index(p[1])))

    # -- samples -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of everything that determines the samples (for run provenance)."""
        spec = json.dumps({"generator": "SyntheticShapes/1", "n": len(self), "split": self.split, "seed": self.seed,
                           "image_size": self.image_size, "unique": self.unique}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticShapes: index {index} out of range for {self.n} samples")
        index %= self.n
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index + 1])
        if self._order is not None:
            combo = self.combinations[self._order[index]]
        else:
            combo = self.combinations[int(rng.integers(len(self.combinations)))]
        shape, colour, size, position = combo
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        sample_id = f"{self.split}-{index}"
        return {
            "image": self._render(combo, rng),
            "text": template.format(shape=shape, colour=colour, size=size, position=position),
            "label": SHAPES.index(shape),
            "id": sample_id,
            "image_id": sample_id,
            "attributes": {"shape": shape, "colour": colour, "size": size, "position": position},
        }

    def _render(self, combo: Combination, rng: np.random.Generator) -> Image.Image:
        shape, colour, size, position = combo
        side = self.image_size
        big = side * _SUPERSAMPLE
        grey = int(rng.integers(_BACKGROUND[0], _BACKGROUND[1] + 1))
        canvas = Image.new("RGB", (big, big), (grey, grey, grey))
        row, col = divmod(POSITIONS.index(position), 2)
        jitter = rng.uniform(-_JITTER, _JITTER, size=2)
        cx = (0.25 + 0.5 * col + jitter[0]) * big
        cy = (0.25 + 0.5 * row + jitter[1]) * big
        radius = _DIAMETER[size] * big / 2
        offsets = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + offsets, 0, 255))
        _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, radius, fill, (grey, grey, grey))
        small = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float32)
        # the same noise on all three channels: the background stays grey, colours stay pure
        noisy = small + rng.normal(0.0, _PIXEL_NOISE, size=(side, side, 1))
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB, background: RGB
) -> None:
    """Shapes inscribed in a circle of radius ``r``, with roughly comparable areas."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        hole = r * 0.5
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=background)
    elif shape == "square":
        h = r * 0.8
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _heldout_pairs(seed: int) -> set[tuple[str, str]]:
    """Two colours per shape, through a seeded permutation so each colour is held out with
    two shapes: in the held-out gallery colour, size and position never single out an image,
    so retrieving the right one needs the shape word too."""
    names = list(COLOURS)
    perm = np.random.default_rng([seed, 0]).permutation(len(names))
    return {
        (shape, names[int(perm[(i + k) % len(names)])]) for i, shape in enumerate(SHAPES) for k in range(HELDOUT_PER_SHAPE)
    }


def _combinations(heldout: set[tuple[str, str]], held_out: bool) -> list[Combination]:
    return [
        (shape, colour, size, position)
        for shape, colour, size, position in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)
        if ((shape, colour) in heldout) == held_out
    ]


def synthetic_shapes(path: str | None = None, on_error: str = "raise", **options: Any) -> SyntheticShapes:
    """Registry reader (``dataset.synthetic-shapes``): the options are :class:`SyntheticShapes`
    arguments; there is no path and no bad sample."""
    del path, on_error
    return SyntheticShapes(**options)
