"""Run outputs: JSONL, TensorBoard event records, summary, plots, the results table, progress bar."""

import functools
import gc
import io
import json
import os
import platform
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import ewgs_jax
from ewgs_jax import reporting
from tests.training_configs import ROOT


def test_crc32c_known_value():
  assert reporting.crc32c(b"123456789") == 0xE3069283   # the CRC-32C check value


def test_metrics_and_events_round_trip(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(10, "train", {"loss": 1.5, "accuracy": np.float32(0.25)})
  writer.write(20, "test", {"accuracy": 0.5})
  writer.write_quantizers(20, {"layer/conv": {"delta_w": 0.125, "q_alpha": 1.0}})
  writer.close()
  lines = reporting.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert lines[0] == {"step": 10, "split": "train", "loss": 1.5, "accuracy": 0.25}
  assert lines[2]["quantizers"]["layer/conv"]["delta_w"] == 0.125
  (event_file,) = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  events = reporting.read_events(str(tmp_path / event_file))
  assert events[1] == (10, {"train/loss": 1.5, "train/accuracy": 0.25})
  assert events[3][1] == {"quant/layer/conv/delta_w": 0.125, "quant/layer/conv/q_alpha": 1.0}
  raw = bytearray((tmp_path / event_file).read_bytes())
  raw[30] ^= 0xFF
  (tmp_path / "broken").write_bytes(bytes(raw))
  try:
    reporting.read_events(str(tmp_path / "broken"))
    raise AssertionError("a corrupted record must fail its CRC")
  except ValueError as e:
    assert "CRC" in str(e)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path / "x"), enabled=False)
  writer.write(1, "train", {"loss": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "x")


def test_summary_plots_and_table(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path), enabled=True)
  for step in range(1, 6):
    writer.write(step, "train", {"loss": 1 / step, "accuracy": step / 10})
  writer.write(5, "test", {"loss": 0.3, "accuracy": 0.9})
  writer.close()
  reporting.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
  history = [{"step": s, "epoch": s, "quantizers": {"a": {"delta_w": 0.1 * s, "delta_a": 0.01}}} for s in (1, 2)]
  reporting.plot_deltas(history, str(tmp_path / "deltas.png"))
  for png in ("curves.png", "deltas.png"):
    content = (tmp_path / png).read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5000
  summary = {"final_test_accuracy": 0.9, "best_test_accuracy": 0.95, "epochs": 3, "train_images_per_s": 1234.5,
             "config": {"quant": {"enabled": True, "weight_bits": 2, "act_bits": 2, "backward": "ewgs"}}}
  reporting.write_summary(str(tmp_path), summary)
  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert not (tmp_path / "summary.json.tmp").exists()    # written to a temporary file, then renamed
  table = reporting.results_table([str(tmp_path)])
  assert f"| {tmp_path.name} | ewgs | W2A2 | 90.00 % | 95.00 % | 3 | 1,234 |" in table


def test_progress_bar_lines():
  stream = io.StringIO()
  bar = reporting.ProgressBar(100, batch_size=32, stream=stream)
  bar.update(10, loss=1.0)
  bar.update(20, loss=0.5, accuracy=0.75)
  text = stream.getvalue().splitlines()
  assert text[0].startswith("step 10/100 (10%) | loss 1.0000")
  assert "accuracy 0.7500" in text[1] and "img/s" in text[1] and "ETA" in text[1]
  quiet = io.StringIO()
  reporting.ProgressBar(100, batch_size=32, enabled=False, stream=quiet).update(10, loss=1.0)
  assert quiet.getvalue() == ""


def test_progress_bar_rewrites_one_line_on_a_tty():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  stream = Tty()
  bar = reporting.ProgressBar(10, batch_size=8, stream=stream)
  bar.update(1, loss=2.0)
  bar.update(2, loss=1.0)
  bar.close()
  assert stream.getvalue().count("\n") == 1 and stream.getvalue().count("\r") == 2


def test_torn_last_line_is_dropped_on_append_and_skipped_on_read(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
  assert reporting.read_metrics(str(path)) == [{"step": 1, "split": "train", "loss": 1.0}]
  writer = reporting.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(2, "train", {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in reporting.read_metrics(str(path))] == [1, 2]
  assert all(json.loads(line) for line in path.read_text().splitlines())
  reporting.plot_curves(str(path), str(tmp_path / "curves.png"), title="run")


def _summary(workdir, **values):
  os.makedirs(workdir, exist_ok=True)
  base = {"epochs": 2, "train_steps": 10, "train_images_per_s": 100.0, "eval_split": "test", "device": "cpu x 1",
          "wall_time_s": 60.0, "config": {"quant": {"enabled": True, "weight_bits": 2, "act_bits": 2, "backward": "ste"}}}
  reporting.write_summary(str(workdir), {**base, **values})


def test_table_of_preempted_unfinished_and_validation_runs(tmp_path):
  _summary(tmp_path / "stopped", preempted=True, final_test_accuracy=None, final_test_loss=None, best_test_accuracy=0.5)
  os.makedirs(tmp_path / "running")
  _summary(tmp_path / "held_out", eval_split="validation", final_validation_accuracy=0.8,
           best_validation_accuracy=0.85, final_test_accuracy=0.75)
  table = reporting.results_table([str(tmp_path / n) for n in ("stopped", "running", "held_out")])
  assert "| stopped (stopped early at step 10) | ste | W2A2 | - | 50.00 % | 2 | 100 |" in table
  assert "| running (not finished: no summary.json) |" in table
  assert "| held_out | ste | W2A2 | 75.00 % | 85.00 % (val.) | 2 | 100 |" in table
  assert "cpu x 1" in reporting.provenance([str(tmp_path / "held_out")])


def test_delta_plot_has_a_y_label_a_readable_legend_and_the_run_name(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figures = []
  monkeypatch.setattr(plt, "close", figures.append)
  history = [{"step": s, "epoch": s, "quantizers": {"a": {"delta_w": 0.1 * s, "delta_a": 0.01}}} for s in (1, 2)]
  reporting.plot_deltas(history, str(tmp_path / "deltas.png"), title="w2a2_ewgs")
  (fig,) = figures
  assert all(ax.get_ylabel() for ax in fig.axes)
  assert fig.axes[1].get_legend().get_texts()[0].get_fontsize() >= 8
  assert fig._suptitle.get_text() == "w2a2_ewgs"



# --- the training clock: pauses, resumes, asynchronous dispatch, the progress line --------------


class FakeClock:
  """A settable monotonic clock and wall clock, advanced by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now

  def wall(self):
    return self.now + 1000.0


def test_run_timer_leaves_pauses_out_of_training_time_and_sums_resumes():
  clock = FakeClock()
  timer = reporting.RunTimer(batch_size=10, previous={"wall_time_s": 50.0, "train_seconds": 20.0, "train_images": 400},
                             clock=clock, wall_clock=clock.wall)
  with timer.paused():             # before the training clock starts (e.g. a delta refresh at step 0)
    clock.now += 7.0
  clock.now += 3.0                 # the first, compiling step
  timer.start_training(step=1)
  clock.now += 4.0                 # steps 2..5
  with timer.paused() as pause:    # an evaluation
    clock.now += 3.0
    assert timer.training_seconds() == 4.0              # frozen during a pause
    assert timer.totals(step=5)["train_seconds"] == 24.0   # a checkpoint saved inside a pause
    clock.now += 3.0
  clock.now += 2.0                 # steps 6..7
  totals = timer.totals(step=7)
  assert pause["seconds"] == 6.0 and timer.training_seconds() == 6.0
  assert totals == {"wall_time_s": 50.0 + 22.0, "train_seconds": 20.0 + 6.0, "train_images": 400 + 60}
  assert reporting.RunTimer.images_per_s(totals) == pytest.approx(460 / 26)
  assert reporting.RunTimer.images_per_s(reporting.RunTimer(10).totals(0)) is None


class AsyncDevice:
  """JAX's asynchronous dispatch, simulated: the host queues steps and waits only when it blocks.

  Each step costs the host ``host_s`` to dispatch and the device ``device_s`` to run; the device
  runs the queued steps one after another.
  """

  def __init__(self, device_s=1.0, host_s=0.01):
    self.clock = FakeClock()
    self.device_s, self.host_s = device_s, host_s
    self.device_free = self.clock.now

  def dispatch(self):
    self.device_free = max(self.clock.now, self.device_free) + self.device_s
    self.clock.now += self.host_s

  def block(self, _=None):
    self.clock.now = max(self.clock.now, self.device_free)


def simulated_run(log_every, sync_pauses=True, steps=40, steps_per_epoch=10, batch=8):
  """The training loop's use of the timer and progress line, on a simulated device.

  Returns:
    ``(images/s of the summary, the progress lines)``.
  """
  device = AsyncDevice()
  timer = reporting.RunTimer(batch, clock=device.clock, wall_clock=device.clock.wall, block=device.block)
  stream = io.StringIO()
  bar = reporting.ProgressBar(steps, batch, stream=stream, clock=timer.training_seconds)
  logged = 0

  def flush(step):   # fetching the metrics waits for the device
    nonlocal logged
    if logged < step:
      device.block()
      bar.update(step, loss=1.0)
      logged = step

  for step in range(1, steps + 1):
    device.dispatch()
    if not timer.started:
      device.block()
      timer.start_training(step)
    if step % log_every == 0:
      flush(step)
    due = step % steps_per_epoch == 0
    with timer.paused(sync="state" if due and sync_pauses else None):
      if due:
        flush(step)                  # the checkpoint fetches pending metrics first (an update inside a pause)
        device.block()               # the evaluation waits for the state
        device.clock.now += 5.0      # and runs
  device.block()
  return reporting.RunTimer.images_per_s(timer.totals(steps)), stream.getvalue().splitlines()


@pytest.mark.parametrize("log_every", [1, 3, 7, 1000])
def test_images_per_s_is_the_device_rate_whatever_the_logging_cadence(log_every):
  # 8 images per 1 s device step (the host's 0.01 s dispatch overlaps it): 8 img/s, logging or not
  rate, _ = simulated_run(log_every)
  assert rate == pytest.approx(8.0, rel=1e-6)


def test_without_syncing_pauses_the_rate_depends_on_logging():
  # the bug the sync fixes (the simulation reproduces it): queued device time hidden in the pauses
  assert simulated_run(1000, sync_pauses=False)[0] > 10 * simulated_run(1, sync_pauses=False)[0]


@pytest.mark.parametrize("log_every", [1, 3, 7, 1000])
def test_progress_rates_are_never_negative_and_agree_with_the_summary(log_every):
  rate, lines = simulated_run(log_every)
  rates = [float(line.split(" img/s")[0].rsplit("| ", 1)[1].replace(",", "")) for line in lines if "img/s" in line]
  etas = [line.split("ETA ")[1] for line in lines if "ETA" in line]
  assert rates and all(r == pytest.approx(rate, rel=1e-3) for r in rates), lines
  assert not any(eta.startswith("-") for eta in etas), lines


def test_progress_line_inside_a_pause_then_after_it():
  # the negative rates of issue 23: a line written inside a pause (a checkpoint fetches the pending
  # metrics), then the whole pause was taken off the next interval, before that line as well
  clock = FakeClock()
  timer = reporting.RunTimer(10, clock=clock)
  stream = io.StringIO()
  bar = reporting.ProgressBar(100, batch_size=10, stream=stream, clock=timer.training_seconds)
  timer.start_training(0)
  clock.now += 1.0
  bar.update(10, loss=1.0)
  clock.now += 1.0
  with timer.paused():
    clock.now += 4.0
    bar.update(20, loss=1.0)   # 10 steps in 1 s of training
    clock.now += 4.0
  clock.now += 1.0
  bar.update(30, loss=1.0)     # 10 more steps in 1 s
  lines = stream.getvalue().splitlines()
  assert lines[1].endswith("| 100 img/s | ETA 0:00:08") and lines[2].endswith("| 100 img/s | ETA 0:00:07"), lines


def test_read_events_closes_its_file(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(1, "train", {"loss": 1.0})
  writer.close()
  (event_file,) = tmp_path.glob("events.out.tfevents*")
  with warnings.catch_warnings():
    warnings.simplefilter("error", ResourceWarning)   # an unclosed file warns when collected
    assert reporting.read_events(str(event_file))[1] == (1, {"train/loss": 1.0})
    gc.collect()


def test_environment_records_the_versions_the_numbers_depend_on():
  versions = reporting.environment()
  assert set(versions) == {"python", "ewgs_jax", "jax", "jaxlib", "flax", "optax", "numpy"}
  assert versions["jax"] == jax.__version__ and versions["numpy"] == np.__version__
  assert versions["ewgs_jax"] == ewgs_jax.__version__ and versions["python"] == platform.python_version()
  first = jax.devices()[0]
  if first.platform == "cpu":
    assert reporting.device() == f"cpu x {jax.device_count()}"   # not "cpu cpu x 1"
  else:
    assert reporting.device() == f"{first.platform} {first.device_kind} x {jax.device_count()}"


def test_provenance_prints_the_recorded_versions(tmp_path):
  env = {"python": "3.12.1", "ewgs_jax": "0.2.0", "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.1",
         "optax": "0.2.5", "numpy": "2.0.0"}
  _summary(tmp_path / "a", environment=env)
  _summary(tmp_path / "b", environment=env)
  same = reporting.provenance([str(tmp_path / "a"), str(tmp_path / "b")])
  assert ("Versions: python 3.12.1, ewgs_jax 0.2.0, jax 0.10.2, jaxlib 0.10.2, flax 0.12.1, optax 0.2.5, "
          "numpy 2.0.0.") in same.splitlines()
  _summary(tmp_path / "c", environment={**env, "jax": "0.11.0"})
  _summary(tmp_path / "old")                                  # written before versions were recorded
  mixed = reporting.provenance([str(tmp_path / n) for n in ("a", "b", "c", "old")]).splitlines()
  assert mixed[1].startswith("Versions of a, b: python 3.12.1") and "jax 0.11.0" in mixed[2]
  assert mixed[2].startswith("Versions of c:") and mixed[3] == "Versions of old: not recorded."


def test_table_command_line(tmp_path):
  _summary(tmp_path / "run", final_test_accuracy=0.5, best_test_accuracy=0.5,
           environment=reporting.environment())
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "ewgs_jax.reporting", "table", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "| run | ste | W2A2 | 50.00 % | 50.00 % | 2 | 100 |" in out.stdout
  assert f"jax {jax.__version__}" in out.stdout.splitlines()[-1]
  bad = subprocess.run([sys.executable, "-m", "ewgs_jax.reporting"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip() == "usage: python -m ewgs_jax.reporting table WORKDIR [WORKDIR ...]"


def test_train_images_per_s_does_not_depend_on_the_logging_cadence(tmp_path, monkeypatch):
  # A model with ~0.1 s of device work per training step: logging every step blocks on each step;
  # logging never leaves every step queued until the end-of-run evaluation. Before the pauses
  # synced, the second run reported 14x the first (the device time hidden in the evaluation's pause).
  import flax.linen as nn
  import jax.numpy as jnp
  from ewgs_jax import models, training
  from ewgs_jax.models.cifar_resnet import CifarResNet
  from tests.training_configs import small_config

  class SlowResNet(CifarResNet):
    @nn.compact
    def __call__(self, x, train=False, ctx=None):
      if train:   # device work the output depends on, so it cannot be removed
        m = jnp.full((256, 256), 1e-3, jnp.float32) + jnp.mean(x) * 1e-6
        m = jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ m), m)
        x = x + 0.0 * jax.lax.stop_gradient(jnp.mean(m))
      return super().__call__(x, train, ctx)

  monkeypatch.setitem(models.MODELS, "slow_resnet8", functools.partial(SlowResNet, blocks_per_stage=1))
  rates = []
  for log_every in (1, 1000):
    config = small_config({"num_train_steps": 6, "log_every_steps": log_every, "model": "slow_resnet8"},
                          variant="w2a2_ste")
    rates.append(training.train_and_evaluate(config, str(tmp_path / str(log_every)))["train_images_per_s"])
  assert 1 / 3 < rates[1] / rates[0] < 3, rates   # timing noise on a loaded machine, not 14x


def test_a_torn_summary_is_one_error_naming_the_file(tmp_path):
  (tmp_path / "summary.json").write_text('{"final_test_accuracy": 0.9')
  with pytest.raises(ValueError, match=r"summary\.json is not valid JSON .*move it aside"):
    reporting.read_summary(str(tmp_path))
