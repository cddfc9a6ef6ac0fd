"""Command-line options made from config fields, so every default and help text is written once: in the field.

``from_field(EvalConfig, "n_boot", "--n-boot")`` is a ``typer.Option`` whose default, help text and numeric bounds
(``ge`` / ``le``) are those of ``EvalConfig.n_boot``; the command passes the value on to ``build_config``, which
validates it again (open bounds, ``gt`` / ``lt``, are checked there: typer has no open ranges). A command option
that maps to no config field stays a plain ``typer.Option``. ``tests/test_cli_options.py`` walks every command and
fails on an option whose default differs from its field's, or that repeats the default as a literal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, get_args

import annotated_types
import typer
from pydantic import BaseModel

from cxrlab.config import field_default


def field_help(model: type[BaseModel], name: str) -> str:
    """The field's description as a help sentence, ending with a period; capitalised unless it starts with a value
    the option takes (``auto = ...``, ``torch, onnx ...``), a key or a mixed-case name. Empty without a description."""
    info = model.model_fields[name]
    text = (info.description or "").strip()
    if not text:
        return ""
    first = re.match(r"[\w+-]*", text).group(0)
    values = {str(v) for v in get_args(info.annotation)} | {str(info.default)}
    # a value (``auto = ...``), a key (``index=auto: ...``) or a name like ``pHash`` keeps its spelling
    if first not in values and first == first.lower() and not text[len(first) :].startswith("="):
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def field_bounds(model: type[BaseModel], name: str) -> dict[str, float]:
    """``min`` / ``max`` for typer from the field's closed bounds (``ge`` / ``le``); open ones are left to pydantic."""
    out: dict[str, float] = {}
    for m in model.model_fields[name].metadata:
        if isinstance(m, annotated_types.Ge):
            out["min"] = m.ge
        elif isinstance(m, annotated_types.Le):
            out["max"] = m.le
    return out


def from_field(
    model: type[BaseModel],
    name: str,
    *param_decls: str,
    note: str = "",
    to_cli: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A ``typer.Option`` for ``model``'s field ``name``: its default (``...`` when the field is required), its
    description as the help text (plus ``note``, for what only the command line has: a repeatable flag, an
    environment variable) and its ``ge`` / ``le`` bounds. ``to_cli`` turns the default into the option's form
    (``(0.8, 0.1, 0.1)`` -> ``"0.8,0.1,0.1"``); tuple defaults of repeatable options become lists. Other keyword
    arguments go to ``typer.Option`` unchanged."""
    if name not in model.model_fields:
        raise KeyError(f"{model.__name__} has no field '{name}'")
    info = model.model_fields[name]
    default: Any = ... if info.is_required() else field_default(model, name)
    if to_cli is not None and default is not ...:
        default = to_cli(default)
    elif isinstance(default, tuple):
        default = list(default)
    text = " ".join(t for t in (field_help(model, name), note) if t)
    if "help" in kwargs:
        raise TypeError(f"from_field({model.__name__}, {name!r}): the help text is the field's description")
    for k, v in field_bounds(model, name).items():
        kwargs.setdefault(k, v)
    if default is ... or default is None:
        kwargs.setdefault("show_default", False)
    option = typer.Option(default, *param_decls, help=text or None, **kwargs)
    option.config_field = (model, name)  # read by tests/test_cli_options.py: where this option's default comes from
    return option


def comma_list(values: Any) -> str:
    """``to_cli`` of a tuple or list field typed as one comma-separated word: ``(0.8, 0.1, 0.1)`` -> ``0.8,0.1,0.1``."""
    return ",".join(str(v) for v in values)
