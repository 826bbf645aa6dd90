"""Turning logits into token ids."""
