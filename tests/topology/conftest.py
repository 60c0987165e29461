import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _bm_reference import reference  # noqa: E402,F401  (pytest fixture)
