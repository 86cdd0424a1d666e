"""Choosing checkpoints and reading attention.

- :mod:`.points`: operating points (F1 choice of the best, Pareto fronts, the paper's Fig. 7 plot);
- :mod:`.maps`: per-word cross-attention heatmaps of a checkpoint or a DreamBlend run (Fig. 3);
- :mod:`.collapse`: attention collapse over a fine-tuning trajectory, and the G/E checkpoints it suggests.

Plots need matplotlib (imported only when a plot is drawn).
"""
