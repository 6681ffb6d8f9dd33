"""A two-operand einsum with float32 accumulation whose backward pass stays in the compute dtype.

    y = einsum(spec, x, w)    accumulated in float32, returned in float32
    dx = einsum(y->x spec, g, w),  dw = einsum(x,y->w spec, x, g)   with g cast to x's dtype

``jnp.einsum(..., preferred_element_type=float32)`` alone differentiates with a float32
cotangent, so with bfloat16 operands both backward products (two thirds of a layer's matmul
work) run as float32 x float32 (XLA converts the bfloat16 operand up). Here the cotangent is
rounded to the operands' dtype first, so the backward products are bfloat16 x bfloat16 with float32
accumulation, like the forward one (the usual mixed-precision rule, e.g. PyTorch autocast). With
float32 operands the cast is the identity and this is exactly ``jnp.einsum``.

``spec`` must name every index in at least two of its three terms (in all three: a batch index;
none summed within one operand or broadcast into the output), which holds for the model's
projections ("bsd,dhk->bshk", "bsf,fd->bsd", ...), the attention products
("bktgd,bksd->bktgs", ...) and the output layer ("rcd,dv->rcv").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _terms(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    for index in set(x + w + out):
        if (index in x) + (index in w) + (index in out) < 2:
            raise ValueError(f"mixed_einsum: index {index!r} of {spec!r} must appear in at least two terms")
    return x, w, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """einsum(spec, x, w) with float32 accumulation and output (see the module docstring)."""
    _terms(spec)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _forward(spec, x, w):
    return mixed_einsum(spec, x, w), (x, w)


def _backward(spec, residuals, g):
    x, w = residuals
    x_terms, w_terms, out_terms = _terms(spec)
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out_terms},{w_terms}->{x_terms}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{x_terms},{out_terms}->{w_terms}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_einsum.defvjp(_forward, _backward)
