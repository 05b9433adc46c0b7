"""weightkit: adapt, train, compress, merge and inspect the weights of neural networks."""

from weightkit.errors import WeightkitError

__all__ = ["WeightkitError"]
__version__ = "0.1.0"
