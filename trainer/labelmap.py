"""Labels from tags: StudyDescription / BodyPartExamined terms to the five classes, never guessed.

The mapping is a YAML file (the documented default ships as ``trainer/label_map.yaml``)::

    classes: {neck: [neck, cuello, ...], lungs: [...], liver: [...], pelvis: [...], legs: [...]}
    other: [head, spine, ...]       # regions outside the five classes
    broader: {abdomen: [liver, pelvis], ...}   # coarse regions holding several classes
    ignore: [ct, contrast, ...]     # words that name no region

Text is compared after :func:`normalize` (accents removed, case folded, punctuation to spaces), so
``torax`` finds ``Tórax``. A term matches whole words; a trailing ``*`` matches a word prefix.
:func:`label_for` returns a :class:`Label` whose ``region`` is set only when every term found names
the same class; otherwise ``status`` says ``ambiguous`` or ``unmapped`` and the series is left out.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

CLASSES = ("neck", "lungs", "liver", "pelvis", "legs")
OTHER = "other"
_WITHIN = "within:"  # evidence class of a `broader` term: "within:liver|pelvis"

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str | None) -> str:
    """Lower-case ASCII words separated by single spaces: accents removed, ``ß`` to ``ss``, punctuation dropped.

    >>> normalize("CT Tórax/ABDOMEN  c/c")
    'ct torax abdomen c c'
    """
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", str(text).casefold())
    ascii_text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    ascii_text = ascii_text.replace("ø", "o").replace("æ", "ae").replace("œ", "oe").replace("ł", "l")
    return _NON_WORD.sub(" ", ascii_text).strip()


def term_regex(term: str) -> re.Pattern[str]:
    """The regex of one mapping term over normalized text: whole words, ``*`` at the end for a prefix."""
    prefix = term.strip().endswith("*")
    words = normalize(term.strip().rstrip("*"))
    if not words:
        raise ValueError(f"label map term {term!r} is empty once normalized")
    body = re.escape(words).replace(r"\ ", " ")
    return re.compile(r"(?<![0-9a-z])" + body + (r"[0-9a-z]*" if prefix else "") + r"(?![0-9a-z])")


@dataclass(frozen=True)
class Label:
    """The outcome of labelling one series from its tags."""

    status: str  # "labelled", "ambiguous" or "unmapped"
    region: str = ""  # one of CLASSES when status == "labelled"
    evidence: tuple[tuple[str, str, str], ...] = ()  # (tag, term, class / "other" / "within:liver|pelvis")

    @property
    def ok(self) -> bool:
        return self.status == "labelled"

    def describe(self) -> str:
        """Human-readable reason: which tag named which class, e.g. ``StudyDescription:liver->liver``."""
        if not self.evidence:
            return "no mapped term in StudyDescription or BodyPartExamined"
        return "; ".join(f"{tag}:{term}->{cls}" for tag, term, cls in self.evidence)


@dataclass
class LabelMap:
    """Terms per class, terms of other regions, and ignored words (see the module docstring)."""

    classes: dict[str, list[str]]
    other: list[str] = field(default_factory=list)
    broader: dict[str, list[str]] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.classes) - set(CLASSES))
        if unknown:
            raise ValueError(f"label map {self.source or ''}: unknown class(es) {', '.join(unknown)}; "
                             f"the classes are {', '.join(CLASSES)}")
        for term, held in self.broader.items():
            bad = sorted(set(held) - set(CLASSES))
            if bad or not held:
                raise ValueError(f"label map {self.source or ''}: broader term {term!r} must list classes among "
                                 f"{', '.join(CLASSES)} (got {held!r})")
        seen: dict[str, str] = {}
        for cls, terms in [*self.classes.items(), (OTHER, self.other), ("broader", list(self.broader))]:
            for term in terms:
                key = normalize(str(term).rstrip("*")) + ("*" if str(term).strip().endswith("*") else "")
                if key in seen and seen[key] != cls:
                    raise ValueError(f"label map {self.source or ''}: term {term!r} is listed under both "
                                     f"{seen[key]!r} and {cls!r}")
                seen[key] = cls

    @cached_property
    def _patterns(self) -> list[tuple[str, str, re.Pattern[str]]]:
        patterns = [(cls, term, term_regex(term)) for cls, terms in self.classes.items() for term in terms]
        patterns += [(OTHER, term, term_regex(term)) for term in self.other]
        patterns += [(_WITHIN + "|".join(held), term, term_regex(term)) for term, held in self.broader.items()]
        # Longer terms first, so "lower extremity" is reported rather than a shorter term inside it.
        return sorted(patterns, key=lambda p: -len(p[1]))

    def terms_in(self, text: str | None) -> list[tuple[str, str]]:
        """(term, class) for every term of the map found in ``text``."""
        norm = normalize(text)
        if not norm:
            return []
        return [(term, cls) for cls, term, rx in self._patterns if rx.search(norm)]

    def label(self, study_description: str | None, body_part_examined: str | None) -> Label:
        """Label a series from its study's description and its BodyPartExamined."""
        evidence: list[tuple[str, str, str]] = []
        for tag, text in (("StudyDescription", study_description), ("BodyPartExamined", body_part_examined)):
            evidence += [(tag, term, cls) for term, cls in self.terms_in(text)]
        found = {cls for _, _, cls in evidence if cls in CLASSES or cls == OTHER}
        broad = [set(cls[len(_WITHIN):].split("|")) for _, _, cls in evidence if cls.startswith(_WITHIN)]
        if len(found) > 1 or OTHER in found:
            return Label("ambiguous", "", tuple(evidence))
        if not found:
            return Label("unmapped", "", tuple(evidence))
        region = found.pop()
        if any(region not in held for held in broad):
            return Label("ambiguous", "", tuple(evidence))
        return Label("labelled", region, tuple(evidence))


DEFAULT_LABEL_MAP = "label_map.yaml"


def load_label_map(path: str | Path | None = None) -> LabelMap:
    """Read a mapping YAML (``None`` or ``""``: the default shipped with the trainer).

    Raises ``ValueError`` naming the file and the key when the file is not a valid mapping.
    """
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"label map file {str(p)!r} not found (mining.label_map)")
        text, source = p.read_text(encoding="utf-8"), str(p)
    else:
        text = Path(__file__).with_name(DEFAULT_LABEL_MAP).read_text(encoding="utf-8")
        source = f"trainer/{DEFAULT_LABEL_MAP}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"label map {source!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"label map {source!r}: the top level must be a mapping with 'classes'")
    unknown = sorted(set(data) - {"classes", "other", "broader", "ignore"})
    if unknown:
        raise ValueError(f"label map {source!r}: unknown key(s) {', '.join(unknown)} "
                         "(known: classes, other, broader, ignore)")
    broader = data.get("broader") or {}
    if not isinstance(broader, dict) or not all(isinstance(v, list) for v in broader.values()):
        raise ValueError(f"label map {source!r}: 'broader' must map terms to lists of classes")
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f"label map {source!r}: 'classes' must map class names to lists of terms")

    def terms(value: object, key: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(t, (str, int)) for t in value):
            raise ValueError(f"label map {source!r}: '{key}' must be a list of terms")
        out = [str(t) for t in value]
        for t in out:
            try:
                term_regex(t)
            except ValueError as exc:
                raise ValueError(f"label map {source!r}: '{key}': {exc}") from exc
        return out

    return LabelMap(
        classes={str(cls): terms(values, f"classes.{cls}") for cls, values in classes.items()},
        other=terms(data.get("other"), "other"),
        broader={t: [str(c) for c in held] for t, held in zip(terms(list(broader), "broader"), broader.values())},
        ignore=terms(data.get("ignore"), "ignore"),
        source=source,
    )
