"""Weight sharing: layers that hold one set of weights in common (recursive layer tying, with or without
per-layer LoRA relaxation)."""

from weightkit.compress.share.recursive import RecursiveConfig, recursive_share

__all__ = ["RecursiveConfig", "recursive_share"]
