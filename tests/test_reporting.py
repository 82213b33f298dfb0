"""Run outputs: JSONL, TensorBoard event records, summary, plots, the results table, progress bar."""

import io
import json
import os

import numpy as np
import pytest

from ewgs_jax import reporting


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


def test_progress_rate_excludes_paused_time(monkeypatch):
  clock = iter([0.0, 10.0])
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
  stream = io.StringIO()
  bar = reporting.ProgressBar(100, batch_size=10, stream=stream)
  bar.update(10, loss=1.0)
  bar.exclude(9.0)   # e.g. an evaluation: 1 s of training for 10 steps of 10 images
  bar.update(20, loss=1.0)
  assert "| 100 img/s |" in stream.getvalue().splitlines()[1]


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


def test_run_timer_leaves_pauses_out_of_training_time_and_sums_resumes(monkeypatch):
  clock = {"perf": 100.0, "wall": 1000.0}
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: clock["perf"])
  monkeypatch.setattr(reporting.time, "time", lambda: clock["wall"])
  paused = []

  def advance(seconds):
    clock["perf"] += seconds
    clock["wall"] += seconds

  timer = reporting.RunTimer(batch_size=10, previous={"wall_time_s": 50.0, "train_seconds": 20.0, "train_images": 400},
                             on_pause=paused.append)
  with timer.paused():             # before the training clock starts (e.g. a delta refresh at step 0)
    advance(7.0)
  advance(3.0)                     # the first, compiling step
  timer.start_training(step=1)
  advance(4.0)                     # steps 2..5
  with timer.paused() as pause:    # an evaluation
    advance(6.0)
  advance(2.0)                     # steps 6..7
  totals = timer.totals(step=7)
  assert pause["seconds"] == 6.0 and paused == [7.0, 6.0]
  assert totals == {"wall_time_s": 50.0 + 22.0, "train_seconds": 20.0 + 6.0, "train_images": 400 + 60}
  assert reporting.RunTimer.images_per_s(totals) == pytest.approx(460 / 26)
  assert reporting.RunTimer.images_per_s(reporting.RunTimer(10).totals(0)) is None
