"""The top-level API: ``weightkit.merge`` and ``weightkit.compress`` stay callable however imported."""

import subprocess
import sys


def test_verbs_stay_callable_after_their_packages_are_imported():
    # A fresh interpreter: the packages are imported first, the way a user's script may do it.
    code = (
        "import weightkit.merge.recipe, weightkit.compress.quant, weightkit.adapt.lora, weightkit\n"
        "from weightkit.merge.engine import merge\n"
        "assert callable(weightkit.merge) and callable(weightkit.compress) and callable(weightkit.adapt)\n"
        "assert weightkit.merge.__call__.__doc__ == merge.__doc__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
