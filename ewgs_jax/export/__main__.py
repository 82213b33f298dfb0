"""Exports a finished quantized run to one integer-model file and checks it.

``python -m ewgs_jax.export WORKDIR OUTPUT``

Reads ``WORKDIR`` (its ``config.json``, ``summary.json`` and latest checkpoint), writes ``OUTPUT`` (one
``.npz``: packed weight codes, requantization scales, the full-precision first/last layers, the
serialized integer forward and its metadata; :mod:`ewgs_jax.export.runtime` loads it with numpy and
jax alone), loads the file back and runs it beside the fake-quantized model on the run's evaluation
split (and on the test split, if that is another one). Prints, last, one JSON line::

  {"agreement": 1.0, "max_rel_logit_error": 4e-07, "test_accuracy": 0.93, "bytes": 31234, "fp_bytes": 1090000, ...}

``agreement``: fraction of equal predicted classes on the evaluation split; ``max_rel_logit_error``:
the largest per-example ``max |logit difference| / max |logit|`` there; ``test_accuracy``: the
integer model's on the test split (``fake_quant_test_accuracy`` beside it); ``bytes``: the file;
``fp_bytes``: the same network's parameters as float32; ``arrays_bytes`` and ``forward_bytes``: the
file's arrays (packed codes, scales, full-precision layers) and its serialized forward program.

Exit status: 0 exported and checked; 1 an unfit workdir (missing, unfinished, full precision,
unreadable checkpoint) or a model that has no integer form, with one ``error:`` line; 2 a bad
command line; 3 the check failed (agreement below ``--min-agreement``, or a relative error above
``--max-rel-error`` when given; the JSON line is still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 1, 2, 3


def _fail(message: str, code: int = EXIT_ERROR):
  sys.stderr.write(f"error: {message}\n")
  sys.exit(code)


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line.

  Args:
    argv: the arguments after the program name.

  Returns:
    The parsed arguments.
  """
  parser = argparse.ArgumentParser(prog="python -m ewgs_jax.export", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", help="a finished quantized training run's --workdir")
  parser.add_argument("output", help="the file to write (.npz)")
  parser.add_argument("--platforms", default="cpu,cuda,rocm,tpu",
                      help="backends to export the forward for, comma-separated (default: %(default)s)")
  parser.add_argument("--min-agreement", type=float, default=0.99,
                      help="fail (exit 3) below this fraction of equal predictions (default: %(default)s)")
  parser.add_argument("--max-rel-error", type=float, default=None,
                      help="also fail (exit 3) above this relative logit error (default: not checked: a code "
                           "that flips at a rounding threshold moves the logits of a deep model visibly)")
  args = parser.parse_args(argv)
  known = ("cpu", "cuda", "rocm", "tpu")   # ewgs_jax.export.model.PLATFORMS (not imported: it loads jax)
  unknown = [p for p in args.platforms.split(",") if p.strip() and p.strip() not in known]
  if unknown or not args.platforms.strip(","):
    parser.error(f"--platforms {args.platforms!r}: each must be one of {', '.join(known)}")
  return args


def export_and_check(workdir: str, output: str, platforms=None) -> dict:
  """Exports ``workdir`` to ``output``, loads the file back and measures it against the fake-quantized model.

  Args:
    workdir: a finished quantized run.
    output: the file to write.
    platforms: backends to export for (default: all of :data:`ewgs_jax.export.model.PLATFORMS`).

  Returns:
    The figures the command prints (see the module docstring).

  Raises:
    ewgs_jax.export.workdir.RunError: an unfit workdir.
    NotImplementedError: a layer without an integer form.
  """
  from ewgs_jax import extras, training
  from ewgs_jax.export import workdir as workdir_lib

  run = workdir_lib.load_run(workdir)
  extras.require("flatbuffers", "saving an integer model (jax.export serialization)")
  with training.matmul_precision(run.config):   # the fake-quant reference at the precision the run used
    return _export_and_check(run, output, platforms)


def _export_and_check(run, output: str, platforms) -> dict:
  import jax

  from ewgs_jax import data, training
  from ewgs_jax.export import check, model as model_lib, runtime

  integer = model_lib.integer_model(run, platforms=tuple(platforms or model_lib.PLATFORMS))
  size = integer.save(output)
  loaded = runtime.load(output)   # what is measured is the file, not the object that wrote it
  info = data.get_dataset_info(run.config.dataset, data_dir=run.config.data_dir)
  fake_model = training.build_model(run.config, info.num_classes)
  apply = jax.jit(lambda variables, images: fake_model.apply(variables, images, train=False))
  fake = lambda images: apply(run.variables, images)   # noqa: E731 (the weights as arguments, not constants)
  evaluation = check.compare_on_split(loaded, fake, run.config)
  test = evaluation if evaluation["split"] == "test" else check.compare_on_split(loaded, fake, run.config, "test")
  return {
      "agreement": evaluation["agreement"],
      "max_rel_logit_error": evaluation["max_rel_logit_error"],
      "eval_split": evaluation["split"],
      "eval_examples": evaluation["count"],
      "test_accuracy": test["accuracy"],
      "fake_quant_test_accuracy": test["fake_quant_accuracy"],
      "test_agreement": test["agreement"],
      "bytes": size,
      "fp_bytes": loaded.metadata["fp_bytes"],
      **{f"{part}_bytes": n for part, n in loaded.nbytes().items()},
      "integer_layers": len(loaded.metadata["layers"]),
      "platforms": loaded.metadata["platforms"],
      "checked_on": jax.default_backend(),
      "output": os.path.abspath(output),
  }


def main(argv: list[str] | None = None) -> int:
  """The command: export, check, print the JSON line.

  Args:
    argv: the arguments after the program name (default: ``sys.argv[1:]``).

  Returns:
    The exit status (see the module docstring); errors exit through ``sys.exit``.
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  from ewgs_jax.export import workdir as workdir_lib
  try:
    result = export_and_check(args.workdir, args.output, platforms)
  except (workdir_lib.RunError, NotImplementedError, ValueError, OSError, ImportError) as e:
    _fail(str(e))
  failed = []
  if result["agreement"] < args.min_agreement:
    failed.append(f"agreement {result['agreement']:.4f} < {args.min_agreement}")
  if args.max_rel_error is not None and result["max_rel_logit_error"] > args.max_rel_error:
    failed.append(f"max_rel_logit_error {result['max_rel_logit_error']:.3g} > {args.max_rel_error}")
  if failed:
    sys.stderr.write(f"error: the integer model does not match the fake-quantized one: {'; '.join(failed)}\n")
  print(json.dumps(result), flush=True)
  return EXIT_CHECK_FAILED if failed else 0


if __name__ == "__main__":
  sys.exit(main())
