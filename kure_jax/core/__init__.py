"""The numerics core: pure functions on arrays, no models, no I/O.

`quant` (uniform quantizers, step pickers), `formats` (FP8/FP6/FP4, MX and NVFP4), `kurtosis` (KURE's
penalty and the kernel selection), `theory` and `format_theory` (the paper's lemmas and the formats' MSE,
as tested code).
"""
