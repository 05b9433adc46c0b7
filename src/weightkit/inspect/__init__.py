"""What a model's weights look like (``weightkit.inspect``): pure functions on weight matrices first.

So far the rank measures of :mod:`weightkit.inspect.spectral`; the report, the heavy-tail fits and the
``weightkit inspect`` command are issue 15's remaining work.
"""

from weightkit.inspect.spectral import effective_rank, energy_rank, singular_values, stable_rank

__all__ = ["singular_values", "stable_rank", "effective_rank", "energy_rank"]
