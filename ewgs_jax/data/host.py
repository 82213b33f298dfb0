"""Host transforms: what must happen per image before a batch can be stacked, uint8 in and out.

Only images whose size varies need work on the host (ImageNet-style JPEGs): decode, crop, resize to
224x224, flip. Everything else (normalisation, the CIFAR/MNIST pad-crop and flip) runs on the
device, in the jitted step (:mod:`ewgs_jax.data.device`), so batches travel as uint8.

* Training: random resized crop (scale 0.08-1, ratio 3/4-4/3, torchvision's defaults) + flip. The
  crop box is drawn from the JPEG header's size, then the JPEG is decoded at the smallest scale
  (PIL ``draft``: 1/2, 1/4, 1/8, in libjpeg's DCT) that still gives the box at least 224 pixels
  each way, so a large image is never decoded at full size only to be shrunk.
* Evaluation: shorter side to 256, centre crop 224 (full-scale decode: the same pixels as before
  batches travelled as uint8).
"""

from __future__ import annotations

import io

import numpy as np

from ewgs_jax import extras
from ewgs_jax.data.metadata import IMAGENET_RESIZE, IMAGENET_SIZE, DataError, DatasetInfo

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _pil():
  return extras.require("PIL.Image", "ImageNet's image transforms")


def open_image(image, where: str = "image"):
  """A PIL image, not yet decoded when ``image`` is encoded bytes (so that ``draft`` can apply).

  Args:
    image: encoded bytes (JPEG, PNG, ...) or a uint8 HWC / HW array.
    where: the record's name for the error message.

  Returns:
    The PIL image; raises :class:`DataError` naming ``where`` if the bytes are not an image.
  """
  Image = _pil()
  if isinstance(image, (bytes, bytearray, memoryview)):
    try:
      return Image.open(io.BytesIO(image))
    except Exception as e:
      raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
  array = np.asarray(image)
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
    raise DataError(f"{where}: cannot decode the image (an array of {array.dtype} {array.shape}; expected uint8 "
                    "HxW or HxWx1 or HxWx3, or encoded bytes)")
  return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _rgb(pil, where: str):
  try:
    pil.load()
  except Exception as e:   # truncated or corrupt data surfaces here, at decode time
    raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """A random resized crop's box ``(top, left, crop_height, crop_width)`` (torchvision's rule).

  Up to ten tries of an area fraction in ``SCALE`` and a log-uniform aspect ratio in ``RATIO``;
  failing those, the centred square of the shorter side.

  Args:
    height, width: the image's size.
    rng: the generator of this image.

  Returns:
    The box, inside the image.
  """
  for _ in range(10):
    area = height * width * rng.uniform(*SCALE)
    ratio = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1])))
    cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
    if 0 < cw <= width and 0 < ch <= height:
      return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def random_resized_crop(image, rng: np.random.Generator, size: int = IMAGENET_SIZE, where: str = "image") -> np.ndarray:
  """Random resized crop to ``size`` + horizontal flip, decoding at reduced scale where possible.

  Args:
    image: encoded bytes or a uint8 array.
    rng: the generator of this image (keyed by seed, epoch, step and global row).
    size: the output side.
    where: the record's name for error messages.

  Returns:
    uint8 ``[size, size, 3]``.
  """
  Image = _pil()
  pil = open_image(image, where)
  width, height = pil.size
  top, left, ch, cw = crop_box(height, width, rng)
  if getattr(pil, "format", None) == "JPEG":
    # The decoded image stays >= the requested size, so the box keeps >= size pixels each way.
    pil.draft("RGB", (-(-width * size // cw), -(-height * size // ch)))
  pil = _rgb(pil, where)
  sx, sy = pil.size[0] / width, pil.size[1] / height
  out = pil.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
  if rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def center_crop(image, where: str = "image") -> np.ndarray:
  """Shorter side to 256, centre crop 224 (evaluation).

  Args:
    image: encoded bytes or a uint8 array.
    where: the record's name for error messages.

  Returns:
    uint8 ``[224, 224, 3]``.
  """
  Image = _pil()
  pil = _rgb(open_image(image, where), where)
  w, h = pil.size
  scale = IMAGENET_RESIZE / min(h, w)
  resized = np.asarray(pil.resize((round(w * scale), round(h * scale)), Image.BILINEAR))
  top, left = (resized.shape[0] - IMAGENET_SIZE) // 2, (resized.shape[1] - IMAGENET_SIZE) // 2
  return resized[top:top + IMAGENET_SIZE, left:left + IMAGENET_SIZE]


def row_rng(seed: int, epoch: int, step: int, row: int) -> np.random.Generator:
  """The host generator of one training image, keyed by its global position.

  Args:
    seed: the run's seed.
    epoch, step: the batch's position.
    row: the image's row in the global batch.

  Returns:
    A generator that depends on nothing else (not on the process count, nor on resuming).
  """
  return np.random.default_rng([seed, epoch, step, 2, row])


def stack_images(images, info: DatasetInfo, where: str, records=None) -> np.ndarray:
  """Images of a fixed size as one batch, in their stored dtype (uint8, or float for float data).

  Args:
    images: an NHWC array or a list of HWC / HW arrays.
    info: the dataset's info (the expected shape).
    where: the source's name for the error message.
    records: the rows' record indices in the source, for the error message (default: the rows).

  Returns:
    The NHWC batch; raises :class:`DataError` naming the first record of the wrong shape.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == tuple(info.image_shape):
    return images
  expected = tuple(info.image_shape)
  batch = []
  for i, image in enumerate(images):
    array = np.asarray(image)
    if array.ndim == 2 and expected[-1] == 1:
      array = array[..., None]
    if array.shape != expected:
      record = records[i] if records is not None else i
      raise DataError(f"{where}, record {record}: the source returned an image of shape {array.shape}, "
                      f"expected {expected}")
    batch.append(array)
  return np.stack(batch)


def imagenet_batch(images, rngs, where: str, records=None) -> np.ndarray:
  """ImageNet-style images as one uint8 batch: random resized crops (``rngs``) or centre crops.

  Args:
    images: encoded bytes or arrays, one per row.
    rngs: one generator per row for training, or ``None`` for the evaluation crop.
    where: the source's name for error messages.
    records: the rows' record indices in the source, for error messages (default: the rows).

  Returns:
    uint8 ``[len(images), 224, 224, 3]``.
  """
  out = np.empty((len(images), IMAGENET_SIZE, IMAGENET_SIZE, 3), np.uint8)
  for i, image in enumerate(images):
    name = f"{where}, record {records[i] if records is not None else i}"
    out[i] = random_resized_crop(image, rngs[i], where=name) if rngs is not None else center_crop(image, name)
  return out
