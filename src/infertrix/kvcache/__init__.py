"""KV-cache eviction, merging and quantization as transformers ``Cache`` policies."""
