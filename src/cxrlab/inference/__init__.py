"""Inference: the bundle (the one weights reader), batched prediction and export."""
