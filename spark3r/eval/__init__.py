"""Evaluation against ground truth (``spark3r eval``): trajectory ATE/RPE with SE(3)/Sim(3)
alignment and time association, depth AbsRel/delta, point-cloud accuracy/completeness, plots."""
