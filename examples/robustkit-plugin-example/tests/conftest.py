"""Run these tests with or without the plugin installed: put the distribution's folder first
on ``sys.path`` so that ``robustkit_plugin_example`` imports from this checkout."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
