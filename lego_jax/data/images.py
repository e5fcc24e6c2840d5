"""Image bytes in, numpy arrays out: decoding, RGB normalisation of odd modes, the two views.

Two views of one frame feed the two models:
  * LDM view: LANCZOS squash to (size, size) (aspect ratio NOT kept, as in the release), float32
    in [-1, 1], NHWC.
  * CLIP view (the VLLM's vision tower): bicubic resize of the short side to `size`, centre crop
    (size, size), then CLIP mean/std normalisation; the same arithmetic as transformers'
    CLIPImageProcessor, so features match the PyTorch release.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

CLIP_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)
JPEG_QUALITY = 95


class ImageError(ValueError):
  """An image file that cannot be decoded (missing, truncated, not an image)."""


def open_image(data: bytes) -> Image.Image:
  """Fully decodes `data` (so truncated files fail here, not later in a worker)."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises a zoo of types for bad files
    raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
  return img


# What libjpeg-turbo decodes a JPEG of each PIL mode into for the corruption check.
_JPEG_CHECK_COLORSPACE = {"L": "GRAY", "CMYK": "CMYK"}


def check_jpeg(data: bytes, mode: str) -> None:
  """ImageError if libjpeg reports the JPEG's data as corrupt.

  PIL decodes a JPEG with damaged entropy-coded data (a flipped bit, spliced bytes) into a
  garbage image without a word: libjpeg's warnings ("Corrupt JPEG data: bad Huffman code",
  "premature end of data segment") are dropped. simplejpeg's strict decode turns them into
  errors. Of single-bit flips in a 256x256 frame it reports 93% of those that change the image
  by more than 10 grey levels on average, 54% of those between 1 and 10, 1% of those below 1
  (docs/data-faults.md): damage that decodes without a warning cannot be told from content.
  """
  try:
    simplejpeg.decode_jpeg(data, colorspace=_JPEG_CHECK_COLORSPACE.get(mode, "RGB"), strict=True)
  except ValueError as e:
    raise ImageError(f"corrupt JPEG data (the decoder says: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB.

  16-bit and 32-bit integer greyscale is rescaled (PIL's own convert() clips at 255, which turns
  16-bit frames white); transparent pixels are composited over black, i.e. alpha-premultiplied.
  """
  if img.mode == "RGB":
    return img
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    arr = np.asarray(img).astype(np.float64)
    # "I" is how PIL opens 16-bit PNGs; values beyond 16 bits would be a 32-bit image.
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else arr.max()
    arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if img.mode == "F":
    arr = np.asarray(img, np.float64)
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
    top = 1.0 if lo >= 0.0 and hi <= 1.0 else 255.0
    arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if img.mode == "P":
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = np.asarray(img.convert("RGBA"), np.float32)
    rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
  return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def normalise_jpeg(data: bytes) -> tuple[bytes, int, int]:
  """Validates an image file's bytes -> (RGB JPEG bytes, height, width).

  An 8-bit RGB JPEG is kept byte for byte (re-encoding would lose quality for nothing); every
  other format or mode is converted to RGB and encoded as JPEG.
  """
  img = open_image(data)
  if img.format == "JPEG":
    check_jpeg(data, img.mode)
  if img.format == "JPEG" and img.mode == "RGB":
    return data, img.height, img.width
  rgb = to_rgb(img)
  return encode_jpeg(rgb), rgb.height, rgb.width


def normalise_mask_png(data: bytes) -> bytes:
  """Validates a mask image -> single-channel 8-bit PNG bytes (0 = unchanged, 255 = changed)."""
  img = open_image(data)
  if img.format == "PNG" and img.mode == "L":
    return data
  arr = np.asarray(to_rgb(img).convert("L"))
  return encode_png(np.where(arr > 127, 255, 0).astype(np.uint8))


def decode_rgb_image(data: bytes) -> Image.Image:
  """JPEG/PNG bytes -> decoded RGB PIL image (the pipeline stays in PIL until the last step:
  every numpy round trip is a copy of the frame)."""
  return to_rgb(open_image(data))


def decode_rgb(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> (H, W, 3) uint8."""
  return np.asarray(decode_rgb_image(data))


def decode_mask_image(data: bytes) -> Image.Image:
  """Mask PNG bytes -> mode "L" PIL image, 0 or 255."""
  img = open_image(data).convert("L")
  return img.point(lambda v: 255 if v > 127 else 0)


def decode_mask(data: bytes) -> np.ndarray:
  """Mask PNG bytes -> (H, W) bool."""
  return np.asarray(open_image(data).convert("L")) > 127


def _pil(img) -> Image.Image:
  return img if isinstance(img, Image.Image) else Image.fromarray(img)


def squash_image(img, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
  """PIL image or array -> (size, size) PIL image, aspect ratio not kept."""
  img = _pil(img)
  return img if img.size == (size, size) else img.resize((size, size), resample)


def squash(img, size: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
  """(H, W, C) or (H, W) uint8 (or a PIL image) -> (size, size, ...) uint8, aspect not kept."""
  if isinstance(img, np.ndarray) and img.shape[:2] == (size, size):
    return img
  return np.asarray(squash_image(img, size, resample))


def squash_mask(mask, size: int) -> np.ndarray:
  """(H, W) bool array or "L" image -> (size, size) bool; nearest keeps the mask binary."""
  if isinstance(mask, np.ndarray):
    if mask.shape == (size, size):
      return mask.astype(bool)
    mask = Image.fromarray(mask.astype(np.uint8) * 255)
  return np.asarray(squash_image(mask, size, Image.Resampling.NEAREST)) > 127


def to_unit_range(img: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (one allocation: this runs on every frame of every batch)."""
  out = np.multiply(img, np.float32(2.0 / 255.0), dtype=np.float32)
  out -= np.float32(1.0)
  return out


def frames_to_unit_range(x):
  """Frames as the pipelines give them (uint8 0..255) -> float32 in [-1, 1]; float frames
  (already in [-1, 1], e.g. from single-frame inference or tests) pass through unchanged.

  Works on numpy arrays and on (traced) jax.Arrays: the training and sampling programs call it
  on the device, so workers, inter-process queues and host->device copies move uint8 frames (a
  quarter of the bytes, and the float conversion is fused into the first convolution's input).
  The arithmetic is to_unit_range's."""
  if x.dtype != np.uint8:
    return x
  if isinstance(x, np.ndarray):
    return to_unit_range(x)
  # jax only for device arrays: the data_prep converters use this module without importing jax.
  import jax.numpy as jnp

  return x.astype(jnp.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def from_unit_range(img: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 (clipped)."""
  return np.clip(np.rint((np.asarray(img, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def clip_view(img, size: int) -> np.ndarray:
  """(H, W, 3) uint8 array or RGB PIL image -> (size, size, 3) float32, CLIP-normalised.

  Short side -> `size` (bicubic; the long side truncated to an int, as transformers does), then a
  centre crop with the offset rounded down, then (x / 255 - mean) / std.
  """
  img = _pil(img)
  w, h = img.size
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  if (new_h, new_w) != (h, w):
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  img = np.asarray(img.crop((left, top, left + size, top + size)))
  return (img.astype(np.float32) / np.float32(255.0) - CLIP_MEAN) / CLIP_STD


def clip_unnormalise(img: np.ndarray) -> np.ndarray:
  """CLIP-normalised float -> uint8 (for looking at what the vision tower saw)."""
  x = np.asarray(img, np.float32) * CLIP_STD + CLIP_MEAN
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
