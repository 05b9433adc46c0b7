"""``python -m weightkit.cli`` (what ``torchrun ... -m weightkit.cli adapt`` runs)."""

import sys

from weightkit.cli import main

sys.exit(main())
