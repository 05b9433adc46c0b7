"""Memory-efficient full-parameter training: optimizers usable in any training loop (``weightkit.train``).

One file per optimizer: :mod:`weightkit.train.galore` (GaLore's low-rank gradient projection),
:mod:`weightkit.train.adamp` (AdamP and SGDP: no norm growth of scale-invariant weights),
:mod:`weightkit.train.zeroth_order` (MeZO: SGD from two forward passes, the memory of inference),
:mod:`weightkit.train.orthograd` (⊥Grad) and :mod:`weightkit.train.stablemax` (StableMax cross-entropy).
"""

from weightkit.train.adamp import SGDP, AdamP
from weightkit.train.galore import GaLoreAdamW, galore_param_groups, galore_state_bytes
from weightkit.train.orthograd import OrthoGrad
from weightkit.train.stablemax import stablemax, stablemax_cross_entropy
from weightkit.train.zeroth_order import DistributedZerothOrderSGD, ZerothOrderSGD

__all__ = [
    "GaLoreAdamW",
    "galore_param_groups",
    "galore_state_bytes",
    "AdamP",
    "SGDP",
    "ZerothOrderSGD",
    "DistributedZerothOrderSGD",
    "OrthoGrad",
    "stablemax",
    "stablemax_cross_entropy",
]
