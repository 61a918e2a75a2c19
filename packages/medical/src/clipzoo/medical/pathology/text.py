"""Caption preprocessing for pathology image–text pairs: keep the sentences that describe what
the image shows.

Quilt-1M (Ikezogwo et al., NeurIPS 2023 Datasets & Benchmarks, §3 "Curating Quilt") splits each
narration into *medical text* and *ROI text* — the sentences about the region the image
shows — with an LLM, after ASR and LLM error correction; the lookup CSV ships the results
(``roi_text``, ``noisy_text``, ``corrected_text``; pick one with the Quilt-1M reader's
``caption_field``). Its other sources (PubMed figure captions, OpenPath tweets, LAION alt
text) carry the same kinds of non-visual text. :class:`CaptionFilter` is a rule-based,
configurable stand-in for that step, for captions that did not go through it (the
``pubmed``/``openpath``/``laion`` subsets, private reports): split into sentences, clean each,
drop the ones matching non-visual patterns, drop the too-short ones, rejoin.

Default rules (:data:`DEFAULT_DROP_PATTERNS`, one name each so a user can remove one), and why:

- ``history``: patient demographics and clinical history ("a 45-year-old woman presented
  with ...") — not visible in a patch;
- ``management``: treatment, prognosis, follow-up, survival — not visible;
- ``figure_reference``: "see Figure 2", "Table 1", "(panel B)" as a whole sentence's point —
  refers outside the image;
- ``credit``: "courtesy of", "reproduced from", copyright/licence lines — not content;
- ``narration``: YouTube teaching chatter (Quilt's source): "in this video", "subscribe",
  "thank you", "let's", "welcome", "next slide" — not content;
- ``question``: sentences ending in "?" (teaching questions, "what do you see here?").

Cleaning (:data:`DEFAULT_STRIP_PATTERNS`), applied before the rules: URLs, @mentions, the
``#`` of hashtags (the word stays: OpenPath tweets tag the diagnosis, "#melanoma"), and
parenthesised pointers "(arrow)", "(arrowheads)", "(asterisk)", "(Fig. 2B)" — the sentence
around a pointer usually does describe the image, so only the pointer goes. Sentences with
fewer than ``min_words`` words (default 3) are dropped. If nothing is left the result is ``""``
(a reader then treats the caption as empty: a bad sample).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: name -> regular expression (case-insensitive); a sentence matching any is dropped
DEFAULT_DROP_PATTERNS: dict[str, str] = {
    "history": r"\b(\d+[- ](year|yr|month|week|day)s?[- ]old|y/?o\b|history of|presented with|presents with|"
    r"complain(ed|s|ing)? of|admitted|clinical (history|information|presentation))",
    "management": r"\b(treat(ed|ment|ing)?|therap(y|ies)|chemotherapy|radiotherapy|surgery|resected for|prognos(is|tic)|"
    r"follow[- ]up|surviv(al|ed))\b",
    "figure_reference": r"^\W*(see )?(fig(ure)?|table|panel)s?\.?\s*\w*\W*$|\bsee (fig(ure)?|table)s?\b",
    "credit": r"\b(courtesy of|reproduced (with|from)|adapted from|copyright|all rights reserved|licen[cs]ed? under)\b|©",
    "narration": r"\b(in this (video|lecture|session)|subscribe|thank(s| you)|let'?s|welcome|today we|next slide|"
    r"i'?m going to|we'?re going to|stay tuned)\b",
    "question": r"\?\s*$",
}

#: name -> (pattern, replacement), applied in order to each sentence before the drop rules
DEFAULT_STRIP_PATTERNS: dict[str, tuple[str, str]] = {
    "url": (r"https?://\S+|www\.\S+", ""),
    "mention": (r"(?<!\w)@\w+", ""),
    "hashtag": (r"(?<!\w)#(\w)", r"\1"),
    "pointer": (r"\(\s*(arrows?|arrowheads?|asterisks?|\*+|fig(ure)?\.?\s*\w+|panel\s*\w)\s*\)", ""),
}

# abbreviations whose full stop does not end a sentence
_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "etc.", "fig.", "figs.", "dr.", "vs.", "approx.", "no.", "cf.", "ca.")
_PROTECT = "\u0000"
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9#@])|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a break after ``.``/``!``/``?`` followed by whitespace and a
    capital, digit, ``#`` or ``@`` (or at a newline); the full stops of common abbreviations
    (``e.g.``, ``et al.``, ``Fig.``, ...) and decimals (``2.5``) do not split."""
    protected = text
    for abbr in _ABBREVIATIONS:
        protected = re.sub(re.escape(abbr), lambda m: m.group(0).replace(".", _PROTECT), protected, flags=re.IGNORECASE)
    parts = _SPLIT.split(protected)
    return [p.replace(_PROTECT, ".").strip() for p in parts if p and p.strip()]


@dataclass
class CaptionFilter:
    """Keep the sentences of a caption that describe the image (see the module docstring).

    ``drop_patterns`` / ``strip_patterns``: name -> pattern (defaults above; pass a modified
    copy, or ``drop=("history", ...)`` to choose rules by name from the defaults);
    ``extra_drop``: more patterns; ``min_words``: shortest sentence kept; ``max_sentences``:
    keep at most this many (first ones). Picklable; call it on a string.
    """

    drop: Iterable[str] | None = None
    drop_patterns: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_DROP_PATTERNS))
    strip_patterns: Mapping[str, tuple[str, str]] = field(default_factory=lambda: dict(DEFAULT_STRIP_PATTERNS))
    extra_drop: Iterable[str] = ()
    min_words: int = 3
    max_sentences: int | None = None

    def __post_init__(self) -> None:
        chosen = dict(self.drop_patterns)
        if self.drop is not None:
            names = list(self.drop)
            unknown = [n for n in names if n not in chosen]
            if unknown:
                raise ValueError(f"CaptionFilter: unknown rule(s) {unknown}; rules are {sorted(chosen)}")
            chosen = {n: chosen[n] for n in names}
        self.drop = list(chosen)
        self._drop = [(name, re.compile(p, re.IGNORECASE)) for name, p in chosen.items()]
        self._drop += [(f"extra{i}", re.compile(p, re.IGNORECASE)) for i, p in enumerate(self.extra_drop)]
        self._strip = [(re.compile(p, re.IGNORECASE), r) for p, r in self.strip_patterns.values()]

    def clean(self, sentence: str) -> str:
        for pattern, replacement in self._strip:
            sentence = pattern.sub(replacement, sentence)
        sentence = re.sub(r"\s+([,.;:!?])", r"\1", sentence)
        return re.sub(r"\s{2,}", " ", sentence).strip()

    def why_dropped(self, sentence: str) -> str | None:
        """The name of the first rule that drops this (cleaned) sentence, ``"short"``, or ``None``."""
        for name, pattern in self._drop:
            if pattern.search(sentence):
                return name
        if len(re.findall(r"[A-Za-z0-9]+", sentence)) < self.min_words:
            return "short"
        return None

    def sentences(self, text: str) -> list[str]:
        """The kept, cleaned sentences."""
        kept = []
        for raw in split_sentences(text or ""):
            sentence = self.clean(raw)
            if sentence and self.why_dropped(sentence) is None:
                kept.append(sentence)
        return kept[: self.max_sentences] if self.max_sentences is not None else kept

    def __call__(self, text: str) -> str:
        return " ".join(self.sentences(text))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_drop", None)
        state.pop("_strip", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()


__all__ = ["DEFAULT_DROP_PATTERNS", "DEFAULT_STRIP_PATTERNS", "CaptionFilter", "split_sentences"]
