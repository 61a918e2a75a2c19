"""Linear probe: multinomial logistic regression on frozen features, fitted by L-BFGS in float64.

Objective (``N`` training samples, weights ``W``, unpenalised bias ``b``)::

    mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||^2

This is scikit-learn's ``LogisticRegression(C=..., solver="lbfgs")`` objective divided by
``N * C``, so the two give the same solution when ``C = 1 / (N * weight_decay)``
(scikit-learn does not penalise the intercept with lbfgs either).

Features are standardised by default with the training mean and standard deviation
(constant features are left unscaled), which makes one ``weight_decay`` mean roughly the
same thing across models; the mapping to scikit-learn holds for the features as fitted.
Fitting starts from zeros and uses no randomness, so it is deterministic on a given device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .zero_shot import classification_metrics

logger = logging.getLogger(__name__)


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (train_x - mean) / std, (test_x - mean) / std


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 1000,
    tolerance: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the module's objective on ``(N, D)`` features and ``(N,)`` labels with L-BFGS
    (strong Wolfe line search); returns ``(W (D, C), b (C,))`` in ``x``'s dtype."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    if optimizer.state[weight].get("n_iter", 0) >= max_iter:
        logger.warning("linear probe: L-BFGS stopped at max_iter=%d before converging", max_iter)
    return weight.detach(), bias.detach()


def _select_weight_decay(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    val_fraction: float,
    seed: int,
    max_iter: int,
) -> float:
    """The grid value with the best top-1 on a random held-out slice of the training set
    (first one in grid order on a tie)."""
    n = x.shape[0]
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    val, fit = order[:n_val], order[n_val:]
    best, best_acc = weight_decays[0], -1.0
    for wd in weight_decays:
        weight, bias = fit_logistic_regression(x[fit], y[fit], num_classes, wd, max_iter)
        acc = ((x[val] @ weight + bias).argmax(dim=1) == y[val]).double().mean().item()
        logger.info("linear probe: weight_decay=%g held-out top1=%.4f", wd, acc)
        if acc > best_acc:
            best, best_acc = wd, acc
    return best


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 1000,
    standardize: bool = True,
    weight_decays: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    ks: Sequence[int] = (1, 5),
    num_classes: int | None = None,
) -> dict[str, float]:
    """Fit a multinomial logistic regression on ``(train_x, train_y)`` and score ``test_x``.

    Labels are class indices ``0..C-1`` (``C`` = ``num_classes`` or one more than the largest
    label seen). With ``weight_decays``, ``weight_decay`` is ignored: each grid value is
    fitted on the training set minus a held-out ``val_fraction`` (chosen by ``seed``), the
    best on the held-out part is kept, and the final model is refitted on all of the
    training set with it. Computed in float64 on ``train_x``'s device.

    Returns ``top{k}`` (k clipped to C), ``class_mean_accuracy`` and the ``weight_decay`` used.
    """
    train_x, test_x = train_x.double(), test_x.to(train_x.device).double()
    train_y = torch.as_tensor(train_y).reshape(-1).long().to(train_x.device)
    test_y = torch.as_tensor(test_y).reshape(-1).long().to(train_x.device)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) with one D; got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if train_x.shape[0] != train_y.numel() or test_x.shape[0] != test_y.numel():
        raise ValueError("each feature row needs exactly one label")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if standardize:
        train_x, test_x = _standardise(train_x, test_x)
    if weight_decays:
        weight_decay = _select_weight_decay(
            train_x, train_y, num_classes, list(weight_decays), val_fraction, seed, max_iter
        )
    weight, bias = fit_logistic_regression(train_x, train_y, num_classes, weight_decay, max_iter)
    out = classification_metrics(test_x @ weight + bias, test_y, ks)
    out["weight_decay"] = float(weight_decay)
    return out
