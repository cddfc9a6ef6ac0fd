"""Data stage: read X-rays, ingest folders into a manifest, split, audit, synthesise phantoms."""
