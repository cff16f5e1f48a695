"""Preprocessing: encoded image -> normalised float32 crop, as TensorFlow graph ops.

The ops run inside the input streams' tf.data graphs (:mod:`fgnet_jax.data.streams`); every
random draw is a stateless op keyed by an int64 ``[2]`` seed, so an example's augmentation
depends only on its key.

torchvision's semantics (``S`` = image size, 224 by default)
---------------------------------------------------------------
train, one of :data:`AUGMENTATIONS` (the authors used the first in their meta-training stages
and on the auxiliary data, the second for the final fine-tuning):
  ``"random_resized_crop"``: RandomResizedCrop - up to 10 draws of area ``a ~ U(0.08, 1) H W``
  and log aspect ``log r ~ U(log 3/4, log 4/3)``, crop ``w = round(sqrt(a r))``,
  ``h = round(sqrt(a / r))``, the first that fits at a uniform offset, else the whole image
  with its aspect clamped to [3/4, 4/3], centred - resized to ``S x S``; horizontal flip with
  probability 1/2.
  ``"resize_random_crop"``: Resize(256) + RandomCrop(224) scaled to ``S``: resize the shorter
  side to ``S * 256 / 224`` and take an ``S x S`` crop at a uniform offset, computed as the
  equivalent square of side ``round(min(H, W) * 224 / 256)`` at a uniform integer offset in
  the original image, resized to ``S x S``; horizontal flip with probability 1/2.
eval: resize the shorter side to ``S * 256 / 224`` and take the central ``S x S`` crop, computed
  as the equivalent central square of side ``min(H, W) * 224 / 256`` resized to ``S x S``.
Both: bilinear resizing with antialiasing (as PIL), then ``(x / 255 - mean) / std`` with the
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). JPEGs are decoded only inside
the crop window (``decode_and_crop_jpeg``); other formats are decoded whole, then cropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 224 / 256
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
AUGMENTATIONS = ("random_resized_crop", "resize_random_crop")


def random_resized_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = _CROP_ATTEMPTS,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision's ``RandomResizedCrop.get_params`` with stateless draws (see module docstring).

    Returns int32 scalars (top, left, crop_height, crop_width).
    """
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    target_area = height_f * width_f * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
    crop_w = tf.round(tf.sqrt(target_area * aspect))
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width_f) & (crop_h <= height_f)
    any_fit = tf.reduce_any(fits)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first attempt that fits
    in_ratio = width_f / height_f
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(height_f * ratio[1]), width_f)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(width_f / ratio[0]), height_f)
    crop_h = tf.where(any_fit, tf.gather(crop_h, first), fallback_h)
    crop_w = tf.where(any_fit, tf.gather(crop_w, first), fallback_w)
    uniform = tf.random.stateless_uniform([2], offset_seed)
    top = tf.where(any_fit, tf.floor(uniform[0] * (height_f - crop_h + 1)), tf.floor((height_f - crop_h) / 2))
    left = tf.where(any_fit, tf.floor(uniform[1] * (width_f - crop_w + 1)), tf.floor((width_f - crop_w) / 2))
    return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def center_crop_window(
    height: tf.Tensor, width: tf.Tensor, crop_fraction: float = EVAL_CROP_FRACTION
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Central square of side ``round(min(H, W) * crop_fraction)``: (top, left, side, side)."""
    side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction), tf.int32)
    side = tf.maximum(side, 1)
    top = (height - side + 1) // 2
    left = (width - side + 1) // 2
    return top, left, side, side


def random_square_crop_window(
    height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, crop_fraction: float = EVAL_CROP_FRACTION
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Square of side ``round(min(H, W) * crop_fraction)`` at a uniform integer offset:
    (top, left, side, side). Resize(256) + RandomCrop(224) in original-image coordinates."""
    side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction), tf.int32)
    side = tf.maximum(side, 1)
    offsets = tf.random.stateless_uniform([2], seed, minval=0, maxval=2**30, dtype=tf.int32)
    top = offsets[0] % (height - side + 1)
    left = offsets[1] % (width - side + 1)
    return top, left, side, side


def decode_crop(
    encoded: tf.Tensor, window_fn: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]
) -> tf.Tensor:
    """Decodes the window ``window_fn(height, width) -> (top, left, h, w)`` of an image as uint8 RGB.

    JPEGs: only the window is decoded. Other formats (PNG, GIF, BMP): whole image, then cropped.
    """

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        window = tf.stack(window_fn(shape[0], shape[1]))
        return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        shape = tf.shape(image)
        top, left, h, w = window_fn(shape[0], shape[1])
        return image[top : top + h, left : left + w]

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def normalize(image: tf.Tensor) -> tf.Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel."""
    mean = tf.constant(IMAGENET_MEAN, tf.float32)
    std = tf.constant(IMAGENET_STD, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    return tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)


def preprocess_train(
    encoded: tf.Tensor, seed: tf.Tensor, image_size: int = 224, augmentation: str = "random_resized_crop"
) -> tf.Tensor:
    """``augmentation`` crop (module docstring) + horizontal flip + normalisation: float32 [S, S, 3]."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = random_resized_crop_window if augmentation == "random_resized_crop" else random_square_crop_window
    image = decode_crop(encoded, lambda h, w: window(h, w, crop_seed))
    image = _resize(image, image_size)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return normalize(image)


def preprocess_eval(encoded: tf.Tensor, image_size: int = 224) -> tf.Tensor:
    """Resize-256/centre-crop-224 equivalent at any size + normalisation: float32 [S, S, 3]."""
    image = decode_crop(encoded, center_crop_window)
    return normalize(_resize(image, image_size))
