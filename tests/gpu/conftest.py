"""GPU tests: the engine tests' helpers (tests/engine) are importable here too."""
from __future__ import annotations

import os
import sys

ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine")
if ENGINE not in sys.path:
    sys.path.insert(0, ENGINE)
