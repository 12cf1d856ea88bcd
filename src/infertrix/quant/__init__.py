"""Weight (and activation) quantization: module swaps of ``nn.Linear`` (issue: W4A8 family)."""
