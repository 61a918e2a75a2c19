"""The 14 CheXpert observations and the uncertainty policies that turn their raw codes into labels.

The CheXpert labeler (Irvin et al. 2019, "CheXpert: A Large Chest Radiograph Dataset with
Uncertainty Labels and Expert Comparison", AAAI, arXiv 1901.07031, §"Labeler") codes each
observation of a report as ``1`` (positive), ``0`` (negative), ``-1`` (uncertain) or leaves it
blank (not mentioned). CheXpert's ``train.csv`` / ``valid.csv`` and MIMIC-CXR-JPG's
``mimic-cxr-2.0.0-chexpert.csv.gz`` / ``-negbio.csv.gz`` all use this coding (FIELD_NOTES §2).

Two independent choices turn a code into a schema label (``"label"``: 0/1 per class,
``"label_mask"``: 1 where the value is known, 0 where it is not):

- ``uncertain`` (what ``-1`` becomes), the paper's §"Uncertainty approaches":
  ``"ignore"`` (U-Ignore: unknown, masked), ``"zeros"`` (U-Zeros), ``"ones"`` (U-Ones), or
  ``"chexpert-mix"``: the per-class map GLoRIA and MGCA use (``CHEXPERT_UNCERTAIN_MAPPINGS``,
  "based on original chexpert paper") ``{Atelectasis: 1, Cardiomegaly: 0, Consolidation: 0,
  Edema: 1, Pleural Effusion: 1}`` — the best policy per competition class in the paper's
  Table 2. GLoRIA and MGCA train on those five classes only, so they say nothing about the
  other nine; here an uncertain value of those nine stays **unknown** (U-Ignore), the choice
  that does not invent a label.
- ``blank`` (what "not mentioned" becomes): ``"ignore"`` (unknown, masked; torchxrayvision
  maps blank to NaN) or ``"zero"`` (negative; GLoRIA's ``df.fillna(0)``).

``no_finding_negative=True`` additionally reads a blank as ``0`` in a row whose ``No Finding``
is ``1``: the labeler sets No Finding only when no pathology is positive or uncertain (paper,
§"Labeler"), so a blank there means "absent". torchxrayvision's ``CheX_Dataset`` applies this
to every pathology but Support Devices (a device is not a finding); its ``MIMIC_Dataset`` zeroes
Support Devices as well, which is not done here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from clipzoo.core.data.schema import BadSampleError

#: The 14 observations in the column order of CheXpert's ``train.csv`` (and MIMIC-CXR-JPG's
#: chexpert/negbio CSVs).
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The five CheXpert competition tasks (Irvin et al. 2019, §"Evaluation"), in GLoRIA's order.
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

#: GLoRIA / MGCA ``CHEXPERT_UNCERTAIN_MAPPINGS``: what an uncertain (-1) competition label becomes.
CHEXPERT_MIX = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones", "chexpert-mix")
BLANK_POLICIES = ("ignore", "zero")

#: observations that "No Finding = 1" does not imply absent (see the module docstring)
NOT_IMPLIED_BY_NO_FINDING = ("No Finding", "Support Devices")

_CODES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1}


def check_policies(uncertain: str, blank: str) -> None:
    """Validate an ``uncertain`` / ``blank`` policy pair (ValueError listing the choices)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank must be one of {BLANK_POLICIES}, got {blank!r}")


def can_be_unknown(uncertain: str, blank: str) -> bool:
    """Whether a policy pair can leave a value unknown, i.e. whether samples carry ``label_mask``."""
    return uncertain in ("ignore", "chexpert-mix") or blank == "ignore"


def parse_code(value: Any, source: str, row: int | str | None, column: str) -> int | None:
    """One raw CheXpert code: ``1``, ``0``, ``-1`` (ints, floats, or their strings ``"1.0"``...),
    or ``None`` for blank (``""``, ``None``, NaN). Anything else raises :class:`BadSampleError`
    naming ``source``, ``row`` and ``column``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text in _CODES:
            return _CODES[text]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            return None
        if value in (1, 0, -1):
            return int(value)
    raise BadSampleError(source, row, column, f"label value {value!r} is not 1, 0, -1 or blank")


def chexpert_labels(
    values: Sequence[Any] | Mapping[str, Any],
    source: str,
    row: int | str | None,
    *,
    names: Sequence[str] = CHEXPERT_LABELS,
    uncertain: str = "ignore",
    blank: str = "ignore",
    no_finding_negative: bool = False,
) -> tuple[list[int], list[int]]:
    """A raw row's codes -> ``(label, label_mask)``, both ``list[int]`` of ``len(names)``.

    ``values`` is either the codes in the order of ``names`` or a mapping column -> code (a CSV
    row). Unknown values (per the policies; see the module docstring) are ``0`` in ``label`` and
    ``0`` in ``label_mask``. A value other than 1/0/-1/blank raises :class:`BadSampleError`
    naming ``source``, ``row`` and the column.
    """
    check_policies(uncertain, blank)
    names = list(names)
    if isinstance(values, Mapping):
        raw = [values.get(name) for name in names]
    else:
        raw = list(values)
        if len(raw) != len(names):
            raise BadSampleError(source, row, None, f"expected {len(names)} label values, got {len(raw)}")
    codes = [parse_code(v, source, row, name) for v, name in zip(raw, names, strict=True)]
    healthy = no_finding_negative and "No Finding" in names and codes[names.index("No Finding")] == 1
    label, mask = [], []
    for name, code in zip(names, codes, strict=True):
        if code is None and healthy and name not in NOT_IMPLIED_BY_NO_FINDING:
            code = 0
        if code is None:
            value = 0 if blank == "zero" else None
        elif code == -1:
            if uncertain == "zeros":
                value = 0
            elif uncertain == "ones":
                value = 1
            elif uncertain == "chexpert-mix":
                value = CHEXPERT_MIX.get(name)
            else:
                value = None
        else:
            value = code
        label.append(0 if value is None else value)
        mask.append(0 if value is None else 1)
    return label, mask


__all__ = [
    "BLANK_POLICIES",
    "CHEXPERT_COMPETITION",
    "CHEXPERT_LABELS",
    "CHEXPERT_MIX",
    "NOT_IMPLIED_BY_NO_FINDING",
    "UNCERTAIN_POLICIES",
    "can_be_unknown",
    "check_policies",
    "chexpert_labels",
    "parse_code",
]
