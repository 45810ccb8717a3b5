"""Shipped weights: a trained model's variables as one small file, without optimizer state.

A weights folder ``weights/<name>/`` holds

  variables.msgpack   {'params', 'batch_stats'} (+ 'qsteps', LSQ's learned steps), float32,
                      serialized with `flax.serialization` (no orbax, no optimizer state)
  meta.json           the checkpoint metadata (model, num_classes, image_size, param_shapes,
                      quant for QAT models) and the file's SHA-256

and ``weights/MANIFEST.json`` describes every model (config and overrides, seed, top-1 on the
test set, mean kurtosis, checksum, the command that made it, wall time). `load` verifies the
checksum, so a damaged file is refused in one line; `kure_jax.checkpoint.load_variables`
accepts a weights folder wherever it accepts a workdir (``eval.py --checkpoint weights/<name>``,
``init_from=weights/<name>``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from flax import serialization

from kure_jax.errors import UserError

VARIABLES = "variables.msgpack"
META = "meta.json"
MANIFEST = "MANIFEST.json"


def is_weights(path: str) -> bool:
  """True if `path` is a weights folder (holds variables.msgpack)."""
  return os.path.isfile(os.path.join(path, VARIABLES))


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def save(out_dir: str, variables: dict[str, Any], meta: dict[str, Any]) -> str:
  """Write `variables` (host arrays, float32) and `meta` to `out_dir`; returns the file's SHA-256."""
  os.makedirs(out_dir, exist_ok=True)
  keep = {k: variables[k] for k in ("params", "batch_stats", "qsteps") if variables.get(k)}
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), keep)
  path = os.path.join(out_dir, VARIABLES)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(host))
  os.replace(tmp, path)
  digest = sha256_file(path)
  with open(os.path.join(out_dir, META), "w") as f:
    json.dump({**meta, "sha256": digest}, f, indent=1, sort_keys=True)
  return digest


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, meta) of a weights folder, its SHA-256 and finiteness verified."""
  file = os.path.join(path, VARIABLES)
  try:
    with open(os.path.join(path, META)) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: {META} is missing or unreadable ({e}); re-export or re-download these weights.") from e
  digest = sha256_file(file)
  if meta.get("sha256") and digest != meta["sha256"]:
    raise UserError(f"{file} is damaged: its SHA-256 is {digest[:12]}…, {META} says {meta['sha256'][:12]}…; "
                    "restore it (e.g. `git checkout -- weights`).")
  with open(file, "rb") as f:
    try:
      variables = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types for truncated or foreign files
      raise UserError(f"{file} is not a weights file ({type(e).__name__}).") from e
  for leaf in jax.tree.leaves(variables):
    if not np.isfinite(leaf).all():
      raise UserError(f"{file} holds non-finite values; it cannot be used.")
  variables.setdefault("batch_stats", {})
  return variables, meta


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return {"models": {}}
  with open(path) as f:
    return json.load(f)


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  path = os.path.join(directory, MANIFEST)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
