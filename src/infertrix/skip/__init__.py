"""Training-free layer and sublayer skipping plans."""
