"""Peer side of the merge benchmark: mergekit's ``mergekit-yaml``, optionally with a stable top-k.

Runs under the mergekit venv's python (``bench/.venv-mergekit``, from ``bash bench/peer_env.sh mergekit``)::

    bench/.venv-mergekit/bin/python bench/merge_peer.py [--stable-topk] CONFIG.yml OUT_DIR [options]

(``options``: those of ``mergekit-yaml``.)

Without ``--stable-topk`` this is exactly the ``mergekit-yaml`` command (its ``main``, same arguments).
The timed runs of bench/merge.py call ``mergekit-yaml`` itself, not this file.

``--stable-topk`` exists for one check only: TIES keeps the ``k`` largest ``|delta|`` entries, and
in bfloat16 checkpoints many entries share a magnitude at the cut. mergekit picks among them with
``torch.argsort(..., descending=True)``, an unstable sort, so which ones it keeps is arbitrary;
weightkit keeps the lower flattened index first. With this flag, every ``torch.argsort`` in
``mergekit.sparsify`` is made stable (``stable=True``), which is weightkit's rule, and nothing else
changes. The benchmark compares weightkit's TIES output with this run to show that the two agree
everywhere except where the definitions differ.
"""

from __future__ import annotations

import sys


class _StableArgsortTorch:
    """Stands in for ``torch`` inside ``mergekit.sparsify``: argsort is stable, the rest is torch's."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def argsort(self, *args, **kwargs):
        kwargs["stable"] = True
        return self._torch.argsort(*args, **kwargs)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--stable-topk":
        import torch
        from mergekit import sparsify

        sparsify.torch = _StableArgsortTorch(torch)
        argv = argv[1:]
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    # standalone_mode=False: return (and let errors propagate) instead of calling sys.exit.
    mergekit_yaml.main(args=argv, prog_name="mergekit-yaml", standalone_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
