"""Micro-benchmark of the one-process CLIP loss: two logit matmuls (a@bᵀ and b@aᵀ, as clipzoo
did before and open_clip's ``ClipLoss`` still does) against clipzoo's ``clip_loss`` (one matmul
and its transpose when there are no other ranks' rows).

    python -m tools.bench.clip_loss [--batch-sizes 32 1024 4096] [--dim 256] [--reps 20]

Forward + backward of the loss alone, on unit-norm embeddings that require gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def two_matmuls(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The previous formulation: both directions' logits computed separately."""
    logits_a = logit_scale * a @ b.T
    logits_b = logit_scale * b @ a.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits_a, target, reduction="sum") + F.cross_entropy(logits_b, target, reduction="sum")) / a.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, a0: torch.Tensor, b0: torch.Tensor, scale0: torch.Tensor, reps: int) -> dict[str, float]:  # noqa: ANN001
    device = a0.device
    times, peaks = [], []
    for i in range(reps + 2):
        a = a0.clone().requires_grad_()
        b = b0.clone().requires_grad_()
        scale = scale0.clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        fn(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale.exp()).backward()
        _sync(device)
        if i >= 2:  # two warm-up repetitions
            times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {"ms": 1000 * statistics.median(times), "peak_mib": statistics.median(peaks) if peaks else float("nan")}


def cpu_peak_mib(fn, a0: torch.Tensor, b0: torch.Tensor, scale0: torch.Tensor) -> float:  # noqa: ANN001
    """Peak RSS increase of one forward + backward (call after ``pin_glibc_allocator``)."""
    from tools.bench.train_step import PeakMemory

    a, b, scale = a0.clone().requires_grad_(), b0.clone().requires_grad_(), scale0.clone().requires_grad_()
    probe = PeakMemory(torch.device("cpu"))
    probe.start()
    fn(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale.exp()).backward()
    return probe.stop()["peak_mib"]


def main(argv: list[str] | None = None) -> int:
    from clipzoo.core.losses import clip_loss

    p = argparse.ArgumentParser(prog="python -m tools.bench.clip_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024, 4096])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, dim {args.dim}, fp32")
    rows = []
    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        a0 = torch.randn(batch, args.dim, generator=gen).to(device)
        b0 = torch.randn(batch, args.dim, generator=gen).to(device)
        scale0 = torch.tensor(2.659, device=device)
        with torch.no_grad():
            an, bn = F.normalize(a0, dim=-1), F.normalize(b0, dim=-1)
            diff = (two_matmuls(an, bn, scale0.exp()) - clip_loss(an, bn, scale0.exp())).abs().item()
        old, new = [], []
        for _ in range(3):  # interleaved rounds against drift
            old.append(measure(two_matmuls, a0, b0, scale0, args.reps))
            new.append(measure(clip_loss, a0, b0, scale0, args.reps))
        old_ms = statistics.median(r["ms"] for r in old)
        new_ms = statistics.median(r["ms"] for r in new)
        rows.append([batch, old_ms, new_ms, old[0]["peak_mib"], new[0]["peak_mib"], diff, a0, b0, scale0])
    if device.type == "cpu":  # memory after all timing: the pinned allocator slows allocation down
        from tools.bench.train_step import pin_glibc_allocator

        pinned = pin_glibc_allocator()
        for row in rows:
            a0, b0, scale0 = row[6:]
            row[3] = statistics.median(cpu_peak_mib(two_matmuls, a0, b0, scale0) for _ in range(3))
            row[4] = statistics.median(cpu_peak_mib(clip_loss, a0, b0, scale0) for _ in range(3))
        print(f"CPU peak = RSS increase of one forward+backward (glibc mmap threshold pinned: {pinned})")
    print("| batch | two matmuls ms | clip_loss ms | speed-up | two matmuls peak MiB | clip_loss peak MiB | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, old_ms, new_ms, old_mib, new_mib, diff, *_ in rows:
        print(f"| {batch} | {old_ms:.3f} | {new_ms:.3f} | {old_ms / new_ms:.2f}x | {old_mib:.1f} | {new_mib:.1f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
