"""HTTP service for a cxrlab model bundle: ``create_app(bundle_path, settings)`` (see ``cxrlab.serve.app``)."""

from typing import Any

from cxrlab.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # create_app imports torch: loaded when asked for, so the settings alone stay light (the CLI's --help)
    if name == "create_app":
        from cxrlab.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'cxrlab.serve' has no attribute '{name}'")
