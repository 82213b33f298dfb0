"""Every accelerator figure of issue 21 from one command: ``accelerator_report.md`` + ``.json``.

    python benchmarks/accelerator_report.py [--out DIR] [--budget-s 480] [--sections steps,refresh,...]
    python benchmarks/accelerator_report.py --tiny --out /tmp/report     # toy sizes on a CPU, a few minutes

Sections, run in this order (``--sections`` picks and orders them), each guarded: a section that
fails is recorded with its first error line and the next one runs; a section that would start
with less than its reserve of the time budget left is skipped, and a running one is stopped at
the budget's end (SIGALRM), so the command ends within ``--budget-s`` plus a few seconds:

* ``steps``: the training program's jitted ``train_step`` (``common.train_case``) for FP / STE /
  EWGS / PEGE (W2A2 from the shipped configs), fp32 and bf16 (``half_precision``), ResNet-20 at
  batch 256 on 32x32 and ResNet-18 at batch 256 on 224x224, random data; all cases of a network
  timed interleaved in one process, each as a ratio to FP of the same precision, with images/s.
* ``refresh``: a W2A2 EWGS ResNet-20 trained a few hundred steps on learnable synthetic data, then
  the rule's delta refresh (EWGS Eq. 8-10) timed in train steps at the default settings and at a
  cheaper one, and its per-block relative standard error, ``sd_i / sqrt(samples) / |Tr_i|`` from
  single-sample Hutchinson values on one batch (``bench_hessian.per_sample_values``).
* ``export``: the integer export's forward (``ewgs_jax.export.integer_model``, issue 22) against
  the fake-quant forward of that trained network: class agreement, max relative logit error
  (per example, ``max_c |int - fake| / max_c |fake|``, as ``python -m ewgs_jax.export``), images/s of both; "not available" when it cannot be imported.
* ``e2e``: ``python -m ewgs_jax.train`` for N steps on a synthetic ``npz:`` dataset at CIFAR and
  ImageNet shapes: ``train_images_per_s`` of its ``summary.json`` against the step-only rate of
  the same config measured by ``steps`` in this run.
* ``resume``: a short ``deterministic=True`` run straight, and the same run stopped by a signal
  mid-run (SIGTERM: the preemption path; ``--kill-signal KILL``: a crash after a checkpoint) then
  resumed; the final checkpoints compared bit for bit (params, optimiser, BatchNorm, quant state).
* ``tests``: ``pytest -m "not slow" -n N tests`` on the device, in a subprocess, with every outcome
  logged as it happens (``pytest_outcomes.py``), so a suite stopped at the budget still counts;
  last, so that it gets what is left of the budget.

The report prints, last, one JSON line with the headline numbers. ``--tiny`` runs every section at
toy sizes (the test suite replaced by one test), as ``tests/test_accelerator_report.py`` does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

# Before JAX starts: the subprocesses (tests, train.py) share the device with this process, so
# nobody takes 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from common import time_interleaved, train_case  # noqa: E402  (tunes the host allocator, imports jax)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("steps", "refresh", "export", "e2e", "resume", "tests")
TITLES = {"steps": "Train-step time, QAT vs full precision", "refresh": "EWGS delta refresh: cost and accuracy",
          "export": "Integer export vs fake-quant forward", "e2e": "train.py end to end vs step-only",
          "resume": "Kill and resume, deterministic=True", "tests": "Test suite on the device"}
RULES = ("fp", "ste", "ewgs", "pege")
EXIT_STOPPED_EARLY = 75   # train.py: stopped by a signal after saving
STARTED: list = []        # every subprocess started, stopped at the end whatever happened


class BudgetExceeded(Exception):
  """The report's time budget ran out while a section was running."""


class Unavailable(Exception):
  """A section whose subject does not exist in this checkout (recorded, not a failure)."""


@dataclasses.dataclass(frozen=True)
class Network:
  """A network as the report trains it.

  Attributes:
    key: short name used in the JSON keys.
    label: what the tables call it.
    config: a shipped config name (``ewgs_jax.configs``).
    batch: the global batch.
    image: one image's shape ``(H, W, C)``.
    overrides: config keys (flattened, ``"a.b"``) set on top of the shipped config.
  """
  key: str
  label: str
  config: str
  batch: int
  image: tuple
  overrides: tuple = ()


@dataclasses.dataclass(frozen=True)
class Plan:
  """The sizes of one report; :func:`full_plan` and :func:`tiny_plan` are the two used."""
  networks: tuple
  rules: tuple
  precisions: tuple
  step_repeats: int
  call_seconds: float            # each timed call runs as many steps as take about this long
  compile_threads: int
  refresh: Network
  refresh_train_steps: int
  refresh_batches: int           # distinct training batches cycled while training
  refresh_repeats: int
  refresh_cheap: tuple           # ewgs settings of the cheaper refresh
  spread_samples: int
  e2e: tuple                     # ((network, steps, train images, test images), ...)
  resume: Network
  resume_steps: int
  resume_train_images: int
  resume_test_images: int
  export_repeats: int
  tests_args: tuple
  reserve: dict                  # section -> seconds it needs at least to start
  budget_s: float


RESNET20 = Network("resnet20", "ResNet-20, batch 256, 32x32", "cifar10_resnet20", 256, (32, 32, 3))
RESNET18 = Network("resnet18", "ResNet-18, batch 256, 224x224", "imagenet_resnet18", 256, (224, 224, 3))
TINY = Network("tiny", "tiny ResNet-8 (one stage of width 4), batch 8, 8x8", "quickstart", 8, (8, 8, 3),
               (("model_kwargs.stage_widths", (4,)), ("eval_batch_size", 8), ("ewgs.batch_size", 8)))


def full_plan() -> Plan:
  """The accelerator report's sizes (about 8 minutes on one H100/H200).

  Returns:
    The :class:`Plan`.
  """
  workers = max(1, min(8, (os.cpu_count() or 2) // 2))
  return Plan(networks=(RESNET20, RESNET18), rules=RULES, precisions=("fp32", "bf16"), step_repeats=7,
              call_seconds=0.25,
              compile_threads=min(8, os.cpu_count() or 1), refresh=RESNET20, refresh_train_steps=300,
              refresh_batches=8, refresh_repeats=2, refresh_cheap=(("max_samples", 10),), spread_samples=48,
              e2e=((RESNET20, 200, 12800, 500), (RESNET18, 40, 2048, 250)), resume=RESNET20, resume_steps=300,
              resume_train_images=12800, resume_test_images=500, export_repeats=7,
              tests_args=("-m", "not slow", "-n", str(workers), "--dist", "loadfile", "tests"),
              reserve={"steps": 60, "refresh": 45, "export": 20, "e2e": 45, "resume": 45, "tests": 30},
              budget_s=480)


def tiny_plan() -> Plan:
  """Toy sizes for a CPU: every section's code runs (steps: FP and PEGE only; the suite: one test).

  Returns:
    The :class:`Plan`.
  """
  return Plan(networks=(TINY,), rules=("fp", "pege"), precisions=("fp32", "bf16"), step_repeats=2, call_seconds=0.0,
              compile_threads=2,
              refresh=TINY, refresh_train_steps=20, refresh_batches=4, refresh_repeats=1,
              refresh_cheap=(("max_samples", 10),), spread_samples=16, e2e=((TINY, 8, 320, 16),), resume=TINY,
              resume_steps=160, resume_train_images=1600, resume_test_images=16, export_repeats=2,
              tests_args=("-n", "0", "tests/test_schedules.py::test_logarithmic_reaches_one_at_closed_form_step"),
              reserve={name: 2 for name in SECTIONS}, budget_s=600)


# ---------------------------------------------------------------------------------------------------------------
# Configs and data


def set_key(config, key: str, value) -> None:
  """Sets a flattened key (``"a.b.c"``) of a ConfigDict, creating it inside free-form sections.

  Args:
    config: the ``ml_collections.ConfigDict`` (changed in place).
    key: the flattened key.
    value: its value.
  """
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def network_config(net: Network, rule: str, half_precision: bool = False, overrides: tuple = ()):
  """The shipped config of ``net`` for ``rule`` (``"fp"`` or a W2A2 rule), with the overrides.

  Args:
    net: the network.
    rule: ``"fp"``, ``"ste"``, ``"ewgs"`` or ``"pege"``.
    half_precision: bfloat16 computation (``config.half_precision``).
    overrides: more ``(flattened key, value)`` pairs.

  Returns:
    The ``ConfigDict``.
  """
  from ewgs_jax.configs import load_config
  config = load_config(net.config, "fp" if rule == "fp" else f"w2a2_{rule}")
  for key, value in (*net.overrides, ("batch_size", net.batch), ("half_precision", half_precision), *overrides):
    set_key(config, key, value)
  return config


CONFIG_FILE = '''"""Written by benchmarks/accelerator_report.py: a shipped config with the report's overrides."""
from ewgs_jax.configs import load_config


def get_config(arg=None):
  c = load_config({name!r}, {variant!r})
  for key, value in {overrides!r}:
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    with node.unlocked():
      node[leaf] = value
  return c
'''


def write_config_file(path: str, net: Network, rule: str, overrides: tuple) -> str:
  """A config file for ``train.py`` equal to :func:`network_config` (values must have a Python repr).

  Args:
    path: where to write it.
    net: the network.
    rule: as :func:`network_config`.
    overrides: more ``(flattened key, value)`` pairs.

  Returns:
    ``path``.
  """
  pairs = (*net.overrides, ("batch_size", net.batch), *overrides)
  with open(path, "w") as f:
    f.write(CONFIG_FILE.format(name=net.config, variant="fp" if rule == "fp" else f"w2a2_{rule}", overrides=pairs))
  return path


def synthetic_images(rng: np.random.Generator, n: int, shape: tuple, classes: int = 10):
  """Learnable synthetic uint8 images: a fixed random template per class, averaged with noise.

  Args:
    rng: the generator.
    n: how many.
    shape: one image's shape.
    classes: the number of classes.

  Returns:
    ``(images uint8 [n, *shape], labels int32 [n])``.
  """
  templates = rng.integers(0, 256, (classes, *shape), dtype=np.uint16)
  labels = rng.integers(0, classes, n).astype(np.int32)
  images = np.empty((n, *shape), np.uint8)
  for start in range(0, n, 512):   # in chunks: ImageNet shapes would need GBs at once
    stop = min(n, start + 512)
    noise = rng.integers(0, 256, (stop - start, *shape), dtype=np.uint16)
    images[start:stop] = ((templates[labels[start:stop]] + noise) >> 1).astype(np.uint8)
  return images, labels


def as_float(images: np.ndarray) -> np.ndarray:
  """uint8 images as roughly standardised float32, as the data pipeline feeds the model.

  Args:
    images: uint8 images.

  Returns:
    float32 images.
  """
  return ((images.astype(np.float32) - 127.5) / 64.0).astype(np.float32)


def write_npz_dataset(path: str, shape: tuple, train: int, test: int, seed: int = 0) -> str:
  """A synthetic ``npz:`` dataset (``x_train, y_train, x_test, y_test``, uint8 NHWC, 10 classes).

  Args:
    path: the ``.npz`` file to write.
    shape: one image's shape.
    train: training images.
    test: test images.
    seed: the generator's seed.

  Returns:
    ``path``.
  """
  rng = np.random.default_rng(seed)
  x_train, y_train = synthetic_images(rng, train, shape)
  x_test, y_test = synthetic_images(rng, test, shape)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Processes


def subprocess_env(extra: dict | None = None) -> dict:
  """The environment of the report's subprocesses: this checkout first on the path, no preallocation.

  Args:
    extra: more variables.

  Returns:
    The environment.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  env.update(extra or {})
  return env


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
  """Stops a process started with ``start_new_session=True`` and its children (SIGTERM, then SIGKILL).

  Args:
    process: the process.
    grace_s: seconds between SIGTERM and SIGKILL.
  """
  if process.poll() is not None:
    return
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGTERM)
  try:
    process.wait(grace_s)
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start_training(config_file: str, workdir: str, log_path: str, env: dict) -> subprocess.Popen:
  """Starts ``python -m ewgs_jax.train`` on a config file, its output appended to ``log_path``.

  Args:
    config_file: the config file.
    workdir: the run's workdir.
    log_path: its stdout and stderr.
    env: the environment.

  Returns:
    The process (its own session, so that :func:`stop_process` reaches its children).
  """
  log = open(log_path, "a")
  try:
    process = subprocess.Popen([sys.executable, "-m", "ewgs_jax.train", "--config", config_file, "--workdir",
                                workdir], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
  finally:
    log.close()
  STARTED.append(process)
  return process


def wait_process(process: subprocess.Popen, timeout_s: float, what: str, log_path: str | None = None) -> int:
  """Waits for a process; past ``timeout_s`` it is stopped and a ``TimeoutError`` names it.

  Args:
    process: the process.
    timeout_s: seconds to wait.
    what: its description for the error.
    log_path: its log, whose last line goes into the error.

  Returns:
    The exit status.
  """
  try:
    return process.wait(max(timeout_s, 1.0))
  except subprocess.TimeoutExpired:
    stop_process(process)
    raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s (time budget){last_line(log_path)}")


def last_line(log_path: str | None) -> str:
  """``": <last non-empty line of the log>"``, or ``""``."""
  if not log_path or not os.path.exists(log_path):
    return ""
  lines = [line.strip() for line in open(log_path, errors="replace").read().splitlines() if line.strip()]
  return f": {lines[-1]}" if lines else ""


def train_steps_logged(workdir: str) -> int:
  """The last training step in ``workdir/metrics.jsonl`` (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  last = 0
  for line in open(path):
    if '"split": "train"' in line:
      with contextlib.suppress(ValueError):
        last = max(last, int(json.loads(line)["step"]))
  return last


# ---------------------------------------------------------------------------------------------------------------
# The report: sections, guards, budget, writers


@dataclasses.dataclass
class Context:
  """What the sections share: the plan, the budget, scratch space and earlier sections' results."""
  plan: Plan
  out: str
  tmp: str
  deadline: float
  mesh: Any = None
  step_seconds: dict = dataclasses.field(default_factory=dict)   # (network key, rule, precision) -> s/step
  trained: dict | None = None                                     # the refresh section's trained network
  datasets: dict = dataclasses.field(default_factory=dict)
  kill_signal: str = "TERM"

  def remaining(self) -> float:
    """Seconds left of the budget."""
    return self.deadline - time.monotonic()

  def dataset(self, shape: tuple, train: int, test: int) -> str:
    """A synthetic ``npz:`` dataset of these sizes, written once per run.

    Args:
      shape: one image's shape.
      train: training images.
      test: test images.

    Returns:
      The ``.npz`` path.
    """
    key = (tuple(shape), train, test)
    if key not in self.datasets:
      path = os.path.join(self.tmp, f"synthetic_{'x'.join(map(str, shape))}_{train}_{test}.npz")
      self.datasets[key] = write_npz_dataset(path, shape, train, test)
    return self.datasets[key]


def first_error_line(error: BaseException) -> str:
  """``Type: first line of the message`` of an exception.

  Args:
    error: the exception.

  Returns:
    One line.
  """
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class Report:
  """Runs guarded sections against a time budget and writes ``accelerator_report.md`` / ``.json``.

  Both files are rewritten after every section, so a run killed from outside leaves what it had.
  """

  def __init__(self, out: str, header: dict, budget_s: float):
    self.out = out
    self.header = dict(header)
    self.budget_s = budget_s
    self.start = time.monotonic()
    self.deadline = self.start + budget_s
    self.sections: list[dict] = []
    os.makedirs(out, exist_ok=True)

  def remaining(self) -> float:
    """Seconds left of the budget."""
    return self.deadline - time.monotonic()

  def run(self, name: str, fn: Callable[[dict], tuple[dict, str]], reserve_s: float) -> dict:
    """Runs one section under its guard.

    Args:
      name: the section's name.
      fn: ``fn(partial) -> (results, markdown)``; it may raise :class:`Unavailable`. A section made
        of parts puts what it has so far into ``partial["results"]`` / ``partial["markdown"]``,
        which the record keeps if the section fails or is stopped later.
      reserve_s: the section is skipped when fewer seconds than this are left.

    Returns:
      The section's record: ``name``, ``status`` (``ok``, ``failed``, ``skipped``, ``unavailable``,
      ``stopped``), ``seconds``, ``error`` (first line) and ``results``.
    """
    record = {"name": name, "title": TITLES.get(name, name), "status": "ok", "seconds": 0.0, "error": None,
              "results": {}, "markdown": ""}
    left = self.remaining()
    if left < reserve_s:
      record.update(status="skipped", error=f"time budget: {max(left, 0):.0f} s left, the section needs "
                                            f"{reserve_s:.0f} s at least")
      return self._add(record)
    start = time.monotonic()
    partial = {"results": {}, "markdown": ""}
    previous = signal.signal(signal.SIGALRM, _raise_budget_exceeded)
    signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
    try:
      try:
        record["results"], record["markdown"] = fn(partial)
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    except BudgetExceeded:
      record.update(status="stopped", error=f"time budget of {self.budget_s:.0f} s ran out in this section",
                    **partial)
    except Unavailable as e:
      record.update(status="unavailable", error=str(e).splitlines()[0] if str(e) else "not available")
    except Exception as e:   # noqa: BLE001 - the guard's purpose: one failing section must not end the report
      record.update(status="failed", error=first_error_line(e), traceback=traceback.format_exc()[-4000:], **partial)
    record["seconds"] = round(time.monotonic() - start, 1)
    return self._add(record)

  def _add(self, record: dict) -> dict:
    self.sections.append(record)
    self.write()
    return record

  def headline(self) -> dict:
    """The headline numbers: device, versions, each section's status and its key figures.

    Returns:
      A flat-ish dict (the JSON line printed last).
    """
    out = {"device": self.header.get("device"), "jax": self.header.get("jax"), "mode": self.header.get("mode"),
           "seconds": round(time.monotonic() - self.start, 1),
           "sections": {s["name"]: s["status"] for s in self.sections}}
    for s in self.sections:
      out.update(s["results"].get("headline", {}))
    return out

  def markdown(self) -> str:
    """The report as Markdown.

    Returns:
      The text of ``accelerator_report.md``.
    """
    h = self.header
    lines = ["# Accelerator report (issue 21)", "",
             f"Device: **{h.get('device')}** ({h.get('platform')}, {h.get('device_count')} device(s)); "
             f"jax {h.get('jax')}, jaxlib {h.get('jaxlib')}, Python {h.get('python')}; {h.get('host_cpus')} host CPUs.",
             f"Commit {h.get('commit')}; {h.get('date')}; mode **{h.get('mode')}**; budget {self.budget_s:.0f} s; "
             f"this report took {time.monotonic() - self.start:.0f} s.",
             f"Command: `{h.get('command')}`", ""]
    if h.get("warning"):
      lines += [f"**{h['warning']}**", ""]
    lines += ["| section | status | seconds | first error line |", "| --- | --- | --- | --- |"]
    for s in self.sections:
      error = (s["error"] or "").replace("|", "\\|")
      lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {error} |")
    for s in self.sections:
      lines += ["", f"## {s['title']} (`{s['name']}`: {s['status']})", ""]
      if s["markdown"]:
        lines.append(s["markdown"].rstrip())
      if s["error"]:
        lines.append(f"\n{s['status']}: {s['error']}")
    return "\n".join(lines) + "\n"

  def write(self) -> None:
    """Writes ``accelerator_report.md`` and ``accelerator_report.json`` (atomically, each)."""
    data = {"header": self.header, "budget_s": self.budget_s, "sections": self.sections, "headline": self.headline()}
    for name, text in (("accelerator_report.json", json.dumps(data, indent=1, default=_jsonable)),
                       ("accelerator_report.md", self.markdown())):
      path = os.path.join(self.out, name)
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)


def _raise_budget_exceeded(signum, frame):
  del signum, frame
  raise BudgetExceeded()


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def _number(value, digits: int = 3):
  """A float rounded for the JSON, ``None`` for NaN/inf."""
  value = float(value)
  return round(value, digits) if math.isfinite(value) else None


def table(header: list[str], rows: list[list]) -> str:
  """A Markdown table.

  Args:
    header: the column names.
    rows: the rows (values are formatted with ``str``).

  Returns:
    The table's text.
  """
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Section: train-step time


def precompile(lowerers: dict[str, Callable], threads: int) -> tuple[float, str | None]:
  """Compiles the cases' steps ahead of time, ``threads`` at once (XLA compiles outside the GIL).

  Args:
    lowerers: ``{case: parts["lower"]}`` of :func:`common.train_case`.
    threads: how many compile at once.

  Returns:
    ``(wall seconds, None)``, or ``(seconds, note)`` when the parallel compile failed (the cases then
    compile on their first call).
  """
  start = time.perf_counter()
  try:
    if threads <= 1:
      for lower in lowerers.values():
        lower().compile()
    else:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(lambda f=f: f().compile()) for f in lowerers.values()]:
          future.result()
  except BudgetExceeded:
    raise
  except Exception as e:   # noqa: BLE001 - only a warm-up: the first call compiles instead
    return time.perf_counter() - start, f"ahead-of-time compile failed ({first_error_line(e)}); compiled on first call"
  return time.perf_counter() - start, None


def section_steps(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """Train-step time of every rule and precision per network, as ratios to FP (see module docstring).

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``.
  """
  from ewgs_jax import parallel
  plan, results, text, headline = ctx.plan, {"networks": {}}, [], {}
  for net in plan.networks:
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"image": rng.normal(size=(net.batch, *net.image)).astype(np.float32),
                                  "label": rng.integers(0, 10, net.batch).astype(np.int32)}, ctx.mesh)
    runs, lowerers = {}, {}
    for precision in plan.precisions:
      for rule in plan.rules:
        config = network_config(net, rule, precision == "bf16")
        # the replacement masks' PRNG as the training program picks it (PEGE's setting)
        run, parts = train_case(config, batch, ctx.mesh, rng_impl=config.pege.rng_impl)
        runs[(rule, precision)], lowerers[(rule, precision)] = run, parts["lower"]
    compile_s, note = precompile(lowerers, plan.compile_threads)
    per_call = steps_per_call(runs[("fp", plan.precisions[0])], plan.call_seconds)
    medians = time_interleaved({case: repeated(run, per_call) for case, run in runs.items()},
                               repeats=plan.step_repeats)
    rows, cases = [], {}
    for (rule, precision), seconds in medians.items():
      step_s = seconds / per_call
      ctx.step_seconds[(net.key, rule, precision)] = step_s
      ratio = step_s / (medians[("fp", precision)] / per_call)
      cases[f"{rule}/{precision}"] = {"ms_per_step": _number(step_s * 1e3),
                                      "images_per_s": _number(net.batch / step_s, 1), "ratio_to_fp": _number(ratio)}
      headline[f"step_ratio/{net.key}/{precision}/{rule}"] = _number(ratio)
      if rule == "fp":
        headline[f"images_per_s/{net.key}/{precision}/fp"] = _number(net.batch / step_s, 1)
      rows.append([rule.upper(), precision, f"{step_s * 1e3:.2f}", f"{net.batch / step_s:.0f}", f"{ratio:.3f}"])
    results["networks"][net.key] = {"label": net.label, "steps_per_call": per_call, "repeats": plan.step_repeats,
                                    "compile_s": round(compile_s, 1), "compile_note": note, "cases": cases}
    text += [f"**{net.label}** ({plan.step_repeats} interleaved repeats of {per_call} step(s) per call, medians; "
             f"ahead-of-time compile of the {len(runs)} cases: {compile_s:.0f} s wall with {plan.compile_threads} "
             f"thread(s){'; ' + note if note else ''})", "",
             table(["case", "precision", "ms / step", "images / s", "/ FP (same precision)"], rows), ""]
    del runs, lowerers, batch
    if partial is not None:
      partial.update(results={**results, "headline": dict(headline)}, markdown="\n".join(text))
  text.append("W2A2 from the shipped configs (`w2a2_<rule>`), FP from their `fp` variant (its own optimiser); "
              "random data; the real jitted `train_step` (forward, backward, both optimisers, BatchNorm).")
  results["headline"] = headline
  return results, "\n".join(text)


def _timed(fn: Callable) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def steps_per_call(run: Callable, call_seconds: float) -> int:
  """How many steps one timed call runs so that it takes about ``call_seconds`` (at least 1).

  On an accelerator a single step is a few milliseconds: timing each alone would add the host's
  dispatch and synchronisation to every step, which training overlaps with the device's work.

  Args:
    run: one step (compiled or not: it is called once first).
    call_seconds: the target; 0 means one step per call.

  Returns:
    The number of steps.
  """
  if call_seconds <= 0:
    return 1
  jax.block_until_ready(run())
  single = statistics.median(_timed(run) for _ in range(3))
  return max(1, min(200, round(call_seconds / single)))


def repeated(run: Callable, k: int) -> Callable:
  """A thunk running ``run`` ``k`` times and returning the last result.

  Args:
    run: the step.
    k: how many times.

  Returns:
    The thunk.
  """
  return lambda: [run() for _ in range(k)][-1]


# ---------------------------------------------------------------------------------------------------------------
# Section: EWGS delta refresh


def train_briefly(net: Network, steps: int, num_batches: int, mesh, seed: int = 0) -> dict:
  """A W2A2 EWGS network trained ``steps`` steps on learnable synthetic data (delta stays 0).

  Args:
    net: the network.
    steps: training steps.
    num_batches: distinct batches, cycled.
    mesh: the device mesh.
    seed: the data's seed.

  Returns:
    ``{"config", "model", "state", "train_step", "batches", "losses"}``; ``batches`` are sharded
    float batches (the first ``num_batches`` trained on, then 3 fresh ones).
  """
  from ewgs_jax import initialization, parallel, steps as steps_lib, training
  from ewgs_jax.qat import QAT
  config = network_config(net, "ewgs")
  model = training.build_model(config, 10)
  rng = np.random.default_rng(seed)
  images, labels = synthetic_images(rng, net.batch * (num_batches + 3), net.image)
  images = as_float(images)
  batches = [parallel.shard_batch({"image": images[i * net.batch:(i + 1) * net.batch],
                                   "label": labels[i * net.batch:(i + 1) * net.batch]}, mesh)
             for i in range(num_batches + 3)]
  tx = steps_lib.make_optimizer(config, steps, steps)
  rules = initialization.layer_report(model, batches[0]["image"], train=True).rules()
  qat = QAT(model.quant, total_steps=steps, steps_per_epoch=steps, rules=rules)
  train_step, _ = steps_lib.compile_steps(model, tx, qat, mesh)
  state = jax.jit(lambda key, x: steps_lib.initial_state(model, tx, key, x), out_shardings=parallel.replicated(mesh))(
      jax.random.key(seed), batches[0]["image"])
  key, losses = jax.random.key(seed + 1), []
  for i in range(steps):
    state, metrics = train_step(state, batches[i % num_batches], key)
    if i % max(1, steps // 10) == 0 or i == steps - 1:
      losses.append(metrics["loss"])
  return {"config": config, "model": model, "state": state, "train_step": train_step, "batches": batches,
          "losses": [float(x) for x in jax.device_get(losses)], "qat": qat, "key": key}


def section_refresh(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """The EWGS delta refresh's cost in train steps and its per-block relative standard error.

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``.
  """
  import functools
  from bench_hessian import per_sample_values
  from ewgs_jax import hessian, parallel, rules, steps as steps_lib
  from ewgs_jax.rules import ewgs as ewgs_rule
  plan, net = ctx.plan, ctx.plan.refresh
  start = time.perf_counter()
  trained = train_briefly(net, plan.refresh_train_steps, plan.refresh_batches, ctx.mesh)
  train_s = time.perf_counter() - start
  ctx.trained = trained
  model, state = trained["model"], trained["state"]
  variables = jax.device_get(state.variables())
  variables = jax.tree.map(jnp.asarray, variables)
  refresh_batches = trained["batches"][plan.refresh_batches:]
  # The step's cost on a copy of the trained state (the step donates its state).
  holder = {"state": jax.device_put(jax.tree.map(jnp.copy, state), parallel.replicated(ctx.mesh))}

  def step():
    holder["state"], metrics = trained["train_step"](holder["state"], refresh_batches[0], trained["key"])
    return metrics["loss"]
  per_call = steps_per_call(step, plan.call_seconds)
  step_s = time_interleaved({"step": repeated(step, per_call)}, repeats=max(3, plan.step_repeats))["step"] / per_call
  loss_fn = steps_lib.action_loss(model)
  begin = time.perf_counter()   # the host-side trace each refresh starts with
  found = hessian.find_quantizers(loss_fn, variables, refresh_batches[0], rule="ewgs")
  find_s = time.perf_counter() - begin

  # Single-sample joint Hutchinson values on one batch: per block, mean (the trace) and sd.
  values = np.asarray(jax.jit(functools.partial(per_sample_values, loss_fn, found), static_argnums=(3, 4))(
      variables, refresh_batches[0], jax.random.key(7), plan.spread_samples, False))
  trace, sd = values.mean(0), values.std(0, ddof=1)

  settings_sets = {"default": {}, "cheap": dict(plan.refresh_cheap)}
  out, rows, headline = {}, [], {}
  for label, overrides in settings_sets.items():
    settings = rules.get("ewgs").resolve(overrides)
    action = ewgs_rule.DeltaRefresh(settings)
    batches = refresh_batches[:settings["num_batches"]]

    def inputs(key):
      return rules.ActionInput(rules.Clock(plan.refresh_train_steps, plan.refresh_train_steps,
                                           plan.refresh_train_steps * 10), variables, loss_fn, batches, key,
                               lambda: False)
    jax.block_until_ready(action(inputs(jax.random.key(99)))[0])   # compiles
    times = []
    for r in range(plan.refresh_repeats):
      begin = time.perf_counter()
      new, metrics = action(inputs(jax.random.key(r)))
      jax.block_until_ready(new)
      times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    counts = _samples_used(action, variables, batches, found)
    samples = counts if counts is not None else np.full(len(trace), settings["max_samples"] * len(batches))
    rse = sd / np.sqrt(samples) / np.maximum(np.abs(trace), 1e-30)
    out[label] = {"settings": {k: settings[k] for k in ("hessian_mode", "hvp", "num_batches", "max_samples",
                                                          "tolerance")},
                  "seconds": _number(seconds, 4), "train_steps": _number(seconds / step_s, 1),
                  "samples_per_block_median": _number(np.median(samples), 1),
                  "samples_counted": counts is not None,
                  "rse_median": _number(np.median(rse)), "rse_max": _number(np.max(rse)),
                  "blocks_within_20pct": int(np.sum(rse <= 0.2)), "blocks": int(len(rse)),
                  "rse_per_block": {name: _number(v) for name, v in zip(found.paths, rse)},
                  "mean_delta": {k: _number(v, 6) for k, v in metrics.items()}}
    headline.update({f"refresh_steps/{label}": out[label]["train_steps"],
                     f"refresh_rse_median/{label}": out[label]["rse_median"],
                     f"refresh_rse_max/{label}": out[label]["rse_max"]})
    rows.append([label, f"{settings['num_batches']} x {settings['max_samples']} (tol {settings['tolerance']:g})",
                 f"{np.median(samples):.0f}", f"{seconds:.3f}", f"{seconds / step_s:.1f}", f"{np.median(rse):.1%}",
                 f"{np.max(rse):.1%}", f"{int(np.sum(rse <= 0.2))} / {len(rse)}"])
  results = {"network": net.label, "train_steps_before": plan.refresh_train_steps, "train_s": round(train_s, 1),
             "losses": trained["losses"], "step_s": _number(step_s, 5), "find_quantizers_s": _number(find_s),
             "spread_samples": plan.spread_samples,
             "trace_per_block": {name: _number(v, 6) for name, v in zip(found.paths, trace)}, "settings": out,
             "headline": headline}
  text = [f"W2A2 EWGS {net.label}, trained {plan.refresh_train_steps} steps on learnable synthetic data "
          f"(loss {trained['losses'][0]:.3f} -> {trained['losses'][-1]:.3f}); train step {step_s * 1e3:.2f} ms "
          f"(same run). Refresh = the rule's `DeltaRefresh` action (joint Hutchinson, EWGS Eq. 8-10) on fresh "
          f"batches, median of {plan.refresh_repeats} (each starts by tracing the loss to find the quantizers: "
          f"{find_s:.2f} s here, included). Relative standard error per block = sd / sqrt(samples used) "
          f"/ |trace|, sd and trace from {plan.spread_samples} single-sample values on one batch "
          f"({len(trace)} blocks).", "",
          table(["setting", "batches x max samples", "samples / block (median)", "seconds", "train steps",
                 "RSE median", "RSE max", "blocks <= 20 %"], rows),
          "", "Goal (issue 21): <= 60 train steps with every block's relative standard error <= 20 %."]
  return results, "\n".join(text)


def _samples_used(action, variables, batches, found) -> np.ndarray | None:
  """Samples per block the action's own compiled estimate takes (its early stop), summed over batches."""
  estimates = getattr(action, "_estimates", None)
  if not estimates:
    return None
  estimate = next(iter(estimates.values()))
  total = np.zeros(len(found.ordered))
  for i, batch in enumerate(batches):
    _, _, counts = jax.device_get(estimate(variables, batch, jax.random.fold_in(jax.random.key(0), i)))
    total += np.asarray(counts, np.float64)
  return total


# ---------------------------------------------------------------------------------------------------------------
# Section: integer export


def section_export(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """The integer export's forward against the fake-quant forward (issue 22), if the export exists.

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``; raises :class:`Unavailable` without ``ewgs_jax.export.integer_model``.
  """
  try:
    from ewgs_jax.export import integer_model
  except ImportError as e:
    raise Unavailable(f"not available: ewgs_jax.export.integer_model cannot be imported ({e})") from None
  from ewgs_jax import initialization, training
  plan = ctx.plan
  net = plan.refresh
  rng = np.random.default_rng(1)
  images = jnp.asarray(as_float(synthetic_images(rng, net.batch, net.image)[0]))
  if ctx.trained is not None:
    model, variables, source = ctx.trained["model"], jax.device_get(ctx.trained["state"].variables()), "trained"
  else:
    model = training.build_model(network_config(net, "ewgs"), 10)
    variables = jax.device_get(jax.jit(lambda k, x: initialization.init_variables(model, k, x))(
        jax.random.key(0), images))
    source = "initialised (the refresh section did not train one)"
  start = time.perf_counter()
  integer = integer_model({k: variables[k] for k in ("params", "batch_stats")}, model=model, image_shape=net.image,
                          platforms=export_platforms())
  export_s = time.perf_counter() - start
  fake = jax.jit(lambda v, x: model.apply(v, x, train=False))
  device_variables = jax.tree.map(jnp.asarray, variables)
  fake_logits = np.asarray(fake(device_variables, images), np.float64)
  int_logits = np.asarray(integer(images), np.float64)
  from ewgs_jax.export import check   # the statistics of `python -m ewgs_jax.export` (per example)
  stats = check.logit_agreement(fake_logits, int_logits)
  agreement, rel = float(stats["agreement"]), float(stats["max_rel_logit_error"])
  medians = time_interleaved({"fake-quant": lambda: fake(device_variables, images), "integer": lambda: integer(images)},
                             repeats=plan.export_repeats)
  results = {"network": net.label, "variables": source, "export_s": round(export_s, 1), "agreement": agreement,
             "max_rel_logit_error": rel,
             "images_per_s": {k: _number(net.batch / v, 1) for k, v in medians.items()},
             "headline": {"export_agreement": _number(agreement, 4), "export_max_rel_logit_error": float(f"{rel:.3g}"),
                          "export_images_per_s_ratio": _number(medians["fake-quant"] / medians["integer"])}}
  text = [f"W2A2 EWGS {net.label}, {source} variables, one batch of {net.batch} synthetic images. Class agreement "
          f"{agreement:.2%}; max relative logit error (max |int - fake| / max |fake|) {rel:.3g}; export took "
          f"{export_s:.1f} s.", "",
          table(["forward", "ms / batch", "images / s"],
                [[k, f"{v * 1e3:.2f}", f"{net.batch / v:.0f}"] for k, v in medians.items()])]
  return results, "\n".join(text)


def export_platforms() -> tuple[str, ...]:
  """The ``jax.export`` platform name of the default device (``cpu``, ``cuda``, ``rocm``, ``tpu``).

  Returns:
    A one-element tuple.
  """
  device = jax.devices()[0]
  if device.platform != "gpu":
    return (device.platform,)
  version = str(getattr(device.client, "platform_version", "")).lower()
  return ("rocm",) if "rocm" in version else ("cuda",)


# ---------------------------------------------------------------------------------------------------------------
# Section: train.py end to end


def e2e_overrides(dataset: str, steps: int, steps_per_epoch: int) -> tuple:
  """The config keys the ``e2e`` section sets: its data, its length, no refresh or evaluation inside.

  Args:
    dataset: the ``.npz`` path.
    steps: training steps.
    steps_per_epoch: the dataset's steps per epoch.

  Returns:
    ``((flattened key, value), ...)``.
  """
  return (("dataset", f"npz:{dataset}"), ("num_train_steps", steps), ("num_epochs", -(-steps // steps_per_epoch)),
          ("progress_bar", False), ("ewgs.every_epochs", 100000), ("eval_every_epochs", 100000),
          ("checkpoint_every_steps", 0))


def section_e2e(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """``train.py`` images/s on synthetic ``npz:`` data against the step-only rate of the same config.

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``.
  """
  from ewgs_jax import parallel
  results, rows, headline = {}, [], {}
  for net, steps, train_images, test_images in ctx.plan.e2e:
    overrides = e2e_overrides(ctx.dataset(net.image, train_images, test_images), steps, train_images // net.batch)
    workdir = os.path.join(ctx.tmp, f"e2e_{net.key}")
    config_file = write_config_file(os.path.join(ctx.tmp, f"e2e_{net.key}.py"), net, "ewgs", overrides)
    log_path = os.path.join(ctx.out, f"e2e_{net.key}.log")
    start = time.perf_counter()
    process = start_training(config_file, workdir, log_path, subprocess_env(_cache_env(ctx)))
    try:
      code = wait_process(process, ctx.remaining() - 5, f"train.py ({net.key})", log_path)
    finally:
      stop_process(process)
    wall = time.perf_counter() - start
    if code != 0:
      raise RuntimeError(f"train.py ({net.key}) exited with {code}{last_line(log_path)}")
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    e2e = float(summary["train_images_per_s"])
    step_s = ctx.step_seconds.get((net.key, "ewgs", "fp32"))
    measured_here = step_s is None
    if measured_here:   # the steps section did not measure this config: measure it now
      rng = np.random.default_rng(0)
      batch = parallel.shard_batch({"image": rng.normal(size=(net.batch, *net.image)).astype(np.float32),
                                    "label": rng.integers(0, 10, net.batch).astype(np.int32)}, ctx.mesh)
      run, _ = train_case(network_config(net, "ewgs"), batch, ctx.mesh)
      per_call = steps_per_call(run, ctx.plan.call_seconds)
      step_s = time_interleaved({"step": repeated(run, per_call)}, repeats=max(3, ctx.plan.step_repeats))["step"]
      step_s /= per_call
    step_rate = net.batch / step_s
    results[net.key] = {"label": net.label, "steps": steps, "train_images": train_images, "wall_s": round(wall, 1),
                        "train_images_per_s": _number(e2e, 1), "step_only_images_per_s": _number(step_rate, 1),
                        "fraction": _number(e2e / step_rate), "step_only_measured_in_section": measured_here,
                        "train_steps": summary.get("train_steps"), "device": summary.get("device")}
    headline[f"e2e_fraction/{net.key}"] = _number(e2e / step_rate)
    rows.append([net.label, steps, f"{wall:.0f}", f"{e2e:.0f}", f"{step_rate:.0f}", f"{e2e / step_rate:.0%}"])
    if partial is not None:
      partial.update(results={**results, "headline": dict(headline)}, markdown=e2e_text(rows))
  results["headline"] = headline
  return results, e2e_text(rows)


def e2e_text(rows: list) -> str:
  """The ``e2e`` section's Markdown.

  Args:
    rows: its table's rows.

  Returns:
    The text.
  """
  text = ["`python -m ewgs_jax.train` with the shipped config's `w2a2_ewgs` variant (fp32) on a synthetic `npz:` "
          "dataset (uint8, 10 classes; no refresh falls inside the run), `train_images_per_s` of its summary.json "
          "(excludes the first, compiling step and the paused evaluations/checkpoints) against the step-only rate "
          "of the same config from the `steps` section of this run.", "",
          table(["network", "steps", "wall s (process)", "train.py images/s", "step-only images/s", "fraction"], rows)]
  return "\n".join(text)


def _cache_env(ctx: Context) -> dict:
  """A persistent compilation cache for the subprocesses (reruns of one config compile once)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(ctx.tmp, "jax_cache")}


# ---------------------------------------------------------------------------------------------------------------
# Section: kill and resume


def final_state(workdir: str) -> tuple[int, dict]:
  """The latest checkpoint's step and state of a run (as ``tests/test_training.py`` reads it).

  Args:
    workdir: the run's workdir.

  Returns:
    ``(step, state)``, the state a dict of host arrays.
  """
  from ewgs_jax import checkpoints
  keeper = checkpoints.CheckpointKeeper(workdir)
  try:
    step = keeper.latest_step()
    state = keeper.manager.restore(step, args=checkpoints.ocp.args.Composite(
        state=checkpoints.ocp.args.StandardRestore()))["state"]
  finally:
    keeper.close()
  return step, jax.device_get(state)


def compare_bitwise(a, b) -> dict:
  """Leaf-by-leaf bit equality of two pytrees.

  Args:
    a: a pytree of arrays.
    b: another.

  Returns:
    ``{"leaves", "different", "max_abs_diff", "first_different"}``.
  """
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(b)[0])
  different, worst, first = 0, 0.0, None
  for path, x in flat_a:
    name = jax.tree_util.keystr(path)
    x, y = np.asarray(x), np.asarray(flat_b.get(name))
    same = y is not None and x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
    if not same:
      different += 1
      first = first or name
      with contextlib.suppress(Exception):
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
  missing = len(flat_b) - len(flat_a)
  return {"leaves": len(flat_a), "different": different + max(missing, 0), "max_abs_diff": worst,
          "first_different": first}


def train_losses(workdir: str) -> dict[int, float]:
  """``{step: loss}`` of a run's train records (the last record of a step wins).

  Args:
    workdir: the run's workdir.

  Returns:
    The losses.
  """
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    if record.get("split") == "train":
      out[int(record["step"])] = record["loss"]
  return out


def resume_overrides(dataset: str, steps: int, steps_per_epoch: int, kill: str) -> tuple:
  """The config keys the ``resume`` section sets: deterministic, a log line per step (to see progress).

  Args:
    dataset: the ``.npz`` path.
    steps: training steps.
    steps_per_epoch: the dataset's steps per epoch.
    kill: ``"TERM"`` or ``"KILL"`` (then checkpoints every sixth of the run, to resume from).

  Returns:
    ``((flattened key, value), ...)``.
  """
  return (("dataset", f"npz:{dataset}"), ("num_train_steps", steps), ("num_epochs", -(-steps // steps_per_epoch)),
          ("progress_bar", False), ("deterministic", True), ("log_every_steps", 1), ("eval_every_epochs", 100000),
          ("checkpoint_every_steps", max(1, steps // 6) if kill == "KILL" else 0))


def section_resume(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """A run straight vs the same run stopped by a signal and resumed, with ``deterministic=True``.

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``.
  """
  from ewgs_jax import checkpoints
  plan, net = ctx.plan, ctx.plan.resume
  steps = plan.resume_steps
  kill = ctx.kill_signal
  overrides = resume_overrides(ctx.dataset(net.image, plan.resume_train_images, plan.resume_test_images), steps,
                               plan.resume_train_images // net.batch, kill)
  config_file = write_config_file(os.path.join(ctx.tmp, "resume.py"), net, "pege", overrides)
  env = subprocess_env(_cache_env(ctx))
  straight, interrupted = os.path.join(ctx.tmp, "resume_straight"), os.path.join(ctx.tmp, "resume_interrupted")
  logs = {name: os.path.join(ctx.out, f"resume_{name}.log") for name in ("straight", "interrupted")}
  at = max(1, steps // 10)   # early: the run must still be going when the signal lands
  processes = {"straight": start_training(config_file, straight, logs["straight"], env),
               "interrupted": start_training(config_file, interrupted, logs["interrupted"], env)}
  try:
    victim = processes["interrupted"]
    while victim.poll() is None and ctx.remaining() > 5:
      ready = train_steps_logged(interrupted) >= at
      if kill == "KILL":
        ready = ready and bool(checkpoints.committed_steps(interrupted))
      if ready:
        break
      time.sleep(0.05)
    if victim.poll() is not None:
      raise RuntimeError(f"the run to interrupt ended (exit {victim.returncode}) before step {at} was logged"
                         f"{last_line(logs['interrupted'])}; give it more steps")
    signalled_at = train_steps_logged(interrupted)
    os.kill(victim.pid, signal.SIGTERM if kill == "TERM" else signal.SIGKILL)
    code = wait_process(victim, ctx.remaining() - 5, "the interrupted run", logs["interrupted"])
    expected = EXIT_STOPPED_EARLY if kill == "TERM" else -signal.SIGKILL
    if code != expected:
      raise RuntimeError(f"the interrupted run exited with {code}, expected {expected}{last_line(logs['interrupted'])}")
    stopped_at = max(checkpoints.committed_steps(interrupted) or [0])
    code = wait_process(processes["straight"], ctx.remaining() - 5, "the straight run", logs["straight"])
    if code != 0:
      raise RuntimeError(f"the straight run exited with {code}{last_line(logs['straight'])}")
    processes["resumed"] = start_training(config_file, interrupted, logs["interrupted"], env)
    code = wait_process(processes["resumed"], ctx.remaining() - 5, "the resumed run", logs["interrupted"])
    if code != 0:
      raise RuntimeError(f"the resumed run exited with {code}{last_line(logs['interrupted'])}")
  finally:
    for process in processes.values():
      stop_process(process)
  (step_a, a), (step_b, b) = final_state(straight), final_state(interrupted)
  if step_a != steps or step_b != steps:
    raise RuntimeError(f"final checkpoints at steps {step_a} and {step_b}, expected {steps}")
  parts = {k: a[k] for k in a}
  comparison = compare_bitwise(parts, {k: b[k] for k in b})
  losses_a, losses_b = train_losses(straight), train_losses(interrupted)
  losses_equal = losses_a == losses_b
  exact = comparison["different"] == 0
  results = {"network": net.label, "rule": "pege", "steps": steps, "signal": f"SIG{kill}",
             "signalled_at_step": signalled_at,
             "resumed_from_step": stopped_at, "state_parts": sorted(parts), **comparison, "bit_exact": exact,
             "train_losses_equal": losses_equal, "headline": {"resume_bit_exact": exact}}
  text = [f"W2A2 PEGE {net.label}, {steps} steps of `python -m ewgs_jax.train` with `deterministic=True` on "
          f"synthetic `npz:` data: once straight, once stopped by SIG{kill} (sent at logged step {signalled_at}, "
          f"last checkpoint at step {stopped_at}) and resumed. Final checkpoints ({', '.join(sorted(parts))}): "
          f"**{'bit-exact' if exact else 'DIFFERENT'}** ({comparison['different']} of {comparison['leaves']} leaves "
          f"differ, max |diff| {comparison['max_abs_diff']:.3g}"
          f"{', first ' + comparison['first_different'] if comparison['first_different'] else ''}); per-step train "
          f"losses {'equal' if losses_equal else 'differ'}."]
  return results, "\n".join(text)


# ---------------------------------------------------------------------------------------------------------------
# Section: the test suite


def summarize_outcomes(path: str) -> dict:
  """Counts and failures from a ``pytest_outcomes.py`` log.

  Args:
    path: the JSON-lines file.

  Returns:
    ``{"collected", "passed", "failed", "errors", "skipped", "xfailed", "xpassed", "finished",
    "failures": [{"test", "when", "message"}]}``.
  """
  collected, tests = None, {}
  if os.path.exists(path):
    for line in open(path):
      with contextlib.suppress(ValueError):
        record = json.loads(line)
        if "collected" in record:
          collected = record["collected"]
        elif "nodeid" in record:
          tests.setdefault(record["nodeid"], []).append(record)
  counts = dict.fromkeys(("passed", "failed", "errors", "skipped", "xfailed", "xpassed"), 0)
  failures = []
  for nodeid, phases in tests.items():
    bad = [p for p in phases if p["outcome"] == "failed"]
    outcome = next((p["outcome"] for p in phases if p["outcome"] in ("skipped", "xfailed", "xpassed")), "passed")
    if bad:
      outcome = "failed" if bad[0]["when"] == "call" else "errors"
      failures.append({"test": nodeid, "when": bad[0]["when"], "message": bad[0]["message"]})
    counts[outcome] += 1
  return {"collected": collected, **counts, "finished": len(tests), "failures": failures}


def section_tests(ctx: Context, partial: dict | None = None) -> tuple[dict, str]:
  """The repository's test suite on this device, in a subprocess stopped at the time budget.

  Args:
    ctx: the shared context.
    partial: where the parts done so far are kept (:meth:`Report.run`).

  Returns:
    ``(results, markdown)``.
  """
  log_path = os.path.join(ctx.out, "pytest_outcomes.jsonl")
  output_path = os.path.join(ctx.out, "pytest_output.txt")
  with contextlib.suppress(FileNotFoundError):
    os.remove(log_path)
  command = [sys.executable, "-m", "pytest", "-q", "-p", "pytest_outcomes", "-p", "no:cacheprovider",
             *ctx.plan.tests_args]
  timeout = ctx.remaining() - 10
  start = time.perf_counter()
  with open(output_path, "w") as output:
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env({"REPORT_PYTEST_LOG": log_path}), stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    STARTED.append(process)
    timed_out = False
    try:
      code = process.wait(max(timeout, 1))
    except subprocess.TimeoutExpired:
      timed_out, code = True, None
    finally:
      stop_process(process)
  seconds = time.perf_counter() - start
  summary = summarize_outcomes(log_path)
  not_run = (summary["collected"] - summary["finished"]) if summary["collected"] is not None else None
  if summary["collected"] is None and not timed_out and code not in (0, 1):
    raise RuntimeError(f"pytest exited with {code} before collecting{last_line(output_path)}")
  results = {"command": " ".join(command[1:]), "exit_code": code, "timed_out": timed_out, "seconds": round(seconds, 1),
             **summary, "not_run": not_run,
             "headline": {f"tests_{k}": summary[k] for k in ("passed", "failed", "errors", "skipped")}}
  results["headline"]["tests_not_run"] = not_run
  counts = ", ".join(f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
                     if summary[k] or k in ("passed", "failed"))
  text = [f"`python {' '.join(command[1:])}` ({seconds:.0f} s{', stopped at the time budget' if timed_out else ''}; "
          f"exit {code}): {counts} of {summary['collected']} collected"
          f"{f'; {not_run} not run' if not_run else ''}. Full output: `pytest_output.txt`."]
  if summary["failures"]:
    text += ["", table(["test", "phase", "first line"],
                       [[f["test"], f["when"], f["message"].replace("|", "\\|")] for f in summary["failures"]])]
  return results, "\n".join(text)


# ---------------------------------------------------------------------------------------------------------------
# Main


def header(mode: str, argv: list[str]) -> dict:
  """The device, versions, commit, date and command of this report.

  Args:
    mode: ``"full"`` or ``"tiny"``.
    argv: the command line.

  Returns:
    The header dict.
  """
  device = jax.devices()[0]
  out = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
         "jax": jax.__version__, "jaxlib": _version("jaxlib"), "python": sys.version.split()[0],
         "host_cpus": os.cpu_count(), "mode": mode, "command": " ".join(["python", *argv]),
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": None}
  with contextlib.suppress(Exception):
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=10).stdout.strip() or None
  if device.platform == "gpu":
    with contextlib.suppress(Exception):
      smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20).stdout.strip()
      out["nvidia_smi"] = smi.splitlines()[0] if smi else None
  if device.platform == "cpu" and mode == "full":
    out["warning"] = "No accelerator: these are CPU figures, not the report issue 21 asks for."
  return out


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line.

  Args:
    argv: the arguments (without the program name).

  Returns:
    The parsed arguments.
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "accelerator_report"),
                      help="output directory (default: $OUT if set, else ./accelerator_report)")
  parser.add_argument("--tiny", action="store_true", help="toy sizes on any device; the suite reduced to one test")
  parser.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 480; tiny 600)")
  parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which sections, in order (from {SECTIONS})")
  parser.add_argument("--kill-signal", choices=("TERM", "KILL"), default="TERM",
                      help="resume: SIGTERM (the preemption path) or SIGKILL after a checkpoint")
  parser.add_argument("--tests-args", default=None,
                      help="tests: pytest arguments replacing the plan's (e.g. \"-n 4 tests/test_layers.py\")")
  args = parser.parse_args(argv)
  unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
  if unknown:
    parser.error(f"unknown sections {unknown}; valid: {','.join(SECTIONS)}")
  return args


def main(argv: list[str] | None = None) -> int:
  """Runs the report.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    0 when every section ran (``ok`` or ``unavailable``), 1 otherwise (the report is written either way).
  """
  from ewgs_jax import parallel
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  plan = tiny_plan() if args.tiny else full_plan()
  if args.budget_s is not None:
    plan = dataclasses.replace(plan, budget_s=args.budget_s)
  if args.tests_args is not None:
    plan = dataclasses.replace(plan, tests_args=tuple(args.tests_args.split()))
  command = ["benchmarks/accelerator_report.py", *argv]
  report = Report(os.path.abspath(args.out), header("tiny" if args.tiny else "full", command), plan.budget_s)
  tmp = tempfile.mkdtemp(prefix="accelerator_report_")
  ctx = Context(plan=plan, out=report.out, tmp=tmp, deadline=report.deadline, mesh=parallel.make_mesh(),
                kill_signal=args.kill_signal)
  functions = {"steps": section_steps, "refresh": section_refresh, "export": section_export, "e2e": section_e2e,
               "resume": section_resume, "tests": section_tests}
  try:
    for name in args.sections.split(","):
      record = report.run(name, lambda partial, f=functions[name]: f(ctx, partial), plan.reserve.get(name, 0))
      print(f"[{record['seconds']:7.1f} s] {name}: {record['status']}"
            f"{' - ' + record['error'] if record['error'] else ''}", flush=True)
  finally:
    for process in STARTED:   # one stopped mid-cleanup by the budget's alarm must not outlive the report
      stop_process(process)
    shutil.rmtree(tmp, ignore_errors=True)
  report.write()
  print(f"report: {os.path.join(report.out, 'accelerator_report.md')}")
  print(json.dumps(report.headline(), default=_jsonable))
  return 0 if all(s["status"] in ("ok", "unavailable") for s in report.sections) else 1


if __name__ == "__main__":
  sys.exit(main())
