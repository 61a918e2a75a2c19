"""Which rows share an image: the grouping retrieval needs when an image has several captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class ImageGroups(NamedTuple):
    """``images``: for each unique image, the index of the first row showing it (in order of
    first appearance). ``image_of``: for each row (caption), the position of its image in
    ``images``. So image-to-text retrieval scores ``len(images)`` queries against every
    caption, and caption ``j`` is a hit for image ``image_of[j]``."""

    images: list[int]
    image_of: list[int]

    def captions_of(self) -> list[list[int]]:
        """For each unique image, the rows (captions) that belong to it."""
        out: list[list[int]] = [[] for _ in self.images]
        for row, image in enumerate(self.image_of):
            out[image].append(row)
        return out


def group_by_image(data: Any) -> ImageGroups:
    """Group rows by ``image_id``.

    ``data`` is a sequence of image ids, a dataset with an ``image_ids`` list (e.g.
    :class:`~clipzoo.core.data.TabularDataset`, read without decoding any image), or a
    map-style dataset whose samples carry ``"image_id"`` (each sample is loaded; a sample
    without one counts as its own image).
    """
    ids: Sequence[Any]
    if hasattr(data, "image_ids"):
        ids = list(data.image_ids)
    elif isinstance(data, Sequence) and not isinstance(data, str) and all(isinstance(x, str) for x in data):
        ids = data
    else:
        ids = []
        for i in range(len(data)):
            sample = data[i]
            if sample is None:
                raise ValueError(f"sample {i} is None (a skipped bad sample); cannot group it by image")
            ids.append(sample.get("image_id", ("__row__", i)))
    position: dict[Any, int] = {}
    images: list[int] = []
    image_of: list[int] = []
    for row, image_id in enumerate(ids):
        if image_id not in position:
            position[image_id] = len(images)
            images.append(row)
        image_of.append(position[image_id])
    return ImageGroups(images, image_of)
