"""Compression: quantization (``weightkit.compress.quant``) and, later, low rank, sharing and pruning."""
