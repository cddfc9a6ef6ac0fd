"""Hyper-parameter sweeps: W&B-format spec, trials, the Optuna backend and the sweep outputs."""
