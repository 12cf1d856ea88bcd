"""Lossless speculative decoding: drafters and one exact verifier."""
