"""Triton kernels of the ``triton`` attention backend (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
