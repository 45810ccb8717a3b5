"""The typed train state: checkpoints keep the dict layout of the dict era, old ones resume bit-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import cifar10_resnet20
from kure_jax import models, qat, sharding
from kure_jax.checkpoint import Checkpointer, load_variables
from kure_jax.training.train import (TrainState, _with_lsq_steps, create_state, make_optimizer, make_schedule,
                                     make_train_step, params_only)

META = {"model": "resnet20", "num_classes": 2, "param_shapes": {}}


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32), "label": rng.integers(0, 2, 8).astype(np.int32),
           "mask": np.ones(8, bool)} for _ in range(n)]


def _setup(lsq):
  """(initial state, jitted step, checkpoint meta) of a small ResNet-20 run: SGD with momentum, λ = 0.5."""
  c = cifar10_resnet20.get_config()
  c.dataset.num_classes = 2
  c.kure.weight = 0.5
  c.schedule.learning_rate = 0.01
  c.quant.method = "lsq" if lsq else "none"
  model = models.get_model("resnet20", 2)
  schedule = make_schedule(c, 10, 100)
  tx = make_optimizer(c, schedule, decay_mask=params_only if lsq else None)
  state = create_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3), learns_steps=lsq)
  spec, meta = None, dict(META)
  if lsq:
    probe = _batches(1, seed=9)[0]["image"]
    spec = qat.make_spec(c, model, state.variables, probe)
    state = _with_lsq_steps(state, spec, model, probe, tx)
    meta["quant"] = spec.meta()
  return state, jax.jit(make_train_step(model, tx, c, schedule, spec)), meta


def _run(step, state, batches):
  for b in batches:
    state, _ = step(state, b)
  return state


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("lsq", [False, True], ids=["float", "lsq"])
def test_dict_era_checkpoint_resumes_into_the_train_state_bit_identically(tmp_path, lsq):
  state0, step, meta = _setup(lsq)
  batches = _batches(4)
  s2 = _run(step, state0, batches[:2])
  s4 = _run(step, s2, batches[2:])
  assert isinstance(s4, TrainState) and s4.learns_steps == lsq and int(s4.step) == 4
  assert bool(s4.qsteps) == lsq
  assert float(jnp.abs(s4.params["conv1"]["kernel"] - s2.params["conv1"]["kernel"]).max()) > 0  # it trains

  # the dict the dict-era train.py saved: these four keys, + 'qsteps' in an LSQ run only
  old = {"step": s2.step, "params": s2.params, "batch_stats": s2.batch_stats, "opt_state": s2.opt_state}
  if lsq:
    old["qsteps"] = s2.qsteps
  with Checkpointer(str(tmp_path / "old"), async_save=False) as ckpt:
    ckpt.save(2, old, meta)
  with Checkpointer(str(tmp_path / "new"), async_save=False) as ckpt:
    ckpt.save(2, s2.to_checkpoint(), meta)
  # the new state writes the same leaves under the same paths: the SHA-256 of the two checkpoints agree
  old_meta, new_meta = (Checkpointer(str(tmp_path / d)).read_meta(2) for d in ("old", "new"))
  assert old_meta["checksum"] == new_meta["checksum"]
  raw = [Checkpointer(str(tmp_path / d)).manager.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"] for d in ("old", "new")]  # as saved, no target structure
  assert set(raw[1]) == {"step", "params", "batch_stats", "opt_state"} | ({"qsteps"} if lsq else set())
  assert jax.tree.structure(raw[0]) == jax.tree.structure(raw[1])
  variables, _ = load_variables(str(tmp_path / "new"))
  assert set(variables) == ({"params", "batch_stats", "qsteps"} if lsq else {"params", "batch_stats"})

  # resume as train_and_evaluate does: restore into the fresh state's checkpoint layout (checksum verified)
  with Checkpointer(str(tmp_path / "old")) as ckpt:
    restored, _ = ckpt.restore(state0.to_checkpoint(), meta)
  resumed = state0.from_checkpoint(restored)
  assert isinstance(resumed, TrainState) and resumed.learns_steps == lsq and int(resumed.step) == 2
  _assert_same(resumed, s2)
  _assert_same(_run(step, resumed, batches[2:]), s4)  # and it continues as if never stopped


def test_replicate_keeps_the_state_and_a_mismatched_spec_is_refused():
  state0, _, _ = _setup(lsq=False)
  placed = sharding.replicate(state0, sharding.make_mesh())
  assert isinstance(placed, TrainState) and not placed.learns_steps
  _assert_same(placed, state0)
  lsq_state, lsq_step, _ = _setup(lsq=True)
  assert set(lsq_state.trainables()) == {"params", "qsteps"} and lsq_state.opt_state is not None
  with pytest.raises(ValueError, match="an LSQ spec needs a state with learned steps"):
    lsq_step(state0, _batches(1)[0])  # a float state under an LSQ step
