"""Measurements before training: which codes to use, how sure that is, and which labels look wrong."""
