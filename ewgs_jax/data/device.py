"""Device transforms: uint8 batches become normalised float images inside the jitted step.

The host sends images as stored (uint8: 3,072 bytes per CIFAR image, a quarter of float32), and
:func:`device_transform` does the rest on the accelerator, where it costs next to nothing:

* scale to [0, 1] (``pixel / pixel_max``: 255 for uint8, 16 for scikit-learn's digits, 1 for
  float data);
* for training with augmentation, the pad crop (4 zero pixels each side, as torch's
  ``RandomCrop(32, padding=4)``; 1 for the 8x8 digits) and, where a mirror keeps the meaning, the
  horizontal flip with probability 1/2;
* normalise with the dataset's per-channel mean and std.

Randomness is per example: row ``r`` of global batch ``step`` of ``epoch`` draws from a key derived
from ``(seed, epoch, step, r)``, which the host batch carries in ``"position"``. An example's crop
thus depends only on its global position: the same for any process count and for any sharding of
the batch over the ``data`` mesh, and the same after resuming.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ewgs_jax.data.metadata import DatasetInfo

PAD = {"crop_flip": 4, "crop": 4, "shift": 1}   # pad-crop sizes of the device augmentations


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """What :func:`device_transform` needs: normalisation, pixel scale, and the training augmentation.

  ``pad`` 0 means no crop (no augmentation, or an augmentation done per image on the host).
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  pixel_max: float = 255.0
  pad: int = 0
  flip: bool = False


def device_spec(info: DatasetInfo, *, augment: bool = True) -> DeviceSpec:
  """The device transform's spec for a dataset and the run's ``augment`` setting.

  Args:
    info: the dataset's info (mean, std, pixel scale, augmentation kind).
    augment: whether training batches are augmented (``config.augment``).

  Returns:
    The :class:`DeviceSpec`.
  """
  pad = PAD.get(info.augmentation, 0) if augment else 0
  return DeviceSpec(tuple(info.mean), tuple(info.std), float(info.pixel_max), pad,
                    flip=bool(pad) and info.augmentation == "crop_flip")


def row_keys(position: jax.Array) -> jax.Array:
  """One PRNG key per row from its ``(seed, epoch, step, global row)``.

  Args:
    position: uint32 ``[batch, 4]``.

  Returns:
    ``[batch]`` typed keys.
  """
  def one(p):
    key = jax.random.key(p[0])
    for value in (p[1], p[2], p[3]):
      key = jax.random.fold_in(key, value)
    return key
  return jax.vmap(one)(jnp.asarray(position, jnp.uint32))


def pad_crop_flip(images: jax.Array, keys: jax.Array, pad: int, flip: bool) -> jax.Array:
  """Random crop of each image from its zero-padded copy (``pad`` pixels each side), then a flip.

  Args:
    images: float ``[batch, height, width, channels]``.
    keys: one key per image.
    pad: the zero padding on each side, and so the largest shift.
    flip: whether to flip each image horizontally with probability 1/2.

  Returns:
    The augmented images, the shape of ``images``.
  """
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, key):
    shift_key, flip_key = jax.random.split(key)
    dy, dx = jax.random.randint(shift_key, (2,), 0, 2 * pad + 1)
    out = jax.lax.dynamic_slice(image, (dy, dx, 0), (h, w, c))
    if flip:
      out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1], out)
    return out
  return jax.vmap(one)(padded, keys)


def device_transform(spec: DeviceSpec) -> Callable[..., dict]:
  """The pure, jittable function from a host batch to what the model sees.

  Args:
    spec: from :func:`device_spec`.

  Returns:
    ``fn(batch, *, train) -> {"image", "label"[, "mask"]}``: ``batch`` as the iterators yield it
    (``image`` uint8 or float NHWC, ``label``, and ``position`` for training or ``mask`` for
    evaluation); ``image`` comes back float32, augmented when ``train`` and ``spec.pad``, and
    normalised; ``label`` int32; ``mask`` as given. Works on batches sharded over the ``data``
    mesh (every operation is per row).
  """
  # XLA turns each division by a constant into a product with its reciprocal: the images equal the
  # host transform's (batches before they travelled as uint8) to 1 ulp, not bit for bit.
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)

  def fn(batch: dict, *, train: bool) -> dict:
    images = jnp.asarray(batch["image"]).astype(jnp.float32)
    if spec.pixel_max != 1.0:
      images = images / jnp.float32(spec.pixel_max)
    if train and spec.pad:
      images = pad_crop_flip(images, row_keys(batch["position"]), spec.pad, spec.flip)
    out = {"image": (images - mean) / std, "label": jnp.asarray(batch["label"]).astype(jnp.int32)}
    if "mask" in batch:
      out["mask"] = batch["mask"]
    return out
  return fn


def model_inputs(info: DatasetInfo) -> Callable[[dict], jax.Array]:
  """``fn(host batch) -> float images`` as the model sees them at evaluation (normalised, not augmented),
  jitted: for code that feeds a model outside the training steps (export checks, PTQ calibration).

  Args:
    info: the dataset's metadata.

  Returns:
    The function.
  """
  transform = device_transform(device_spec(info, augment=False))
  return jax.jit(lambda batch: transform(batch, train=False)["image"])
