"""Offloading: model weights beyond the device's memory (``weights.py``: pinned CPU memory on CUDA, disk
anywhere, streamed back unit by unit)."""
