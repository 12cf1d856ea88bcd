"""Mixture-of-Experts expert offloading: store, device-side cache, prefetch."""
