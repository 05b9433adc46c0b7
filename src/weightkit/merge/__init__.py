"""``merge(base, models, config, out_dir)``: combine fine-tunes of one base model into one checkpoint.

Streamed tensor by tensor (see :mod:`weightkit.merge.engine`); the config's type (and preset) picks the
method. Configs come from ``config_from_dict("merge", {"method": "ties", "density": 0.5})`` or from a
mergekit-style YAML recipe (:func:`weightkit.merge.recipe.load_merge_recipe`). ``merge_slices`` stacks
layer ranges of models (mergekit's ``slices``, :mod:`weightkit.merge.slices`).
"""

from weightkit import _callable_package
from weightkit.merge.arcee_fusion import ArceeFusionConfig
from weightkit.merge.engine import merge, merge_slices, prepare_merge, prepare_slices
from weightkit.merge.fisher import FisherConfig
from weightkit.merge.karcher import KarcherConfig
from weightkit.merge.linear import LinearConfig
from weightkit.merge.model_stock import ModelStockConfig
from weightkit.merge.multislerp import MultiSlerpConfig
from weightkit.merge.mwa import MWAConfig
from weightkit.merge.nearswap import NearSwapConfig
from weightkit.merge.nuslerp import NuSlerpConfig
from weightkit.merge.passthrough import PassthroughConfig
from weightkit.merge.pcb import PCBConfig
from weightkit.merge.sce import SCEConfig
from weightkit.merge.slerp import SlerpConfig
from weightkit.merge.slices import MergeSlice, SliceSource
from weightkit.merge.task_arithmetic import TaskArithmeticConfig
from weightkit.registry import refuse

# mergekit's methods that weightkit does not implement yet: named as such, not "did you mean" another.
for _name in ("ram", "ramplus_tl"):
    refuse("merge", _name, "a mergekit method weightkit does not implement yet")

__all__ = [
    "merge",
    "merge_slices",
    "prepare_merge",
    "prepare_slices",
    "MergeSlice",
    "SliceSource",
    "LinearConfig",
    "SlerpConfig",
    "TaskArithmeticConfig",
    "ModelStockConfig",
    "PCBConfig",
    "FisherConfig",
    "MWAConfig",
    "PassthroughConfig",
    "NearSwapConfig",
    "NuSlerpConfig",
    "MultiSlerpConfig",
    "KarcherConfig",
    "SCEConfig",
    "ArceeFusionConfig",
]

_callable_package(__name__, merge)
