"""HTTP service for a cxrlab model bundle: ``create_app(bundle_path, settings)`` (see ``cxrlab.serve.app``)."""

from cxrlab.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
