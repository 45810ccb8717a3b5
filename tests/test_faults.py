"""Checkpoint and run faults: silent corruption, a damaged newest checkpoint, a full disk, a diverging loss."""

import errno
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kure_jax.checkpoint import Checkpointer, checksum, host_leaves, load_variables
from kure_jax.errors import UserError
from kure_jax.metrics import read_metrics
from kure_jax.training import train as train_lib
from kure_jax.training.train import train_and_evaluate
from tests.helpers import REPO, write_class_folders
from tests.test_train import cli_args, env, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_class_folders(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def run6(folder, tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6 (copy it before damaging it)."""
  workdir = str(tmp_path_factory.mktemp("run6") / "w")
  train_and_evaluate(tiny_config(folder, max_steps=6, checkpoint_every_steps=2), workdir)
  assert Checkpointer(workdir).all_steps() == [2, 4, 6]
  return workdir


def copy_run(src, tmp_path):
  dst = str(tmp_path / "w")
  shutil.copytree(src, dst)
  return dst


def files(workdir):
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[p] = f.read()
  return out


def largest_file(directory):
  paths = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(paths, key=os.path.getsize)


def flip_bytes(path, n=8):
  """Invert `n` bytes in the middle of a file: damage nothing in the file system notices."""
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    f.seek(size // 2)
    data = f.read(n)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))


# ----------------------------------------------------------------------------------
# The checksum.


def test_checksum_is_the_same_for_orbax_dicts_and_optax_tuples_and_sees_one_bit():
  params = {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "bias": jnp.zeros(3)}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  state = {"step": jnp.array(3, jnp.int32), "params": params, "opt_state": tx.init(params)}
  # what a restore without a target returns: named tuples as dicts, tuples as lists
  trace = state["opt_state"][1][0].trace
  as_read = {"step": np.int32(3), "params": jax.tree.map(np.asarray, params),
             "opt_state": [{}, [{"trace": jax.tree.map(np.asarray, trace)}, {}]]}
  digest = checksum(host_leaves(state))
  assert digest == checksum(host_leaves(as_read))
  assert digest["leaves"] == 5
  flipped = jax.tree.map(np.asarray, params)
  flipped["conv"]["kernel"] = flipped["conv"]["kernel"].copy()
  flipped["conv"]["kernel"].view(np.uint32)[0, 1] ^= 1  # one bit of one weight
  assert checksum(host_leaves({**state, "params": flipped}))["sha256"] != digest["sha256"]


# ----------------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.mark.slow
def test_silent_corruption_is_refused_and_resume_step_recovers(folder, run6, tmp_path):
  workdir = copy_run(run6, tmp_path)
  flip_bytes(largest_file(os.path.join(workdir, "checkpoints", "6")))
  before = files(workdir)
  with pytest.raises(UserError, match=r"\(step 6\) is damaged and cannot be read \(.+\); it was left untouched\. "
                                      r"The newest intact checkpoint is step 4: resume from it with "
                                      r"--config\.resume_step=4 "):
    train_and_evaluate(tiny_config(folder, max_steps=8, num_epochs=2, checkpoint_every_steps=2), workdir)
  assert files(workdir) == before
  # init_from / eval.py read the same checks, and name the intact step's folder
  intact = os.path.join(workdir, "checkpoints", "4")
  with pytest.raises(UserError, match=r"\(step 6\) is damaged.*use .*checkpoints/4 in its place"):
    load_variables(workdir)
  assert load_variables(intact)[1]["model"] == "resnet20"
  # a resume_step that is not there
  with pytest.raises(UserError, match=r"config\.resume_step is 3, but .* holds steps 2, 4, 6\."):
    train_and_evaluate(tiny_config(folder, max_steps=8, resume_step=3), workdir)

  result = train_and_evaluate(tiny_config(folder, max_steps=8, num_epochs=2, checkpoint_every_steps=2, resume_step=4),
                              workdir)
  assert result["step"] == 8 and np.isfinite(result["kurtosis_mean"])
  assert os.listdir(os.path.join(workdir, "checkpoints_discarded")) == ["6"]
  assert Checkpointer(workdir).all_steps() == [4, 6, 8]
  variables, _ = load_variables(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert [r["step"] for r in read_metrics(workdir, "train")] == [2, 4, 6, 8]  # each step once
  # rerunning the same command later does not silently go back past intact checkpoints
  with pytest.raises(UserError, match=r"config\.resume_step is 4, but the newer checkpoint of step 6 is intact"):
    train_and_evaluate(tiny_config(folder, max_steps=10, num_epochs=2, resume_step=4), workdir)


# Run train.py, then collect garbage before the interpreter exits: the debris of orbax's failed
# reads is reported when it is collected, so this makes it show if it is not dealt with.
CLI_WITH_GC = ("import gc, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n  runpy.run_path('train.py', run_name='__main__')\n"
               "finally:\n  gc.collect()\n")


def test_damage_orbax_notices_is_one_line_on_the_command_line(folder, run6, tmp_path):
  workdir = copy_run(run6, tmp_path)
  path = largest_file(os.path.join(workdir, "checkpoints", "6"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  args = cli_args(folder, workdir, max_steps=8)
  r = subprocess.run([sys.executable, "-c", CLI_WITH_GC] + args[1:], cwd=REPO, env=env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"error: the checkpoint at {os.path.join(workdir, 'checkpoints')} (step 6) is damaged")
  assert lines[0].endswith("resume from it with --config.resume_step=4 (the damaged ones after it are then moved to "
                           f"{os.path.join(workdir, 'checkpoints_discarded')}).")


def test_non_finite_values_are_never_saved_nor_restored(tmp_path):
  state = {"step": np.int32(1), "params": {"w": np.array([1.0, np.nan], np.float32)}}
  meta = {"model": "resnet20", "num_classes": 2, "param_shapes": {"w": [2]}}
  with Checkpointer(str(tmp_path / "a"), async_save=False) as ckpt:
    with pytest.raises(UserError, match=r"refusing to save the checkpoint of step 1: params/w holds non-finite"):
      ckpt.save(1, state, meta)
  assert not os.listdir(tmp_path / "a" / "checkpoints")
  # a checkpoint from before checksums existed is still checked for finiteness
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(str(tmp_path / "b" / "checkpoints"), options=options, item_names=("state", "meta"))
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.close()
  with pytest.raises(UserError, match=r"\(step 1\) is damaged and cannot be read \(params/w holds non-finite values\)"
                                      r".*No older checkpoint there is intact"):
    load_variables(str(tmp_path / "b"))


# ----------------------------------------------------------------------------------
# A full disk.


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint_and_stops(folder, tmp_path, monkeypatch):
  """The meta file's write fails with ENOSPC from the third save on, in orbax's background thread."""
  handler = ocp.JsonCheckpointHandler
  original = handler._save_fn
  saves = []

  async def disk_full_after_two(self, x, directory):
    if isinstance(x, dict) and "param_shapes" in x:
      saves.append(directory)
      if len(saves) > 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(self, x, directory)

  monkeypatch.setattr(handler, "_save_fn", disk_full_after_two)
  workdir = str(tmp_path / "w")
  config = tiny_config(folder, max_steps=12, num_epochs=2, checkpoint_every_steps=2)
  with pytest.raises(UserError, match=r"^saving the checkpoint of step 6 to .*checkpoints failed \(no space left on "
                                      r"device\); the run stopped, and the previous checkpoint \(step 4\) is intact"):
    train_and_evaluate(config, workdir)
  monkeypatch.setattr(handler, "_save_fn", original)
  steps = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert sorted(map(int, steps)) == [2, 4]
  variables, _ = load_variables(workdir)  # readable, checksum verified
  assert Checkpointer(workdir).latest_step() == 4
  assert train_and_evaluate(config, workdir)["step"] == 12  # a rerun resumes from step 4


def _tmpfs_works(mountpoint):
  r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{mountpoint}'"],
                     capture_output=True, timeout=30) if shutil.which("unshare") else None
  return r is not None and r.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_tiny_tmpfs_is_one_line(folder, run6, tmp_path):
  """A real ENOSPC: the workdir on a tmpfs (private mount namespace) with room for one checkpoint and a half."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if not _tmpfs_works(mnt):
    pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs unshare and user namespaces)")
  one = sum(math.ceil(os.path.getsize(os.path.join(r, f)) / 4096) * 4096
            for r, _, fs in os.walk(os.path.join(run6, "checkpoints", "2")) for f in fs)
  size_kb = (3 * one // 2 + (256 << 10)) >> 10
  args = cli_args(folder, mnt / "w", max_steps=12, checkpoint_every_steps=2, keep_checkpoints=1)
  script = f"mount -t tmpfs -o size={size_kb}k tmpfs '{mnt}' || exit 97; \"$@\"; rc=$?; cp -r '{mnt}/w' '{tmp_path}/w'; exit $rc"
  r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh"] + args, cwd=REPO, env=env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  assert "failed (no space left on device); the run stopped, and the previous checkpoint (step" in lines[0]
  kept = int(lines[0].split("the previous checkpoint (step ")[1].split(")")[0])
  # (the copy out of the tmpfs misses nothing: the failed step's temporary folder is ignored by orbax)
  variables, _ = load_variables(str(tmp_path / "w"))
  assert Checkpointer(str(tmp_path / "w")).latest_step() == kept


# ----------------------------------------------------------------------------------
# A diverging run.


class _Poisoned:
  """A training dataset whose batch `at` holds NaN images."""

  def __init__(self, ds, at):
    self._ds, self._at = ds, at

  def __getattr__(self, name):
    return getattr(self._ds, name)

  def iterate(self, start_step=None, num_steps=None):
    first = start_step or 0
    for k, batch in enumerate(self._ds.iterate(start_step=start_step, num_steps=num_steps), first):
      yield {**batch, "image": np.full_like(batch["image"], np.nan)} if k == self._at else batch


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every, log_every", [(1, 100), (100, 3)])
def test_non_finite_loss_stops_the_run_at_its_step(folder, tmp_path, monkeypatch, checkpoint_every, log_every):
  make = train_lib.data_lib.make_dataset
  monkeypatch.setattr(train_lib.data_lib, "make_dataset",
                      lambda c, split, **kw: _Poisoned(make(c, split, **kw), 3) if kw.get("train") else make(c, split, **kw))
  workdir = str(tmp_path / "w")
  config = tiny_config(folder, max_steps=6, checkpoint_every_steps=checkpoint_every, log_every_steps=log_every)
  newest = "every checkpoint is finite; the newest is step 3" if checkpoint_every == 1 else "no checkpoint was written"
  # (NaN logits give a finite cross-entropy here, log 2: the check on the weights is what catches this one)
  with pytest.raises(UserError, match=rf"^training diverged: the (loss|weights) became non-finite at step 4 \(loss "
                                      rf"[^)]+\); the run stopped there and {newest}"):
    train_and_evaluate(config, workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == ([1, 2, 3] if checkpoint_every == 1 else [])
  if steps:
    variables, _ = load_variables(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert all(np.isfinite(r["loss"]) for r in read_metrics(workdir, "train"))


# A Future that tensorstore failed carries no orbax frame in its traceback; asyncio reports it when the
# Future is collected. The command-line quiet must drop it (this was the one extra stderr line above, seen in CI).
UNRETRIEVED_FUTURE = """import asyncio, gc, logging, sys
logging.basicConfig()
if sys.argv[1] == "quiet":
  from kure_jax.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
loop = asyncio.new_event_loop()
future = loop.create_future()
future.set_exception(ValueError('OUT_OF_RANGE: Error reading "params" in OCDBT database'))
del future
gc.collect()
loop.close()
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_unretrieved_future_of_a_failed_read_is_hidden_on_the_command_line(mode):
  r = subprocess.run([sys.executable, "-c", UNRETRIEVED_FUTURE, mode], cwd=REPO, env=env(), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  if mode == "quiet":
    assert r.stderr == ""
  else:  # the control: asyncio does report it without the filter
    assert "Future exception was never retrieved" in r.stderr and "OCDBT" in r.stderr


# A read coroutine that a failed restore gathered but never awaited warns when it is collected (seen once in CI,
# attributed to the line that ran the collection).
UNAWAITED_COROUTINE = """import gc, sys
if sys.argv[1] == "quiet":
  from kure_jax.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
async def _read_array_index_and_device_put():
  return None
pending = _read_array_index_and_device_put()
del pending
gc.collect()
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_unawaited_read_coroutine_is_hidden_on_the_command_line(mode):
  r = subprocess.run([sys.executable, "-c", UNAWAITED_COROUTINE, mode], cwd=REPO, env=env(), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  if mode == "quiet":
    assert r.stderr == ""
  else:  # the control: Python does warn without the filter
    assert "coroutine '_read_array_index_and_device_put' was never awaited" in r.stderr
