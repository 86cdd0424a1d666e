"""Choosing checkpoints and reading attention.

- :mod:`.points`: operating points (F1 choice of the best, Pareto fronts, the paper's Fig. 7 plot).

Plots need matplotlib (imported only when a plot is drawn).
"""
