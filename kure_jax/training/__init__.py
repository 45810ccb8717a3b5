"""Training: `train` (the jitted step, the loop, resuming) and `gradient_l1` (the gradient-ℓ1 regularizer).

The evaluation side (`kure_jax.evaluation`) imports nothing from here.
"""
