"""Shared test setup: fast, deterministic, CPU-only.

Compiled programs persist across test runs in JAX's compilation cache (`.pytest_cache/jax`, beside pytest's own
cache; ignored by git; the variables are inherited by the tests' train.py/eval.py subprocesses): most of the quick
loop's time is XLA compiles, so a rerun loads them instead. Set JAX_COMPILATION_CACHE_DIR to move it, or to an
empty string to compile everything afresh.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tests' compiles are small and many
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))  # 1 GiB, least recently used evicted first
