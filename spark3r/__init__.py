"""spark3r: ROS-free core (models, token reduction, geometry, streaming mapper, evaluation)."""
from spark3r.threads import prefer_passive_waiting as _prefer_passive_waiting

# Before anything imports torch: idle OpenMP threads sleep instead of spinning (spark3r/threads.py).
_prefer_passive_waiting()

__version__ = "0.1.0"
