"""Robustness evaluation: score one set of weights on many quantizers.

`robustness` (the one-call sweep), `step_providers` (where base steps come from), `lapq` (loss-aware PTQ),
`folding` (BatchNorm folding), `evaluate` (eval.py's program) and `report` (tables and plots).
"""
