"""The chest X-ray tower's preprocessing contract: grey -> channels, pad vs crop geometry
(hand-computed layouts), normalisation values, every input kind (PIL modes, arrays, DICOM and
image paths), augmentation seeding, picklability, the model-folder round trip, and LoRA."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.adapt import PeftSpec, apply_peft
from clipzoo.core.config import TowerConfig
from clipzoo.core.data.collate import Collator
from clipzoo.core.errors import ConfigError
from clipzoo.medical.cxr.tower import (
    BIOVIL_PREPROCESS,
    CHEXZERO_PREPROCESS,
    MEDCLIP_PREPROCESS,
    CXRImageTower,
    CXRTransform,
    check_preprocess,
    preset,
    to_grey,
)

TINY_ARGS = {"model_name": "vit_tiny_patch16_224",
             "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def _pre(**over):
    return {"channels": 1, "size": [8, 8], "resize": "pad", "mean": 0.5, "std": 0.25, "augment": None, **over}


def _tower(channels=1, **pre):
    config = TowerConfig(type="medical/cxr-image", args=copy.deepcopy(TINY_ARGS),
                         preprocess={"channels": channels, "mean": 0.5, "std": 0.25, **pre})
    return CXRImageTower(config, 16)


# -- geometry (hand-computed) -------------------------------------------------------------
def test_pad_geometry_matches_chexzero_layout():
    # a 4 x 8 white image into 8 x 8: ratio 1, pasted at rows (8 - 4) // 2 = 2..5, zero elsewhere
    out = CXRTransform(_pre(mean=0.0, std=1.0))(np.ones((4, 8), dtype=np.float32))
    assert out.shape == (1, 8, 8)
    want = torch.zeros(8, 8)
    want[2:6] = 1.0
    torch.testing.assert_close(out[0], want)
    # 3 x 10 into 8 x 8: ratio 0.8, new (int(2.4), int(8.0)) = (2, 8), top (8 - 2) // 2 = 3
    out = CXRTransform(_pre(mean=0.0, std=1.0))(np.ones((3, 10), dtype=np.float32))
    assert out[0].sum(1).nonzero().flatten().tolist() == [3, 4]
    assert torch.allclose(out[0, 3:5], torch.ones(2, 8), atol=1e-6)


def test_crop_geometry_resizes_shorter_side_then_centre_crops():
    # 8 x 16 image, columns numbered 0..15; resize_size 8 keeps it; centre crop 8 x 8 -> cols 4..11
    ramp = np.tile(np.arange(16, dtype=np.float32) / 15, (8, 1))
    out = CXRTransform(_pre(resize="crop", mean=0.0, std=1.0))(ramp)
    torch.testing.assert_close(out[0], torch.from_numpy(ramp[:, 4:12]))
    # BioViL-style 512 -> 480 on a 600 x 800 image: shorter side 512 (longer int(512 * 800 / 600) = 682), crop offsets
    # round((512 - 480) / 2) = 16 and round((682 - 480) / 2) = 101: the corner pixel is a resized interior pixel
    pre = {**BIOVIL_PREPROCESS, "augment": None}
    big = np.zeros((600, 800), dtype=np.float32)
    out = CXRTransform(pre)(big)
    assert out.shape == (3, 480, 480)
    # a bright frame 10 px wide is cropped away entirely: 16 / (512 / 600) = 18.75 px > 10 rows, 101 / 0.853 > 10 cols
    big[:10], big[-10:], big[:, :10], big[:, -10:] = 1, 1, 1, 1
    assert float(CXRTransform(pre)(big).abs().max()) < 1e-6


def test_grey_is_replicated_and_normalised():
    grey = np.full((16, 16), 0.6, dtype=np.float32)
    out = CXRTransform({**MEDCLIP_PREPROCESS, "augment": None})(grey)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    inside = (0.6 - 0.5862785803043838) / 0.27950088968644304
    torch.testing.assert_close(out[:, 100, 100], torch.full((3,), inside), atol=1e-5, rtol=0)
    # CheXzero's Normalize(101.48761, 83.43944) on 0-255 pixels: a 0-valued pad pixel -> -101.48761 / 83.43944
    wide = np.full((10, 20), 0.6, dtype=np.float32)
    out = CXRTransform({**CHEXZERO_PREPROCESS, "augment": None})(wide)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(-101.48761 / 83.43944), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 112, 112], torch.tensor((0.6 * 255 - 101.48761) / 83.43944), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "I", "F", "P", "1"])
def test_every_pil_mode_becomes_grey_in_unit_range(mode):
    base = (np.arange(64, dtype=np.float64).reshape(8, 8) / 63)
    if mode == "I;16":
        img = Image.fromarray((base * 65535).astype(np.uint16))
        assert img.mode == "I;16"
        want = (base * 65535).astype(np.uint16) / 65535
    elif mode == "I":
        img = Image.fromarray((base * 65535).astype(np.int32), "I")
        want = (base * 65535).astype(np.int32) / 65535
    elif mode == "F":
        img = Image.fromarray(base.astype(np.float32), "F")
        want = base
    else:
        grey = Image.fromarray((base * 255).astype(np.uint8), "L")
        img = grey.convert(mode)
        want = np.asarray(img.convert("L"), dtype=np.float64) / 255
    out = to_grey(img)
    assert out.dtype == torch.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)
    if mode in ("RGB", "RGBA", "P"):  # equal r = g = b -> the grey value itself
        np.testing.assert_allclose(out.numpy(), np.asarray(Image.fromarray((base * 255).astype(np.uint8))) / 255,
                                   atol=1 / 255)


def test_arrays_and_their_errors():
    u8 = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    np.testing.assert_allclose(to_grey(u8).numpy(), u8 / 255, atol=1e-7)
    u16 = np.array([[0, 65535], [4095, 1]], dtype=np.uint16)
    np.testing.assert_allclose(to_grey(u16).numpy(), u16 / 65535, atol=1e-7)
    np.testing.assert_allclose(to_grey(torch.tensor([[0.25, 0.5]])).numpy(), [[0.25, 0.5]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_grey(np.array([[0.0, 2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        to_grey(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        to_grey(np.array([[0, 4095]], dtype=np.int32))
    with pytest.raises(ValueError, match="2-D"):
        to_grey(np.zeros((2, 3, 5), dtype=np.float32))
    with pytest.raises(TypeError):
        to_grey(3.0)


def test_paths_jpg_png_and_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = (np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
    Image.fromarray(grey, "L").save(tmp_path / "a.png")
    np.testing.assert_allclose(to_grey(tmp_path / "a.png").numpy(), grey / 255, atol=1e-7)
    Image.fromarray(grey, "L").convert("RGB").save(tmp_path / "a.jpg", quality=100)
    assert to_grey(str(tmp_path / "a.jpg")).shape == (6, 8)
    # a 12-bit MONOCHROME1 DICOM: stored s -> 1 - s / 4095 (inverted, scaled by 2**BitsStored - 1)
    stored = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 80)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 6, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    del pydicom
    np.testing.assert_allclose(to_grey(tmp_path / "x.dcm").numpy(), 1 - stored / 4095, atol=1e-6)
    out = CXRTransform(_pre(size=[6, 8], mean=0.0, std=1.0))(tmp_path / "x.dcm")
    np.testing.assert_allclose(out[0].numpy(), 1 - stored / 4095, atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        to_grey(tmp_path / "bad.png")


def test_preprocess_validation():
    with pytest.raises(ConfigError, match="channels"):
        check_preprocess({"size": 8, "channels": 2})
    with pytest.raises(ConfigError, match="resize"):
        check_preprocess({"size": 8, "resize": "stretch"})
    with pytest.raises(ConfigError, match="unknown preprocess"):
        check_preprocess({"size": 8, "crop_pct": 0.9})
    with pytest.raises(ConfigError, match="augment.scale"):
        check_preprocess({"size": 8, "augment": {"scale": [0.5, 1.5]}})
    with pytest.raises(ConfigError, match="in_chans"):
        CXRImageTower(TowerConfig(type="medical/cxr-image", args={"model_name": "vit_tiny_patch16_224",
                                                                  "kwargs": {**TINY_ARGS["kwargs"], "in_chans": 3}},
                                  preprocess={"channels": 1}), 16)
    assert preset("biovil")["augment"]["rotate_deg"] == 10.0 and preset("chexzero")["resize"] == "pad"


def test_augmentation_is_seeded_modest_and_picklable():
    rng = np.random.default_rng(0)
    img = rng.random((40, 30)).astype(np.float32)
    pre = _pre(size=[16, 16], augment={})
    pre["augment"] = {"scale": [0.75, 1.0], "rotate_deg": 10.0}
    train, evaluate = CXRTransform(pre, train=True), CXRTransform(pre)
    torch.manual_seed(1)
    a = train(img)
    torch.manual_seed(1)
    torch.testing.assert_close(train(img), a)
    torch.manual_seed(2)
    assert not torch.allclose(train(img), a)
    assert torch.equal(evaluate(img), evaluate(img))  # eval is deterministic
    # with every random range collapsed, the training geometry reproduces the evaluation view
    smooth = np.outer(np.linspace(0, 1, 40), np.linspace(0.2, 1, 30)).astype(np.float32)
    for resize in ("pad", "crop"):
        still = _pre(size=[16, 16], resize=resize, augment={"scale": [1, 1], "ratio": [1, 1], "rotate_deg": 0.0,
                                                             "brightness": 0.0, "contrast": 0.0})
        torch.testing.assert_close(CXRTransform(still, train=True)(smooth), CXRTransform(still)(smooth),
                                   atol=0.05 / 0.25, rtol=0)
    clone = pickle.loads(pickle.dumps(train))
    torch.manual_seed(1)
    torch.testing.assert_close(clone(img), a)
    # the core Collator seeds it per sample
    model = cz.ContrastiveModel(_config(channels=1))
    collate = Collator(model, train=True, modalities=["image"])
    samples = [{"image": img, "seed": 7}, {"image": img, "seed": 8}]
    x, y = collate(samples)["image"], collate(samples)["image"]
    torch.testing.assert_close(x, y)
    assert not torch.allclose(x[0], x[1])


def _config(channels: int = 3):
    config = registry.build("architecture", "medical/cxr-tiny")
    image = config.towers["image"]
    image.preprocess["channels"] = channels
    image.args["kwargs"]["in_chans"] = channels
    return config


@pytest.mark.parametrize("channels", [1, 3])
def test_preprocess_survives_save_and_load(tmp_path, channels):
    torch.manual_seed(0)
    config = _config(channels)
    config.towers["image"].preprocess.update({"resize": "crop", "resize_size": 72, "mean": 0.4, "std": 0.3,
                                              "interpolation": "bicubic", "voi_lut": True})
    model = cz.ContrastiveModel(config).eval()
    raw = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (90, 70), dtype=np.uint8)) for i in range(2)]
    batch = model.prepare("image", raw)
    assert batch.shape == (2, channels, 64, 64)
    assert torch.equal(batch[:, 0], batch[:, -1])
    with torch.no_grad():
        want = model.encode_images(raw)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["towers"]["image"]
    assert saved["type"] == "medical/cxr-image" and saved["provider"]["package"] == "clipzoo-medical"
    assert saved["preprocess"]["resize"] == "crop" and saved["preprocess"]["resize_size"] == 72
    assert saved["preprocess"]["mean"] == 0.4 and saved["preprocess"]["voi_lut"] is True
    assert saved["args"]["kwargs"]["in_chans"] == channels
    loaded = cz.load(tmp_path / "m")
    assert loaded.config.towers["image"].preprocess == model.config.towers["image"].preprocess
    torch.testing.assert_close(loaded.prepare("image", raw), batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(raw), want)


def test_resnet_tower_builds_with_one_channel():
    config = TowerConfig(type="medical/cxr-image", args={"model_name": "resnet18", "kwargs": {}},
                         preprocess={"channels": 1, "size": 32})
    tower = CXRImageTower(config, 8).eval()
    assert tower.model.conv1.in_channels == 1 and tower.config.args["kwargs"]["in_chans"] == 1
    out = tower(tower.prepare([np.zeros((40, 50), dtype=np.float32)]), return_tokens=True)
    assert out.pooled.shape == (1, 8) and out.tokens.shape == (1, 1, 512)  # 32 px / stride 32: one position, width 512


def test_lora_on_the_cxr_image_tower():
    torch.manual_seed(0)
    model = cz.ContrastiveModel(_config(1)).train()
    targets = model.peft_target_modules(["image"])
    assert targets and all(t.startswith("towers.image.model.blocks.") for t in targets)
    x = model.prepare("image", [np.random.default_rng(i).random((64, 64)).astype(np.float32) for i in range(4)])
    with torch.no_grad():
        base = model.encode("image", x)
    count = apply_peft(model, PeftSpec(towers=["image"], rank=4))
    assert 0 < count.trainable < count.total
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("logit.") for n in trainable)
    assert {n.rsplit(".lora_", 1)[0] for n in trainable if "lora_" in n} == set(targets)
    with torch.no_grad():  # B starts at zero: the adapter changes nothing before training
        torch.testing.assert_close(model.encode("image", x), base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = (model.encode("image", x) - torch.eye(4, 64)).square().sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    with torch.no_grad():
        assert not torch.allclose(model.encode("image", x), base, atol=1e-4)
