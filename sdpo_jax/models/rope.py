"""Rotary position embeddings (RoPE) with the scalings Llama-family checkpoints use.

Base frequencies for a head of size d:  inv_freq_i = theta^(-2i/d),  i = 0 .. d/2-1.
Scalings of inv_freq (Hugging Face `rope_type`):
  * default: unchanged.
  * linear:  inv_freq / factor.
  * llama3:  with wavelength w_i = 2*pi / inv_freq_i, L = original_max_position_embeddings,
             w_lo = L / low_freq_factor, w_hi = L / high_freq_factor:
               w_i > w_lo  -> inv_freq_i / factor            (low frequencies stretched)
               w_i < w_hi  -> inv_freq_i                     (high frequencies kept)
               otherwise   -> (1 - s) * inv_freq_i / factor + s * inv_freq_i,
                              s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
Rotation of a vector x at position p, in the "rotate half" layout Hugging Face uses:
  x * cos(p * f) + rotate_half(x) * sin(p * f),  f = concat(inv_freq, inv_freq),
  rotate_half([x1, x2]) = [-x2, x1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, rope_parameters: Mapping[str, Any] | None = None) -> np.ndarray:
    """float32 inverse frequencies [head_dim // 2], scaled as the rope parameters say."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, params)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_scaling(inv_freq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    factor = np.float32(params["factor"])
    low, high = np.float32(params["low_freq_factor"]), np.float32(params["high_freq_factor"])
    context = np.float32(params["original_max_position_embeddings"])
    wavelength = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of shape [batch, seq, head_dim] in float32 for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
