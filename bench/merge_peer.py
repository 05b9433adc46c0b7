"""Peer side of the merge benchmark: mergekit's ``mergekit-yaml`` in-process, timing its merge call.

Runs under the mergekit venv's python (``bench/.venv-mergekit``, from ``bash bench/peer_env.sh mergekit``)::

    bench/.venv-mergekit/bin/python bench/merge_peer.py [--time-work FILE] [--stable-topk] \
        CONFIG.yml OUT_DIR [options]

(``options``: those of ``mergekit-yaml``.)

This is the ``mergekit-yaml`` command: its ``main``, with the same arguments, in this process. So the
process's wall time is the command's end to end.

``--time-work FILE`` writes ``{"work_seconds": ..., "work_cpu_seconds": ...}`` to ``FILE``: the wall
and CPU time (all threads) of the ``run_merge(...)`` call that ``mergekit-yaml`` makes after parsing its
options and the recipe (loading, planning, merging, writing), measured around it. That is the merge
work, without the interpreter start and imports (~10 s here).

``--stable-topk`` exists for one check only: TIES keeps the ``k`` largest ``|delta|`` entries, and
in bfloat16 checkpoints many entries share a magnitude at the cut. mergekit picks among them with
``torch.argsort(..., descending=True)``, an unstable sort, so which ones it keeps is arbitrary;
weightkit keeps the lower flattened index first. With this flag, every ``torch.argsort`` in
``mergekit.sparsify`` is made stable (``stable=True``), which is weightkit's rule, and nothing else
changes. The benchmark compares weightkit's TIES output with this run to show that the two agree
everywhere except where the definitions differ.
"""

from __future__ import annotations

import json
import sys
import time


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
    timing_file = None
    if argv[:1] == ["--time-work"]:
        timing_file, argv = argv[1], argv[2:]
    if argv[:1] == ["--stable-topk"]:
        import torch
        from mergekit import sparsify

        sparsify.torch = _StableArgsortTorch(torch)
        argv = argv[1:]
    from mergekit.scripts import run_yaml

    seconds: list[tuple[float, float]] = []
    real_run_merge = run_yaml.run_merge

    def timed_run_merge(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return real_run_merge(*args, **kwargs)
        finally:
            seconds.append((time.perf_counter() - start, time.process_time() - cpu))

    # mergekit-yaml's main calls the run_merge it imported into its own module.
    run_yaml.run_merge = timed_run_merge
    # standalone_mode=False: return (and let errors propagate) instead of calling sys.exit.
    run_yaml.main.main(args=argv, prog_name="mergekit-yaml", standalone_mode=False)
    if timing_file is not None:
        work, cpu = seconds[0] if seconds else (None, None)
        with open(timing_file, "w") as f:
            f.write(json.dumps({"work_seconds": work, "work_cpu_seconds": cpu}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
