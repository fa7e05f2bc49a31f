"""Torch-free worker components (numpy only)."""
