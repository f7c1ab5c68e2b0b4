"""The `-s` entry: ``mitmdump -s addon/stableprefix/addon.py`` loads the mitmproxy face (`mitm/addon.py`).

mitmproxy runs this file as a script, not as part of the package: the tree this file lives in goes first
on ``sys.path``, so the package next to it is the one loaded, installed or not.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from stableprefix.mitm.addon import addons  # noqa: E402

__all__ = ["addons"]
