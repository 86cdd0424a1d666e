"""Choosing checkpoints and reading attention.

- :mod:`.points`: operating points (F1 choice of the best, Pareto fronts, the paper's Fig. 7 plot);
- :mod:`.maps`: per-word cross-attention heatmaps of a checkpoint or a DreamBlend run (Fig. 3).

Plots need matplotlib (imported only when a plot is drawn).
"""
