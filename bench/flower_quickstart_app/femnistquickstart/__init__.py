"""femnistquickstart: a Flower / PyTorch app (benchmark baseline)."""
