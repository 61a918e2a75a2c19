"""WebDataset tar shards, read and written with the standard library's ``tarfile``.

A shard is a tar whose members are grouped into samples by key, the member's path up to
the first dot of its file name (``a/000017.jpg`` and ``a/000017.txt`` form sample
``a/000017``). Extensions: ``jpg``/``jpeg``/``png``/``webp`` -> ``"image"`` (PIL, RGB),
``txt`` -> ``"text"``, ``cls`` -> ``"label"`` (int), ``json`` -> metadata whose ``text``,
``label``, ``id``, ``image_id`` and ``split`` fill the sample where the members above do not
(the whole dict is kept under ``"json"``). Other extensions are ignored.

Uneven splits: shards go to ranks round-robin, then to each rank's data-loader workers,
so with ``num_shards`` not divisible by ranks x workers some ranks see more samples than
others. The core's all-gather handles uneven batches, but every rank must run the same
number of steps: the trainer defines an epoch by the shortest rank (``min_rank_samples``
/ batch size, or the minimum of the ranks' step counts, all-reduced) and stops every rank
there. Write shards in a multiple of ranks x workers to waste nothing.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.utils.data
from torch.utils.data import IterableDataset

from .. import distributed
from .schema import BadSampleError, DatasetFormatError, check_on_error, decode_image, parse_label

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LOGGED_PROBLEMS = 10


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a list, a folder (its ``*.tar`` files, sorted), or a pattern with one
    numeric brace range: ``data/shard-{000000..000009}.tar`` -> 10 paths, zero-padded to the
    width of the bounds when either bound has a leading zero."""
    if not isinstance(spec, (str, Path)):
        return [p for item in spec for p in expand_shards(item)]
    text = str(spec)
    ranges = _RANGE.findall(text)
    if not ranges:
        path = Path(text)
        return sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if len(ranges) > 1:
        raise DatasetFormatError(f"{text}: only one {{first..last}} range per pattern is supported")
    first, last = ranges[0]
    lo, hi = int(first), int(last)
    if hi < lo:
        raise DatasetFormatError(f"{text}: range {{{first}..{last}}} runs backwards")
    padded = (first.startswith("0") and len(first) > 1) or (last.startswith("0") and len(last) > 1)
    width = max(len(first), len(last)) if padded else 0
    match = _RANGE.search(text)
    assert match is not None
    head, tail = text[: match.start()], text[match.end() :]
    return [Path(f"{head}{i:0{width}d}{tail}") for i in range(lo, hi + 1)]


class WebDatasetShards(IterableDataset):
    """Samples from WebDataset shards, each shard read by exactly one (rank, worker) per epoch.

    Shard order is shuffled per epoch from ``seed`` (the same order on every rank; call
    :meth:`set_epoch` before each epoch, and do not use ``persistent_workers``, whose copies
    would keep the old epoch); then rank ``r`` of ``W`` takes shards ``r, r+W, ...`` and its
    worker ``w`` of ``K`` every ``K``-th of those. Samples within a shard keep their order.

    A sample without an image or text, or whose image does not decode, raises
    :class:`BadSampleError` naming the shard and the sample key (``on_error="raise"``), or
    is dropped, logged and appended to :attr:`problems` of the iterating process (``"skip"``).
    A shard that is not a readable tar is one problem under the same policy.

    ``len()`` exists only when ``samples_per_shard`` is given: it is this rank's estimate
    (shards it reads x ``samples_per_shard``); :attr:`min_rank_samples` is the shortest rank's.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        *,
        shuffle: bool = True,
        seed: int = 0,
        on_error: str = "raise",
        samples_per_shard: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        if not self.shards:
            raise DatasetFormatError(f"{shards}: no shards found")
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetFormatError(f"missing shard file(s): {', '.join(missing[:3])}{more}")
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.on_error = check_on_error(on_error)
        self.samples_per_shard = samples_per_shard
        self.problems: list[BadSampleError] = []

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order the next iteration uses."""
        self.epoch = epoch

    def shard_order(self) -> list[Path]:
        """All shards in this epoch's order (identical on every rank)."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def shards_for(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards one (rank, worker) reads this epoch."""
        if self.num_shards < world_size:
            raise DatasetFormatError(
                f"{self.num_shards} shard(s) cannot feed {world_size} ranks: every rank needs at least one; "
                "write more, smaller shards"
            )
        return self.shard_order()[rank::world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = distributed.world_info()
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for shard in self.shards_for(info.rank, info.world_size, worker_id, num_workers):
            yield from self._read_shard(shard)

    def __len__(self) -> int:
        if self.samples_per_shard is None:
            raise TypeError("WebDatasetShards has no len() unless samples_per_shard is given")
        info = distributed.world_info()
        return self.samples_per_shard * len(range(info.rank, self.num_shards, info.world_size))

    @property
    def min_rank_samples(self) -> int:
        """Estimated samples on the rank with the fewest shards (needs ``samples_per_shard``)."""
        if self.samples_per_shard is None:
            raise TypeError("min_rank_samples needs samples_per_shard")
        return self.samples_per_shard * (self.num_shards // distributed.world_info().world_size)

    def __repr__(self) -> str:
        return f"WebDatasetShards({self.num_shards} shards, first={str(self.shards[0])!r}, epoch={self.epoch})"

    # -- reading ------------------------------------------------------------------------
    def _read_shard(self, shard: Path) -> Iterator[dict[str, Any]]:
        try:
            for key, files in _grouped_members(shard):
                try:
                    sample = _build_sample(shard, key, files)
                except BadSampleError as problem:
                    self._problem(problem)
                    continue
                yield sample
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._problem(BadSampleError(str(shard), None, None, f"not a readable tar shard: {exc}"), exc)

    def _problem(self, problem: BadSampleError, cause: BaseException | None = None) -> None:
        if self.on_error == "raise":
            raise problem from cause
        self.problems.append(problem)
        if len(self.problems) <= _LOGGED_PROBLEMS:
            logger.warning("skipping: %s", problem)
        if len(self.problems) == _LOGGED_PROBLEMS:
            logger.warning("further skipped samples are not logged; see WebDatasetShards.problems")


def _grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for consecutive members sharing a key, streaming."""
    key: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():  # directories, and links (never followed)
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not stem or not dot:  # hidden files such as macOS "._x.jpg", or no extension
                continue
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None and files:
                    yield key, files
                key, files = member_key, {}
            handle = tar.extractfile(member)
            if handle is not None:
                files[ext.lower()] = handle.read()
    if key is not None and files:
        yield key, files


def _build_sample(shard: Path, key: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    where = f"{shard}, sample {key!r}"

    def bad(field: str, reason: str) -> BadSampleError:
        return BadSampleError(where, None, field, reason)

    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad("json", f"not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise bad("json", f"expected a JSON object, got {type(meta).__name__}")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        raise bad("image", f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); members: {sorted(files)}")
    sample: dict[str, Any] = {"image": decode_image(files[image_ext], where, None, "image")}
    text: Any = meta.get("text")
    if "txt" in files:
        try:
            text = files["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad("text", f".txt is not UTF-8: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        reason = "empty caption" if isinstance(text, str) else "no text (no .txt member and no 'text' in its .json)"
        raise bad("text", reason)
    sample["text"] = text.strip()
    if "cls" in files:
        sample["label"] = parse_label(files["cls"].decode("utf-8", "replace"), where, None, "label")
    elif meta.get("label") is not None:
        sample["label"] = parse_label(meta["label"], where, None, "label")
    sample["id"] = str(meta.get("id", key))
    sample["image_id"] = str(meta.get("image_id", sample["id"]))
    if meta.get("split") is not None:
        sample["split"] = str(meta["split"])
    if meta:
        sample["json"] = meta
    return sample


# -- writing --------------------------------------------------------------------------------
def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int,
    prefix: str = "shard",
) -> list[Path]:
    """Write samples as ``{prefix}-000000.tar, ...`` with ``samples_per_shard`` each; return
    the paths. Keys are the running sample index (``000000017``); images (PIL, or a path to
    a jpg/png/webp file) go in as ``.png`` / the file's own bytes, text as ``.txt``, an int
    label as ``.cls``; ``id``, ``image_id``, ``split``, a multi-hot label and a ``"json"``
    dict go into ``.json``. Member times are zeroed so equal input gives equal shards."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    try:
        for index, sample in enumerate(samples):
            if index % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(folder / f"{prefix}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            assert tar is not None
            key = f"{index:09d}"
            for ext, data in _encode(sample, index):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
    return paths


def _encode(sample: Mapping[str, Any], index: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    meta: dict[str, Any] = dict(sample.get("json") or {})
    image = sample.get("image")
    if isinstance(image, (str, Path)):
        ext = Path(image).suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"sample {index}: image file {image} is not one of {IMAGE_EXTENSIONS}")
        out.append((ext, Path(image).read_bytes()))
    elif image is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(("png", buffer.getvalue()))
    if sample.get("text") is not None:
        out.append(("txt", str(sample["text"]).encode("utf-8")))
    label = sample.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        out.append(("cls", str(label).encode()))
    elif label is not None:
        meta["label"] = list(label)
    for field in ("id", "image_id", "split"):
        if sample.get(field) is not None:
            meta[field] = sample[field]
    if meta:
        out.append(("json", json.dumps(meta, sort_keys=True).encode("utf-8")))
    return out
