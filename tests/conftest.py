"""Shared test setup: fast, deterministic, CPU-only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
