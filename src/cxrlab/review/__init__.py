"""Radiologist review of a run's explained images: ``cxrlab review RUN`` (see ``cxrlab.review.core``, the web app
in ``cxrlab.review.app`` and the answers database in ``cxrlab.review.store``)."""

from cxrlab.review.core import ExportConfig, ReviewConfig, export_review, import_answers, load_queue
from cxrlab.review.store import Answer, ReviewError, ReviewStore

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
