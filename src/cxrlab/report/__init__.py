"""The page layer: HTML pages built from the artefacts a stage wrote."""
