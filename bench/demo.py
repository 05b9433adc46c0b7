"""The demo's numbers for the README: ``weightkit demo`` run once, its JSON kept with the machine's.

    flock /tmp/weightkit-bench.lock .venv/bin/python bench/demo.py     # writes bench/results/demo.json

The README's demo table is generated from that file (``bench/tables.py``), so it shows what the demo
printed on this machine, not numbers typed by hand. The demo itself has no peer: the RTN / GPTQ / AWQ
comparisons with llm-compressor are ``bench/quant.py``.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, weightkit_source_state, write_result  # noqa: E402


def main() -> None:
    from weightkit.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp, measure() as m:
        result = run_demo(Path(tmp) / "out", quiet=True, device="cpu")
    result.pop("output")
    path = write_result(
        "demo",
        {
            "command": "weightkit demo --device cpu (run_demo in this process)",
            "weightkit_commit": weightkit_source_state(),
            "demo_seconds": round(m["seconds"], 1),
            "peak_rss_mib": m["peak_rss_mib"],
            **result,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
