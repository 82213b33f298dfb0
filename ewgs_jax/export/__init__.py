"""Integer models from quantization-aware training: packed codes, folded BatchNorm, int32 accumulation.

* :func:`integer_model`: a trained quantized model (a workdir, or variables and a config) as an
  integer-arithmetic forward for every backend (:mod:`ewgs_jax.export.model`);
* :func:`load` / :meth:`IntegerModel.save`: one ``.npz`` file, loadable with numpy and jax alone
  (:mod:`ewgs_jax.export.runtime`);
* :mod:`ewgs_jax.export.integer`: one layer's integer arithmetic; :mod:`ewgs_jax.export.packing`:
  sub-byte code packing;
* ``python -m ewgs_jax.export WORKDIR OUTPUT``: export a finished run and check it against the
  fake-quantized model (:mod:`ewgs_jax.export.__main__`).
"""

from ewgs_jax.export.model import integer_model
from ewgs_jax.export.runtime import IntegerModel, load

__all__ = ["IntegerModel", "integer_model", "load"]
