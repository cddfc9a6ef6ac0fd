"""Analysis of a trained run: metrics, evaluation, comparison, CAM explanations, lung masks."""
