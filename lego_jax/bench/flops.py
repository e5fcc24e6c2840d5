"""FLOPs of a JAX program counted from its jaxpr: matrix products and convolutions only.

    count_flops(fn, *args, while_trips=1) -> FlopCount(total, matmul, conv, attention, bytes, loops)

Counts 2 FLOPs per multiply-add of every `dot_general` and `conv_general_dilated` (and of
cuDNN's fused attention, where a GPU trace holds it), walking into every sub-jaxpr: `scan`
bodies count `length` times, `while` bodies `while_trips` times (a decode loop's trip count is
not in the program; the caller knows it), `cond` its most expensive branch. Elementwise work,
reductions and normalisations are left out, as PyTorch's `FlopCounterMode` leaves them out, so
the two counts of one model agree (tests/bench checks this on the UNet). `bytes` are the
operands the matmuls and convolutions read and the results they write, once each (the memory
side of `lego-jax plan`'s roofline).

Why not XLA's `compiled.cost_analysis()["flops"]`: it counts a loop body ONCE, so a model whose
identical layers run in a `scan` (all of ours) is under-counted by its depth. The bench and the
plan report XLA's figure beside this one for reference.

Arguments may be `jax.ShapeDtypeStruct`s: counting traces the program, it never runs or compiles
it, so full-size models are counted on any machine. Counts are Python ints where they are whole
numbers (exact beyond float64's 2**53, which a full-size training step passes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass
class FlopCount:
  """FLOPs by kind and the bytes of the counted products; `loops` lists (primitive, trips) of
  every loop met, outermost first."""
  matmul: float = 0
  conv: float = 0
  attention: float = 0
  bytes: int = 0
  loops: list = dataclasses.field(default_factory=list)

  @property
  def total(self) -> float:
    return self.matmul + self.conv + self.attention

  def add(self, other: "FlopCount", times: float) -> None:
    self.matmul += times * other.matmul
    self.conv += times * other.conv
    self.attention += times * other.attention
    self.bytes += times * other.bytes


def _shape(var) -> tuple[int, ...]:
  return tuple(getattr(var.aval, "shape", ()))


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> float:
  """2 x (every lhs element) x (rhs's free dimensions): batch and contracting dims counted once."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
  return 2 * math.prod(lhs_shape) * math.prod(free)


def conv_flops(out_shape, rhs_shape, params) -> float:
  """2 x output elements x (input features x window) per output element.

  A gradient-of-input convolution (input dilated by the forward stride) multiplies the inserted
  zeros too; dividing by the dilation counts only the real products, as PyTorch's counter does.
  """
  rhs_spec = params["dimension_numbers"].rhs_spec   # (out features, in features, *spatial)
  in_features = rhs_shape[rhs_spec[1]]
  window = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  dilation = math.prod(params.get("lhs_dilation") or (1,))
  products = 2 * math.prod(out_shape) * in_features * window
  return products // dilation if products % dilation == 0 else products / dilation


def _fused_attention_flops(eqn) -> float:
  # cuDNN's fused attention (GPU traces only): q (B, T, N, D), k (B, S, N_kv, D). Forward
  # QK^T and PV: 4 B N T S D; backward: twice that (dQ, dK, dV, dP), recomputation not counted.
  q, k = _shape(eqn.invars[0]), _shape(eqn.invars[1])
  b, t, n, d = q
  forward = 4.0 * b * n * t * k[1] * d
  return forward * (2.0 if "bwd" in eqn.primitive.name else 1.0)


def _io_bytes(eqn) -> int:
  """Both operands read and the result written, once each."""
  return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
             for v in (*eqn.invars[:2], *eqn.outvars))


def _sub_jaxprs(params: dict[str, Any]):
  for key, value in params.items():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield key, v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield key, v


def count_jaxpr(jaxpr, while_trips: int = 1) -> FlopCount:
  """Counts a jaxpr (or a ClosedJaxpr, as `jax.make_jaxpr` returns it)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      out.matmul += dot_general_flops(_shape(eqn.invars[0]), _shape(eqn.invars[1]),
                                      eqn.params["dimension_numbers"])
      out.bytes += _io_bytes(eqn)
    elif name == "conv_general_dilated":
      out.conv += conv_flops(_shape(eqn.outvars[0]), _shape(eqn.invars[1]), eqn.params)
      out.bytes += _io_bytes(eqn)
    elif "dot_product_attention" in name:
      out.attention += _fused_attention_flops(eqn)
    elif name == "scan":
      inner = count_jaxpr(eqn.params["jaxpr"], while_trips)
      out.add(inner, eqn.params["length"])
      out.loops += [("scan", eqn.params["length"])] + inner.loops
    elif name == "while":
      inner = count_jaxpr(eqn.params["body_jaxpr"], while_trips)
      out.add(inner, while_trips)
      out.loops += [("while", while_trips)] + inner.loops
    elif name == "cond":
      branches = [count_jaxpr(b, while_trips) for b in eqn.params["branches"]]
      out.add(max(branches, key=lambda c: c.total), 1)
    else:
      for _, sub in _sub_jaxprs(eqn.params):
        inner = count_jaxpr(sub, while_trips)
        out.add(inner, 1)
        out.loops += inner.loops
  return out


def count_flops(fn: Callable, *args, while_trips: int = 1, **kwargs) -> FlopCount:
  """Counts `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs), tracing only."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, while_trips)


def xla_flops(compiled) -> float | None:
  """XLA's own estimate from a compiled program (loop bodies counted once), or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and np.isfinite(flops) and flops >= 0 else None
