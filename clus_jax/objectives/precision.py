"""The precision the losses compute in: the caller's, with float32 as the floor.

float32 inputs compute in float32 and bfloat16/float16 inputs in float32 (as the trainer needs); float64
inputs (with ``jax_enable_x64``) compute in float64, so the losses can be checked against float64
references to float64 accuracy. Python scalars are weakly typed and never widen the result.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def compute_dtype(*values: Any) -> jnp.dtype:
    """The floating dtype for math on ``values``: their promoted dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*values), jnp.float32)
