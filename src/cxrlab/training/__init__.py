"""Training: the timm model, optimizer/scheduler registries, the LightningModule and train()."""
