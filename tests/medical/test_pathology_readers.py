"""Pathology readers on golden fixtures (tests/fixtures/medical/pathology, see make_fixtures.py):
Quilt-1M's many-to-many lookup rows, subsets and flags, bad rows, path escapes, missing
columns; class-per-folder patches with CONCH prompt files and en_classnames.json; the caption
filter; ``clipzoo data check``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipzoo.core import registry
from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, UnsafePathError
from clipzoo.medical.pathology.data import PatchFolder, Quilt1M
from clipzoo.medical.pathology.prompts import load_conch_prompts, parse_conch_prompts
from clipzoo.medical.pathology.text import CaptionFilter, split_sentences

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "medical" / "pathology"
QUILT = FIXTURES / "quilt1m"
PATCHES = FIXTURES / "patches"
SHARED = "Dense lymphocytic infiltrate surrounds the ducts."


def _quilt(**options):
    return Quilt1M(QUILT, image_root="images", on_error="skip", **options)


# -- Quilt-1M -------------------------------------------------------------------------------
def test_quilt_many_to_many_rows():
    data = _quilt()
    # rows 5 (unknown subset) and 6 (empty caption) are rejected while indexing
    assert [p.row for p in data.problems] == [5, 6]
    assert "subset" in str(data.problems[0]) and "twitter" in str(data.problems[0])
    assert data.problems[1].field == "caption" and "empty caption" in str(data.problems[1])
    assert len(data) == 7
    meta = [data.metadata(i) for i in range(len(data))]
    # one image with two captions: both samples carry the same image_id
    assert [m["image_id"] for m in meta[:2]] == ["a.jpg", "a.jpg"] and meta[0]["text"] != meta[1]["text"]
    # one caption text shared by two images: two samples, two image ids
    shared = [m for m in meta if m["text"] == SHARED]
    assert [m["image_id"] for m in shared] == ["b.jpg", "c.png"]
    assert data.captions_per_image() == {"a.jpg": 2, "b.jpg": 1, "c.png": 1, "d.jpg": 1, "missing.jpg": 1,
                                         "broken.jpg": 1}
    sample = data[0]
    assert isinstance(sample["image"], Image.Image) and sample["image"].size == (8, 8) and sample["image"].mode == "RGB"
    assert sample["id"] == "quilt1m-0" and sample["split"] == "train" and sample["subset"] == "quilt"
    # the image that was never downloaded and the one that does not decode are skipped at load time
    assert data[5] is None and data[6] is None


def test_quilt_bad_image_raises_naming_the_file():
    data = Quilt1M(QUILT, image_root="images", subsets=["pubmed"], split="train")
    assert [data.metadata(i)["image_id"] for i in range(len(data))] == ["b.jpg", "missing.jpg"]
    with pytest.raises(BadSampleError, match=r"quilt_1M_lookup.csv, row 7, field 'image_path'.*missing.jpg"):
        data[1]


def test_quilt_raise_policy_stops_at_the_first_bad_row():
    with pytest.raises(BadSampleError, match=r"row 5, field 'subset'"):
        Quilt1M(QUILT, image_root="images")


@pytest.mark.parametrize(
    ("options", "images"),
    [
        ({"subsets": ["quilt"]}, ["a.jpg", "a.jpg"]),
        ({"subsets": "openpath"}, ["c.png"]),
        ({"subsets": ["pubmed", "laion"]}, ["b.jpg", "d.jpg", "missing.jpg", "broken.jpg"]),
        ({"split": "val"}, ["c.png"]),
        ({"split": "test"}, ["broken.jpg"]),
        ({"exclude_not_histology": True}, ["a.jpg", "a.jpg", "b.jpg", "c.png", "missing.jpg", "broken.jpg"]),
        ({"single_wsi": True}, ["a.jpg", "a.jpg", "d.jpg", "missing.jpg", "broken.jpg"]),
        ({"single_wsi": False}, ["b.jpg", "c.png"]),
    ],
)
def test_quilt_filters(options, images):
    data = _quilt(**options)
    assert [data.metadata(i)["image_id"] for i in range(len(data))] == images
    assert sum(data.filtered.values()) + len(data) + len(data.problems) == 9


def test_quilt_caption_field_and_fallback():
    corrected = _quilt(caption_field="corrected_text")
    texts = {corrected.metadata(i)["id"]: corrected.metadata(i)["text"] for i in range(len(corrected))}
    assert texts["quilt1m-0"].endswith("(corrected).")
    assert texts["quilt1m-6"] == "Only the corrected text is present."  # row 6 is usable with this field
    # rows without corrected text are bad under that field, unless a fallback is named
    assert {p.row for p in corrected.problems} == {2, 3, 4, 5, 7, 8}
    fallback = _quilt(caption_field="corrected_text", caption_fallback="caption")
    assert {p.row for p in fallback.problems} == {5}
    assert fallback.metadata([fallback.metadata(i)["id"] for i in range(len(fallback))].index("quilt1m-2"))["text"] == SHARED
    with pytest.raises(ValueError, match="caption_field"):
        _quilt(caption_field="med_umls_ids")


def test_quilt_text_transform_applies_the_caption_filter():
    data = _quilt(text_transform=True)
    row1 = next(data.metadata(i) for i in range(len(data)) if data.metadata(i)["id"] == "quilt1m-1")
    assert row1["text"] == "The tumour cells show prominent nucleoli."


def test_quilt_path_escape_is_never_skipped():
    with pytest.raises(UnsafePathError, match=r"row 1, field 'image_path'.*outside the dataset root"):
        Quilt1M(FIXTURES / "quilt1m_unsafe", image_root="images", on_error="skip")


def test_quilt_missing_column_names_file_and_column():
    with pytest.raises(DatasetFormatError, match=r"quilt1m_missing_column/quilt_1M_lookup.csv: missing column\(s\) \['subset'\]"):
        Quilt1M(FIXTURES / "quilt1m_missing_column")
    with pytest.raises(DatasetFormatError, match="no such file"):
        Quilt1M(FIXTURES / "nowhere")


def test_quilt_flag_filter_needs_its_column(tmp_path):
    lines = (QUILT / "quilt_1M_lookup.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, c in enumerate(header) if c != "not_histology"]
    (tmp_path / "quilt_1M_lookup.csv").write_text(
        "\n".join(",".join(line.split(",")[i] for i in keep) for line in lines[:2]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) \['not_histology'\]"):
        Quilt1M(tmp_path, exclude_not_histology=True)
    assert len(Quilt1M(tmp_path)) == 1  # without the filter the column is not needed


def test_quilt_stain_transform_option_and_pickling():
    data = _quilt(image_transform={"type": "hed-jitter", "sigma": 0.0})
    plain = _quilt()
    diff = np.abs(np.asarray(data[0]["image"], dtype=int) - np.asarray(plain[0]["image"], dtype=int))
    assert diff.max() <= 1  # sigma = 0: the identity up to rounding
    assert not np.array_equal(np.asarray(_quilt(image_transform={"type": "hed-jitter", "sigma": 0.3})[0]["image"]),
                              np.asarray(plain[0]["image"]))
    again = pickle.loads(pickle.dumps(data))  # DataLoader workers (spawn) pickle the reader
    assert again.metadata(0) == data.metadata(0)
    assert [str(p) for p in again.problems] == [str(p) for p in data.problems] and len(again.problems) == 2


def test_quilt_data_check_cli(capsys, caplog):
    from clipzoo.core import cli

    code = cli.main(["data", "check", str(QUILT), "--format", "medical/quilt1m", "--option", "image_root=\"images\""])
    captured = capsys.readouterr()
    out, logged = captured.out, captured.err + caplog.text
    assert code == 0
    assert "quilt_1M_lookup.csv" in out and "samples: 5 (train: 4, val: 1)" in out
    assert "images: 4 unique; captions per image: min 1, mean 1.25, max 2" in out
    # 2 rows rejected while indexing (named by CSV row) + 2 images that fail to load
    assert "problems: 4" in out and "row 5, field 'subset'" in out and "row 6, field 'caption': empty caption" in out
    assert "row 7, field 'image_path': cannot decode image missing.jpg" in logged
    assert "row 8, field 'image_path': cannot decode image broken.jpg" in logged


# -- patch folders --------------------------------------------------------------------------
def test_patch_folder_sorted_classes_and_samples():
    data = PatchFolder(PATCHES, split="train")
    assert data.classnames == ["ADI", "LYM", "STR"] and len(data) == 9  # notes.txt is ignored
    labels = [data[i]["label"] for i in range(len(data))]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    sample = data[4]
    assert sample["id"] == "LYM/lym_1.jpg" and sample["split"] == "train" and sample["text"] == "LYM"
    assert sample["image"].mode == "RGB" and sample["image"].size == (8, 8)
    assert registry.build("dataset", "medical/patch-folder", path=str(PATCHES), split="test").classnames == ["ADI", "LYM", "STR"]


def test_patch_folder_with_conch_prompts_and_classnames_file():
    data = PatchFolder(PATCHES, split="test", prompts=PATCHES / "conch_prompts.json")
    assert data.folders == ["ADI", "LYM", "STR"] and data.classnames == ["adipose tissue", "lymphocytes", "stroma"]
    assert data.synonyms == [["adipose tissue", "fat"], ["lymphocytes"], ["stroma", "fibrous stroma"]]
    assert data.templates == ["{}.", "an H&E image of {}.", "a {{curly}} image of {}."]
    assert data.templates[2].format("fat") == "a {curly} image of fat."
    named = PatchFolder(PATCHES, split="test", classnames=PATCHES / "en_classnames.json")
    assert named.classnames == ["adipose", "lymphocytes", "stroma"] and named[0]["text"] == "adipose"
    subset = PatchFolder(PATCHES, split="test", classnames=["stroma", "fat"], folders=["STR", "ADI"],
                         ignore_extra_folders=True)
    assert [subset[i]["label"] for i in range(len(subset))] == [0, 0, 1, 1] and subset[0]["id"].startswith("STR/")


def test_patch_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such file or folder"):
        PatchFolder(PATCHES, split="val")
    with pytest.raises(DatasetFormatError, match=r"class folder\(s\) \['TUM'\] not found"):
        PatchFolder(PATCHES, split="test", folders=["ADI", "TUM"], ignore_extra_folders=True)
    with pytest.raises(DatasetFormatError, match=r"folder\(s\) \['STR'\] are not among the classes"):
        PatchFolder(PATCHES, split="test", folders=["ADI", "LYM"])
    with pytest.raises(DatasetFormatError, match="2 class names for 3 class folders"):
        PatchFolder(PATCHES, split="test", classnames=["a", "b"])
    bad = tmp_path / "LYM"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    data = PatchFolder(tmp_path, on_error="skip")
    assert data[0] is None
    with pytest.raises(BadSampleError, match=r"row LYM/x.png.*cannot decode"):
        PatchFolder(tmp_path)[0]


def test_patch_folder_symlink_out_of_root_is_unsafe(tmp_path):
    (tmp_path / "A").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (tmp_path / "A" / "link.png").symlink_to(outside)
    data = PatchFolder(tmp_path, on_error="skip")
    with pytest.raises(UnsafePathError):
        data[0]


def test_conch_prompt_file_errors(tmp_path):
    prompts = load_conch_prompts(PATCHES / "conch_prompts.json")
    assert prompts.keys == ["ADI", "LYM", "STR"]
    with pytest.raises(DatasetFormatError, match="exactly once"):
        parse_conch_prompts({"0": {"classnames": {"A": ["a"]}, "templates": ["no placeholder"]}})
    with pytest.raises(DatasetFormatError, match="at least one non-empty synonym"):
        parse_conch_prompts({"0": {"classnames": {"A": []}, "templates": ["CLASSNAME"]}})
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="p.json: not a readable JSON"):
        load_conch_prompts(tmp_path / "p.json")


# -- caption filter -------------------------------------------------------------------------
def test_sentence_split_keeps_abbreviations_and_decimals():
    text = "Cells are large, e.g. 2.5 times normal (Fig. 2B). Mitoses, i.e. figures, abound! Is it benign? No."
    assert split_sentences(text) == ["Cells are large, e.g. 2.5 times normal (Fig. 2B).", "Mitoses, i.e. figures, abound!",
                                     "Is it benign?", "No."]


def test_caption_filter_rules():
    text = ("A 45-year-old woman presented with a breast mass. Sections show nests of atypical cells (arrow). "
            "See Figure 2. Courtesy of Dr. Smith. What do you see here? In this video we review the slide. "
            "She was treated with chemotherapy. #melanoma with pagetoid spread https://t.co/x @user. OK.")
    keep = CaptionFilter()
    assert keep.sentences(text) == ["Sections show nests of atypical cells.", "melanoma with pagetoid spread."]
    reasons = [keep.why_dropped(keep.clean(s)) for s in split_sentences(text)]
    assert reasons == ["history", None, "figure_reference", "credit", "question", "narration", "management", None,
                       "short"]
    only_history = CaptionFilter(drop=["history"], min_words=1)
    assert "See Figure 2." in only_history(text) and "45-year-old" not in only_history(text)
    assert CaptionFilter(extra_drop=[r"\bmelanoma\b"])(text) == "Sections show nests of atypical cells."
    assert CaptionFilter(max_sentences=1)(text) == "Sections show nests of atypical cells."
    assert keep("See Figure 2.") == "" and keep("") == ""
    with pytest.raises(ValueError, match="unknown rule"):
        CaptionFilter(drop=["nonsense"])
    assert pickle.loads(pickle.dumps(only_history))(text) == only_history(text)
