"""Training utilities: LR schedule, EMA weights, atomic checkpoints, metrics logging, NaN guards.

Each submodule has one job and no dependency on the others; import from the submodule directly
(``from metapl.train.checkpoint import save_checkpoint``) so that this package stays import-free.
"""
