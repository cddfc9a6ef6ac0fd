"""Radiologist review of a run's explained images: ``cxrlab review RUN`` (see ``cxrlab.review.core``, the web app
in ``cxrlab.review.app`` and the answers database in ``cxrlab.review.store``)."""

from importlib import import_module
from typing import Any

from cxrlab.review.config import ExportConfig, ReviewConfig

__all__ = [
    "Answer",
    "ExportConfig",
    "ReviewConfig",
    "ReviewError",
    "ReviewStore",
    "export_review",
    "import_answers",
    "load_queue",
]
# loaded when asked for (pandas, SQLAlchemy): the configs alone stay light for the CLI's --help
_LAZY = {
    "export_review": "core",
    "import_answers": "core",
    "load_queue": "core",
    "Answer": "store",
    "ReviewError": "store",
    "ReviewStore": "store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"cxrlab.review.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'cxrlab.review' has no attribute '{name}'")
