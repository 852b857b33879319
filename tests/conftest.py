import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# The end-to-end tests exercise plumbing, not learning: a tiny model that builds in seconds (tiny.QUICK_RECIPE).
os.environ.setdefault("SEARCH_E1_TINY_QUICK", "1")
