"""PS3.4 Annex C.2.2.2 attribute matching, compiled to SQLAlchemy clauses (the database does the filtering).

One query value becomes one SQL clause:

- empty value, or ``*`` alone: universal matching (no clause);
- ``*`` / ``?`` in a value: wildcard matching (case-sensitive ``GLOB`` on SQLite, ``LIKE`` elsewhere;
  person names are matched case-insensitively, as C.2.2.2.1 allows, with Unicode lower case on SQLite
  and PostgreSQL alike: ``müller`` matches ``MÜLLER`` on both);
- ``a-b``, ``-b``, ``a-`` for DA / TM / DT: range matching (inclusive; a partial upper time bound such as
  ``1100`` covers all of 11:00);
- several values separated by backslash: list matching (a UID list, or any of the values);
- anything else: single value matching.

A column that holds several values joined by backslash (``LUNG\\LIVER``) matches when any of its values
matches (:func:`multi_value_clause`). Nothing is filtered row by row in Python.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import and_, func, literal, or_
from sqlalchemy.sql.elements import ColumnElement

#: VRs for which ``*`` and ``?`` are wildcards (PS3.4 C.2.2.2.4).
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}

_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_TM_MAX = "235959.999999"
_DT_MAX = "99991231235959.999999"
_LIKE_ESCAPE = "!"


class QueryError(ValueError):
    """A query value that cannot be matched (malformed date, range on a non-range VR, ...).

    ``keyword`` names the attribute; the C-FIND/C-MOVE/C-GET handlers answer 0xC000 (unable to process).
    """

    def __init__(self, keyword: str, message: str):
        super().__init__(f"{keyword}: {message}")
        self.keyword = keyword


def split_values(value: Any) -> list[str]:
    """The query value as a list of strings: pydicom MultiValue, a str with backslashes, or a scalar."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        items = [str(v) for v in value]
    else:
        items = str(value).split("\\")
    return [v.strip() for v in items]


def is_universal(values: list[str]) -> bool:
    return not values or all(v == "" for v in values) or any(v == "*" for v in values)


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# Patterns ----------------------------------------------------------------------------------------

def glob_pattern(value: str) -> str:
    """DICOM wildcard -> SQLite GLOB pattern (``*``, ``?`` kept; ``[`` escaped)."""
    return value.replace("[", "[[]")


def like_pattern(value: str) -> str:
    """DICOM wildcard -> LIKE pattern with ``!`` as escape character."""
    out = []
    for ch in value:
        if ch in (_LIKE_ESCAPE, "%", "_"):
            out.append(_LIKE_ESCAPE + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def unicode_lower(column: ColumnElement, dialect: str) -> ColumnElement:
    """``column`` in Unicode lower case on every database: PostgreSQL's lower() (Unicode under the
    database's UTF-8 ctype); on SQLite, whose lower() is ASCII-only, the ``unicode_lower`` function that
    :mod:`dicomnode.db.session` registers on each connection (Python's str.lower)."""
    return func.unicode_lower(column) if dialect == "sqlite" else func.lower(column)


def wildcard_clause(column: ColumnElement, value: str, dialect: str, case_insensitive: bool = False) -> ColumnElement:
    """``column`` matches the DICOM wildcard ``value``."""
    if case_insensitive:
        return unicode_lower(column, dialect).like(like_pattern(value.lower()), escape=_LIKE_ESCAPE)
    if dialect == "sqlite":
        return column.op("GLOB")(glob_pattern(value))
    return column.like(like_pattern(value), escape=_LIKE_ESCAPE)


def single_clause(column: ColumnElement, value: str, dialect: str, case_insensitive: bool = False) -> ColumnElement:
    if case_insensitive:
        return unicode_lower(column, dialect) == value.lower()
    return column == value


# Ranges --------------------------------------------------------------------------------------------

def _normalise_date(value: str, keyword: str) -> str:
    v = value.replace(".", "") if re.match(r"^\d{4}\.\d{2}\.\d{2}$", value) else value  # ACR-NEMA YYYY.MM.DD
    if not _DA_RE.match(v):
        raise QueryError(keyword, f"{value!r} is not a date (YYYYMMDD)")
    return v


def _check(value: str, vr: str, keyword: str) -> str:
    if vr == "DA":
        return _normalise_date(value, keyword)
    if vr == "TM":
        v = value.replace(":", "")
        if not _TM_RE.match(v):
            raise QueryError(keyword, f"{value!r} is not a time (HHMMSS.FFFFFF)")
        return v
    if not _DT_RE.match(value):
        raise QueryError(keyword, f"{value!r} is not a date-time (YYYYMMDDHHMMSS.FFFFFF)")
    return value


def _upper_bound(value: str, vr: str) -> str:
    """Extend a partial upper bound so that it covers its whole precision (``1100`` -> ``110059.999999``)."""
    if vr == "TM":
        return value + _TM_MAX[len(value):]
    if vr == "DT":
        return value + _DT_MAX[len(value):]
    return value


def range_clause(column: ColumnElement, value: str, vr: str, keyword: str) -> ColumnElement:
    """``column`` (a string column holding DA/TM/DT values) within the range ``value`` (``a-b``, ``a-``, ``-b``)."""
    if value.count("-") != 1:  # a DT with a negative UTC offset is not supported in a range
        raise QueryError(keyword, f"{value!r} is not a range (use a-b, a- or -b)")
    low, high = value.split("-")
    low, high = low.strip(), high.strip()
    if not low and not high:
        raise QueryError(keyword, "a range needs at least one bound")
    clauses = [column != ""]
    if low:
        clauses.append(column >= _check(low, vr, keyword))
    if high:
        clauses.append(column <= _upper_bound(_check(high, vr, keyword), vr))
    return and_(*clauses)


# Entry points ------------------------------------------------------------------------------------------

def value_clause(column: ColumnElement, value: str, vr: str, keyword: str, dialect: str) -> ColumnElement | None:
    """The clause for one (non-empty) query value against a single-valued column."""
    ci = vr == "PN"
    if vr in RANGE_VRS:
        if "-" in value:
            return range_clause(column, value, vr, keyword)
        value = _check(value, vr, keyword)
        if vr == "TM" and len(value) < 6:
            return range_clause(column, f"{value}-{value}", vr, keyword)
        return column == value
    if vr == "IS":
        try:
            number = int(value)
        except ValueError:
            raise QueryError(keyword, f"{value!r} is not an integer") from None
        return column == number
    if has_wildcard(value):
        if vr not in WILDCARD_VRS:
            raise QueryError(keyword, f"wildcards are not allowed for VR {vr}")
        return wildcard_clause(column, value, dialect, ci)
    return single_clause(column, value, dialect, ci)


def match_clause(column: ColumnElement, query_value: Any, vr: str, keyword: str, dialect: str) -> ColumnElement | None:
    """The clause matching ``query_value`` (a DICOM element value) against ``column``; None for universal."""
    values = split_values(query_value)
    if is_universal(values):
        return None
    values = [v for v in values if v != ""]
    if vr == "UI":
        for v in values:
            if has_wildcard(v):
                raise QueryError(keyword, "wildcards are not allowed in UID matching")
        return column == values[0] if len(values) == 1 else column.in_(values)
    clauses = [value_clause(column, v, vr, keyword, dialect) for v in values]
    return clauses[0] if len(clauses) == 1 else or_(*clauses)


def multi_value_clause(column: ColumnElement, query_value: Any, vr: str, keyword: str,
                       dialect: str) -> ColumnElement | None:
    """Like :func:`match_clause` for a column holding values joined by backslash: any stored value matches.

    ``LIVER`` matches ``LUNG\\LIVER``; a wildcard applies to each stored value (``L*`` matches ``LUNG``).
    """
    values = split_values(query_value)
    if is_universal(values):
        return None
    wrapped = literal("\\") + column + literal("\\")
    clauses = []
    for v in (v for v in values if v != ""):
        if has_wildcard(v) and vr not in WILDCARD_VRS:
            raise QueryError(keyword, f"wildcards are not allowed for VR {vr}")
        if dialect == "sqlite":
            clauses.append(wrapped.op("GLOB")("*\\" + glob_pattern(v) + "\\*"))
        else:
            clauses.append(wrapped.like("%\\" + like_pattern(v) + "\\%", escape=_LIKE_ESCAPE))
    return clauses[0] if len(clauses) == 1 else or_(*clauses)
