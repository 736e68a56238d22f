"""Training reconstruction backbones on procedural scenes (``spark3r train``).

* :mod:`.data` -- the deterministic training stream (batch ``i`` is a pure function of the data
  seed and ``i``) rendered in worker processes.
* :mod:`.objective` -- VGGT's training objective (scene normalisation, camera loss on the pose
  encoding, depth loss with confidence and gradient terms).
* :mod:`.evaluate` -- held-out metrics (depth AbsRel / delta<1.25 after per-window median
  scaling, relative-pose AUC@30) and the trivial baselines.
* :mod:`.loop` -- optimisation, schedule, checkpoints and resume.
"""
