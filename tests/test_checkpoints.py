"""Checkpoints: round trip, last-N plus best retention, config guard, warm-start loading."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ewgs_jax import checkpoints


def toy_state(shift=0.0):
  params = {"w": jnp.arange(3.0) + shift}
  return {"params": params, "batch_stats": {"m": jnp.ones(2) * shift}, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.int32(int(shift))}


def test_round_trip_with_extra(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=2)
  state = toy_state(1.0)
  keeper.save(1, state, {"data": {"epoch": 0, "step": 1}, "history": {"x": [1, 2]}})
  keeper.wait_until_finished()
  abstract = jax.eval_shape(lambda: state)
  restored, extra = keeper.restore_latest(abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert extra == {"data": {"epoch": 0, "step": 1}, "history": {"x": [1, 2]}}
  keeper.close()
  assert checkpoints.CheckpointKeeper(str(tmp_path / "empty")).restore_latest(abstract) is None


def test_keeps_last_n_plus_best(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=2)
  for step, accuracy in enumerate([0.1, 0.9, 0.3, 0.4, 0.2], start=1):
    keeper.save(step, toy_state(step), {}, metrics={"test_accuracy": accuracy})
  keeper.save(6, toy_state(6), {})
  keeper.wait_until_finished()
  assert keeper.all_steps() == [2, 5, 6]   # best (0.9 at step 2) + the latest two
  keeper.close()


def test_config_guard(tmp_path):
  config = {"model": "resnet20", "quant": {"bits": 2, "backward": "ewgs"}}
  checkpoints.save_or_check_config(str(tmp_path), config)
  checkpoints.save_or_check_config(str(tmp_path), config)   # same config: resume
  changed = {"model": "resnet20", "quant": {"bits": 4, "backward": "ewgs"}, "seed": 1}
  with pytest.raises(ValueError, match=r"different config \(quant\.bits: 2 -> 4; seed: '<absent>' -> 1\)"):
    checkpoints.save_or_check_config(str(tmp_path), changed)


def test_load_variables_from_another_run(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=1)
  keeper.save(3, toy_state(2.0), {})
  keeper.wait_until_finished()
  keeper.close()
  variables = checkpoints.load_variables(str(tmp_path))
  assert set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["params"]["w"], [2.0, 3.0, 4.0])
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoints.load_variables(str(tmp_path / "nothing"))
