"""Class names as the data spells them: matching across spellings, and the costly class.

The costly class is the one whose false negatives cost most (the seed's headline metric is its recall). It is a
property of the data set: the training config's ``costly_class`` (default ``COSTLY_CLASS``) names it, the run
records it, and every stage asks here with that name instead of writing the literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cxrlab.errors import CxrlabError

COSTLY_CLASS = "COVID19"  # the default: the seed's data set; matched across spellings (covid-19, Covid19 ...)


def norm_class_name(name: str) -> str:
    """Case- and punctuation-insensitive key of a class name (``covid-19`` and ``COVID19`` -> ``covid19``)."""
    return re.sub(r"[^0-9a-z]", "", str(name).casefold())


def costly_class(classes: Iterable[str], costly: str = COSTLY_CLASS) -> str | None:
    """The spelling of the costly class among ``classes``, or None when the data has no such class."""
    key = norm_class_name(costly)
    return next((c for c in classes if norm_class_name(c) == key), None)


class UnknownClassError(CxrlabError):
    """A class named in a config (``costly_class``) is not one of the data's classes; the message lists them."""


def resolve_costly_class(classes: Iterable[str], costly: str = COSTLY_CLASS) -> str | None:
    """The data's spelling of ``costly`` among ``classes``. None when the data has no such class and ``costly`` is
    the default name (data without COVID19 has no costly class, as before it was configurable); any other name that
    matches no class is an ``UnknownClassError`` naming the valid classes (a typo would otherwise silently drop the
    headline metric)."""
    classes = list(classes)
    found = costly_class(classes, costly)
    if found is None and norm_class_name(costly) != norm_class_name(COSTLY_CLASS):
        raise UnknownClassError(
            f"costly_class {costly!r} is not a class of this data; valid: {', '.join(classes)} (any spelling: case "
            "and punctuation are ignored)"
        )
    return found


def order_costly_first(classes: list[str], costly: str = COSTLY_CLASS) -> list[str]:
    """``classes`` with the costly class (when present) moved to the front, the others in their order."""
    key = norm_class_name(costly)
    first = [c for c in classes if norm_class_name(c) == key]
    return first + [c for c in classes if c not in first]


def costly_recall_key(names: Iterable[str], prefix: str = "test/", costly: str = COSTLY_CLASS) -> str | None:
    """The recall metric of the costly class among metric ``names`` (``test/recall_COVID19``), or None."""
    head = f"{prefix}recall_"
    c = costly_class(sorted(n[len(head) :] for n in names if n.startswith(head)), costly)
    return f"{head}{c}" if c else None
