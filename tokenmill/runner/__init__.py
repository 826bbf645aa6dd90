"""Executes scheduled steps on the model."""
