"""mnistquickstart: a Flower / PyTorch app (cross-device benchmark baseline)."""
