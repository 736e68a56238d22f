"""Measuring token reduction: the ``spark3r bench`` and ``spark3r calibrate`` commands and what
they are built from.

* :mod:`.runner` — run several methods on one model, input and weights (time, FLOPs, memory,
  fidelity vs dense, the attention op alone); bench presets; the JSON result.
* :mod:`.flops` — the FLOP model: sums what each op reports for its layers
  (:meth:`spark3r.accel.op.AttentionOp.attention_flops`) plus meta-device counts of the rest.
* :mod:`.calibrate` — per-layer sensitivity -> a K/V schedule file.
* :mod:`.stream` — ``spark3r bench --stream``: the node's pipeline (keyframe windows, patch cache).
* :mod:`.cli` / :mod:`.cli_args` — the command-line entry points and the per-method flags.

Depends on ``spark3r.accel`` (ops) and ``spark3r.models`` (backbones); neither depends on it.
"""
