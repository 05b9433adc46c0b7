"""The README tables are what the benchmark JSON files say (``bench/tables.py`` generates them)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_marked_table_matches_its_json():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tables.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr + " (run: python bench/tables.py)"
