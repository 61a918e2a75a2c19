"""What an import produced and where it came from, and the model card that records it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model import ContrastiveModel


@dataclass
class Imported:
    """A converted model and its provenance: the source, its format, the Hub commit it was
    read at (when it came from the Hub), and the catalogue facts (licence, citation)."""

    model: ContrastiveModel
    source: str
    source_format: str
    revision: str | None = None
    licence: str | None = None
    citation: str | None = None
    notes: list[str] = field(default_factory=list)

    def save(self, folder: str | Path) -> Path:
        """Write the clipzoo model folder, with a card that records the provenance."""
        return self.model.save_pretrained(folder, card=self.card())

    def card(self) -> str:
        config = self.model.config
        towers = "\n".join(f"- `{m}`: {t.type}" for m, t in config.towers.items())
        front = ["library_name: clipzoo", "tags:", "- clipzoo", "- contrastive", "- imported"]
        spdx = _spdx(self.licence)
        if spdx:
            front.append(f"license: {spdx}")
        lines = [
            "---", *front, "---", "",
            f"# {config.architecture or self.source}", "",
            f"Converted by `clipzoo import` from `{self.source}` ({self.source_format}"
            + (f", commit `{self.revision}`" if self.revision else "") + ").",
            "The weights are the source's own, remapped key by key; nothing was trained.", "",
            f"Towers:\n{towers}\n\nEmbedding width: {config.embed_dim}.", "",
            f"Licence: {self.licence or 'not recorded; check the source before any use'}.", "",
        ]
        if self.notes:
            lines += ["Notes:", *(f"- {n}" for n in self.notes), ""]
        if self.citation:
            lines += ["Cite the original work:", "", "```bibtex", self.citation.strip(), "```", ""]
        lines += ["No evaluation results are recorded for this folder.", "",
                  "```python\nimport clipzoo.core\nmodel = clipzoo.core.load('PATH_OR_REPO')\n```", ""]
        return "\n".join(lines)


def _spdx(licence: Any) -> str | None:
    """A Hub ``license:`` value for the licences the catalogue states plainly."""
    known = {"mit": "mit", "apache-2.0": "apache-2.0", "cc-by-4.0": "cc-by-4.0", "cc-by-nc-4.0": "cc-by-nc-4.0"}
    return known.get(str(licence).strip().lower()) if licence else None
