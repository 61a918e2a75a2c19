"""Tabular (CSV/TSV/JSONL/Parquet) and WebDataset readers, grouping, and the data check."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import clipzoo.core.distributed as distributed
from clipzoo.core import registry
from clipzoo.core.data import (
    BadSampleError,
    Collator,
    DatasetFormatError,
    TabularDataset,
    UnsafePathError,
    WebDatasetShards,
    expand_shards,
    format_summary,
    group_by_image,
    open_dataset,
    parse_label,
    summarize,
    write_shards,
)
from clipzoo.core.distributed import WorldInfo
from clipzoo.core.errors import ClipzooError, MissingPackageError, UnknownPartError

COLOURS = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0)}
ROWS = [
    {"image": "img/a.png", "text": "a red square", "label": 0, "id": "s1", "split": "train"},
    {"image": "img/a.png", "text": "a square in red", "label": 0, "id": "s2", "split": "train"},
    {"image": "img/b.png", "text": "a blue square", "label": 1, "id": "s3", "split": "test"},
    {"image": "img/c.png", "text": "a green square", "label": 2, "id": "s4", "split": "test"},
]


def make_images(folder: Path, names=("a", "b", "c")) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), COLOURS.get(name, (9, 9, 9))).save(folder / "img" / f"{name}.png")


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_images(tmp_path)
    return tmp_path


def as_plain(sample: dict) -> dict:
    out = dict(sample)
    out["image"] = (sample["image"].mode, sample["image"].size, sample["image"].tobytes())
    return out


# -- tabular -----------------------------------------------------------------------------
def test_csv_tsv_jsonl_parquet_give_the_same_samples(folder):
    datasets = [
        TabularDataset(write_csv(folder / "d.csv", ROWS)),
        TabularDataset(write_csv(folder / "d.tsv", ROWS, delimiter="\t")),
        TabularDataset(write_jsonl(folder / "d.jsonl", ROWS)),
        TabularDataset(write_jsonl(folder / "d.json-lines", ROWS)),
        TabularDataset(write_parquet(folder / "d.parquet", ROWS)),
        TabularDataset(write_jsonl(folder / "d.txt", ROWS), format="jsonl"),
    ]
    reference = [as_plain(s) for s in datasets[0]]
    assert reference[0] == {
        "image": ("RGB", (8, 8), bytes(COLOURS["a"]) * 64),
        "text": "a red square",
        "label": 0,
        "id": "s1",
        "image_id": "img/a.png",
        "split": "train",
    }
    for ds in datasets[1:]:
        assert [as_plain(s) for s in ds] == reference, ds


def test_column_renames_and_root(tmp_path):
    make_images(tmp_path / "images")
    rows = [{"filepath": "img/a.png", "caption": "red", "finding": "1"}]
    table = write_csv(tmp_path / "meta.csv", rows)
    ds = TabularDataset(
        table, root=tmp_path / "images", columns={"image": "filepath", "text": "caption", "label": "finding"}
    )
    sample = ds[0]
    assert (sample["text"], sample["label"], sample["image_id"], sample["id"]) == ("red", 1, "img/a.png", "2")
    image_label = TabularDataset(table, root=tmp_path / "images", columns={"image": "filepath", "text": None})
    assert "text" not in image_label[0] and image_label[0]["image_id"] == "img/a.png"
    with pytest.raises(DatasetFormatError, match="no column 'cls'"):
        TabularDataset(
            table, root=tmp_path / "images", columns={"image": "filepath", "text": "caption", "label": "cls"}
        )


def test_split_filter(folder):
    ds = TabularDataset(write_csv(folder / "d.csv", ROWS), split="test")
    assert [s["id"] for s in ds] == ["s3", "s4"]
    assert ds.rows[0].row == 4  # header is row 1
    no_split = write_csv(folder / "n.csv", [{k: v for k, v in r.items() if k != "split"} for r in ROWS])
    with pytest.raises(DatasetFormatError, match=r"n\.csv: no column 'split'"):
        TabularDataset(no_split, split="test")


def test_missing_column_names_file_and_columns(folder):
    table = write_csv(folder / "d.csv", [{"path": "img/a.png", "text": "x"}])
    with pytest.raises(DatasetFormatError) as err:
        TabularDataset(table)
    message = str(err.value)
    assert "d.csv" in message and "'image'" in message and "['path', 'text']" in message
    assert isinstance(err.value, ClipzooError)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_paths_escaping_the_root_are_refused(tmp_path, on_error):
    root = tmp_path / "data"
    make_images(root)
    make_images(tmp_path / "outside")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside" / "img" / "a.png")
    good = {"image": "img/a.png", "text": "ok"}
    cases = {
        "../outside/img/a.png": "row 3",
        str(tmp_path / "outside" / "img" / "b.png"): "row 3",
        "img/link.png": "row 3",
    }
    for path, row in cases.items():
        table = write_csv(root / "d.csv", [good, {"image": path, "text": "bad"}])
        with pytest.raises(UnsafePathError, match="outside the dataset root") as err:
            TabularDataset(table, on_error=on_error)
        assert f"d.csv, {row}, field 'image'" in str(err.value)
    # an absolute path inside the root is fine
    table = write_csv(root / "d.csv", [{"image": str(root / "img" / "b.png"), "text": "ok"}])
    assert TabularDataset(table)[0]["image_id"] == "img/b.png"


def test_empty_caption_and_missing_file_raise_or_skip(folder, caplog):
    rows = [*ROWS, {**ROWS[0], "text": "  ", "id": "empty"}, {**ROWS[0], "image": "img/zz.png", "id": "gone"}]
    table = write_csv(folder / "d.csv", rows)
    with pytest.raises(BadSampleError, match=r"d\.csv, row 6, field 'text': empty caption"):
        TabularDataset(table)
    with caplog.at_level(logging.WARNING, logger="clipzoo.core.data.tabular"):
        ds = TabularDataset(table, on_error="skip")
    assert len(ds) == 4 and len(ds.problems) == 2
    assert [(p.row, p.field) for p in ds.problems] == [(6, "text"), (7, "image")]
    assert "image file not found" in str(ds.problems[1])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 bad row(s)" in warnings[0].getMessage()


def test_corrupt_image_raises_or_is_dropped_by_the_collator(folder, tiny_model, caplog):
    (folder / "img" / "bad.png").write_bytes(b"\x89PNG not really an image")
    table = write_csv(folder / "d.csv", [*ROWS, {**ROWS[0], "image": "img/bad.png", "id": "bad"}])
    with pytest.raises(BadSampleError, match=r"d\.csv, row 6, field 'image': cannot decode image bad\.png"):
        TabularDataset(table)[4]
    ds = TabularDataset(table, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="clipzoo.core.data.tabular"):
        assert ds[4] is None
    assert "d.csv, row 6" in caplog.text
    batch = Collator(tiny_model)([ds[i] for i in range(len(ds))])
    assert batch["size"] == 4 and batch["id"] == ["s1", "s2", "s3", "s4"]
    assert batch["image"].shape[0] == 4 and batch["label"].tolist() == [0, 0, 1, 2]


def test_malformed_jsonl_line_is_named(folder):
    path = folder / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"image": "img/b.png", "text": \n')
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl, line 3: not valid JSON"):
        TabularDataset(path)
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: expected a JSON object"):
        TabularDataset(path)


def test_multi_label_spellings(folder):
    rows = [
        {"image": "img/a.png", "text": "x", "label": "0;1;0"},
        {"image": "img/b.png", "text": "y", "label": "[1, 0, 1]"},
    ]
    assert [s["label"] for s in TabularDataset(write_csv(folder / "d.csv", rows))] == [[0, 1, 0], [1, 0, 1]]
    jsonl = write_jsonl(folder / "d.jsonl", [{**rows[0], "label": [0, 0, 1]}, {**rows[1], "label": [1, 1, 1]}])
    assert TabularDataset(jsonl)[1]["label"] == [1, 1, 1]
    mixed = write_csv(folder / "m.csv", [*rows, {"image": "img/c.png", "text": "z", "label": "1;0"}])
    with pytest.raises(BadSampleError, match=r"row 4, field 'label': expected a multi-hot list of length 3 like row 2"):
        TabularDataset(mixed)
    assert parse_label(" 3 ", "f", 1) == 3 and parse_label(2.0, "f", 1) == 2
    for bad in ["0;2", "cat", "", -1, True, "[0,"]:
        with pytest.raises(BadSampleError, match="f, row 1, field 'label'"):
            parse_label(bad, "f", 1)


def test_csv_row_with_wrong_field_count(folder):
    path = folder / "d.csv"
    path.write_text("image,text\nimg/a.png,fine\nimg/b.png,too,many\n")
    with pytest.raises(BadSampleError, match="row 3: has 3 fields, the header has 2"):
        TabularDataset(path)


def test_format_errors(folder, monkeypatch):
    with pytest.raises(DatasetFormatError, match=r"suffix '\.xlsx'.*pass format="):
        TabularDataset(write_csv(folder / "d.xlsx", ROWS))
    path = write_parquet(folder / "d.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingPackageError, match="pip install pyarrow"):
        TabularDataset(path)


def test_group_by_image_with_two_captions_per_image(folder):
    rows = [ROWS[0], ROWS[2], ROWS[1], {**ROWS[2], "text": "blue again", "id": "s5"}]
    ds = TabularDataset(write_csv(folder / "d.csv", rows))
    groups = group_by_image(ds)
    assert groups == ([0, 1], [0, 1, 0, 1])
    assert groups.images == [0, 1] and groups.captions_of() == [[0, 2], [1, 3]]
    assert group_by_image([dict(ds[i]) for i in range(len(ds))]) == groups
    assert group_by_image(["x", "y", "x"]) == ([0, 1], [0, 1, 0])


# -- webdataset --------------------------------------------------------------------------
def shard_samples(n: int) -> list[dict]:
    return [
        {"image": Image.new("RGB", (8, 8), (i * 10, 0, 0)), "text": f"caption {i}", "label": i % 3, "id": f"s{i:02d}"}
        for i in range(n)
    ]


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    return write_shards(shard_samples(15), tmp_path / "wds", samples_per_shard=3)


def test_write_and_read_shards(shards, tmp_path):
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    ds = WebDatasetShards(str(tmp_path / "wds" / "shard-{000000..000004}.tar"), shuffle=False)
    samples = list(ds)
    assert [s["id"] for s in samples] == [f"s{i:02d}" for i in range(15)]
    first = samples[1]
    assert first["text"] == "caption 1" and first["label"] == 1 and first["image_id"] == "s01"
    assert first["image"].mode == "RGB" and first["image"].getpixel((0, 0)) == (10, 0, 0)
    assert ds.num_shards == 5
    assert WebDatasetShards(tmp_path / "wds").shards == shards


def test_expand_shards():
    assert [p.name for p in expand_shards("d/s-{000008..000011}.tar")] == [
        "s-000008.tar",
        "s-000009.tar",
        "s-000010.tar",
        "s-000011.tar",
    ]
    assert [p.name for p in expand_shards("s{8..10}.tar")] == ["s8.tar", "s9.tar", "s10.tar"]
    with pytest.raises(DatasetFormatError, match="only one"):
        expand_shards("{0..1}/{0..1}.tar")


def test_every_sample_read_once_over_2_ranks_x_2_workers(shards, monkeypatch):
    ds = WebDatasetShards(shards, seed=3, samples_per_shard=3)
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world_info", lambda rank=rank: WorldInfo(rank, 2))
        assert len(ds) == (9 if rank == 0 else 6)
        assert ds.min_rank_samples == 6
        count = 0
        for worker in range(2):
            info = SimpleNamespace(id=worker, num_workers=2)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            ids = [s["id"] for s in ds]
            seen += ids
            count += len(ids)
        per_rank.append(count)
    assert sorted(seen) == [f"s{i:02d}" for i in range(15)]
    assert per_rank == [9, 6]  # 5 shards over 2 ranks: uneven, as documented


def test_dataloader_workers_on_one_rank(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = WebDatasetShards(shards, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s["id"])
    got = sorted(loader)
    mine = [shards.index(p) for p in ds.shards_for(1, 2)]  # shard k holds samples 3k .. 3k+2
    expected = sorted(f"s{3 * k + j:02d}" for k in mine for j in range(3))
    assert got == expected and len(got) == 6


def test_set_epoch_changes_order_not_the_set(shards):
    ds = WebDatasetShards(shards, seed=0)
    orders = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        orders.append([s["id"] for s in ds])
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    ds.set_epoch(2)
    assert [s["id"] for s in ds] == orders[2]  # deterministic


def test_missing_text_names_shard_and_key(tmp_path, caplog):
    samples = shard_samples(4)
    del samples[2]["text"]
    paths = write_shards(samples, tmp_path, samples_per_shard=2)
    with pytest.raises(BadSampleError) as err:
        list(WebDatasetShards(paths, shuffle=False))
    assert "shard-000001.tar, sample '000000002', field 'text': no text" in str(err.value)
    ds = WebDatasetShards(paths, shuffle=False, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="clipzoo.core.data.webdataset"):
        assert [s["id"] for s in ds] == ["s00", "s01", "s03"]
    assert len(ds.problems) == 1 and "000000002" in caplog.text


def test_unreadable_shard_and_json_metadata(tmp_path):
    good = write_shards(
        [{"image": Image.new("RGB", (8, 8)), "label": [0, 1], "json": {"text": "from json"}}], tmp_path, 1
    )
    sample = next(iter(WebDatasetShards(good)))
    assert sample["text"] == "from json" and sample["label"] == [0, 1]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BadSampleError, match="broken.tar: not a readable tar shard"):
        list(WebDatasetShards([broken]))
    ds = WebDatasetShards([broken, *good], on_error="skip", shuffle=False)
    assert len(list(ds)) == 1 and len(ds.problems) == 1
    with tarfile.open(good[0]) as tar:
        assert sorted(tar.getnames()) == ["000000000.json", "000000000.png"]


def test_too_few_shards_for_the_ranks(shards, monkeypatch):
    monkeypatch.setattr(distributed, "world_info", lambda: WorldInfo(0, 8))
    with pytest.raises(DatasetFormatError, match="5 shard.*cannot feed 8 ranks"):
        list(WebDatasetShards(shards))


# -- check -------------------------------------------------------------------------------
def test_summarize_csv_with_problems_under_skip(folder):
    (folder / "img" / "bad.png").write_bytes(b"garbage")
    rows = [*ROWS, {**ROWS[0], "text": "", "id": "e"}, {**ROWS[2], "image": "img/bad.png", "id": "b"}]
    table = write_csv(folder / "d.csv", rows)
    summary = summarize(open_dataset("csv", table, on_error="skip"))
    assert summary.n_samples == 4 and summary.n_images == 3 and summary.n_problems == 2
    assert summary.splits == {"train": 2, "test": 2}
    assert (summary.captions_per_image_min, summary.captions_per_image_max) == (1, 2)
    assert summary.captions_per_image_mean == pytest.approx(4 / 3)
    assert summary.label_counts == {0: 2, 1: 1, 2: 1}
    text = format_summary(summary)
    assert "samples: 4 (test: 2, train: 2)" in text and "problems: 2" in text
    assert "row 6, field 'text': empty caption" in text and "row 7, field 'image': cannot decode" in text


def test_summarize_webdataset(shards):
    summary = summarize(open_dataset("webdataset", shards[0].parent))
    assert summary.n_samples == 15 and summary.n_images == 15 and summary.n_problems == 0
    assert "problems: none" in format_summary(summary)


def test_open_dataset_formats_and_registry(folder):
    table = write_jsonl(folder / "d.jsonl", ROWS)
    assert len(open_dataset("tabular", table, split="train")) == 2
    with pytest.raises(UnknownPartError) as err:
        open_dataset("excel", table)
    for name in ("csv", "jsonl", "parquet", "tabular", "webdataset"):
        assert name in str(err.value)
    registry.register("dataset", "test-reader", lambda path, **kw: ["from", os.fspath(path), kw])
    try:
        assert open_dataset("test-reader", table, on_error="skip") == ["from", str(table), {"on_error": "skip"}]
    finally:
        registry.unregister("dataset", "test-reader")


# -- the reader base every domain reader builds on ------------------------------------------------
def test_reader_base_records_a_skipped_sample_once_and_data_check_says_why(tmp_path):
    from clipzoo.core.data.check import format_summary, summarize
    from clipzoo.core.data.reader import ReaderBase

    class Rows(ReaderBase):
        def __init__(self, path, on_error="raise"):
            super().__init__(path, split=None, on_error=on_error)
            for row, value in enumerate(["1", "x", "3", "../out"]):
                if value.startswith(".."):
                    self.keep_problem(BadSampleError(self.source, row, "value", "index row rejected"))
                    continue
                self.items.append((row, value))

        def _load(self, index):
            row, value = self.items[index]
            if not value.isdigit():
                raise BadSampleError(self.source, row, "value", f"{value!r} is not a number")
            return {"value": int(value), "split": "test"}

    with pytest.raises(BadSampleError, match="index row rejected"):
        Rows(tmp_path)
    rows = Rows(tmp_path, on_error="skip")
    assert [rows[i] for i in range(len(rows))] == [{"value": 1, "split": "test"}, None, {"value": 3, "split": "test"}]
    assert rows[1] is None  # a second epoch: skipped again, recorded once
    assert [p.reason for p in rows.problems] == ["index row rejected", "'x' is not a number"]
    summary = summarize(Rows(tmp_path, on_error="skip"))
    assert summary.n_samples == 2 and summary.n_problems == 2
    assert "'x' is not a number" in format_summary(summary)  # the reason, not just "skipped"
    with pytest.raises(IndexError):
        rows[3]


def test_bad_sample_errors_survive_pickling():
    import pickle

    from clipzoo.core.data.schema import UnsafePathError

    for error in (BadSampleError("a.csv", 3, "image", "cannot decode"), UnsafePathError("b.csv", None, "path", "escapes")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert (copy.source, copy.row, copy.field, copy.reason) == (error.source, error.row, error.field, error.reason)
