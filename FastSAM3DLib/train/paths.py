"""Where training keeps its files (outside the repository); ``FASTSAM3D_CACHE`` moves them."""

import os
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("FASTSAM3D_CACHE", Path.home() / ".cache" / "fastsam3d"))
DEFAULT_POOL = DEFAULT_CACHE / "pool"
