"""Class names as the data spells them: matching across spellings, and the costly class.

The costly class is the one whose false negatives cost most (the seed's headline metric is its recall). It is a
property of the data set, so every stage asks here instead of writing the literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

COSTLY_CLASS = "COVID19"  # the default: the seed's data set; matched across spellings (covid-19, Covid19 ...)


def norm_class_name(name: str) -> str:
    """Case- and punctuation-insensitive key of a class name (``covid-19`` and ``COVID19`` -> ``covid19``)."""
    return re.sub(r"[^0-9a-z]", "", str(name).casefold())


def costly_class(classes: Iterable[str], costly: str = COSTLY_CLASS) -> str | None:
    """The spelling of the costly class among ``classes``, or None when the data has no such class."""
    key = norm_class_name(costly)
    return next((c for c in classes if norm_class_name(c) == key), None)


def order_costly_first(classes: list[str], costly: str = COSTLY_CLASS) -> list[str]:
    """``classes`` with the costly class (when present) moved to the front, the others in their order."""
    key = norm_class_name(costly)
    first = [c for c in classes if norm_class_name(c) == key]
    return first + [c for c in classes if c not in first]


def costly_recall_key(names: Iterable[str], prefix: str = "test/") -> str | None:
    """The recall metric of the costly class among metric ``names`` (``test/recall_COVID19``), or None."""
    head = f"{prefix}recall_"
    c = costly_class(sorted(n[len(head) :] for n in names if n.startswith(head)))
    return f"{head}{c}" if c else None
