"""The seeded-v1 synthetic weights; they live in :mod:`spark3r.models.seeded` (this name is kept
for existing imports)."""
from spark3r.models.seeded import KEPT_AT_DEFAULT, load_seeded_v1, seeded_v1, seeded_v1_state_dict

__all__ = ["KEPT_AT_DEFAULT", "load_seeded_v1", "seeded_v1", "seeded_v1_state_dict"]
