"""Memory-efficient full-parameter training: optimizers usable in any training loop (``weightkit.train``).

One file per optimizer: :mod:`weightkit.train.galore` (GaLore's low-rank gradient projection),
:mod:`weightkit.train.adamp` (AdamP and SGDP: no norm growth of scale-invariant weights).
"""

from weightkit.train.adamp import SGDP, AdamP
from weightkit.train.galore import GaLoreAdamW, galore_param_groups, galore_state_bytes

__all__ = ["GaLoreAdamW", "galore_param_groups", "galore_state_bytes", "AdamP", "SGDP"]
