"""What the KV-cache decode loop writes to memory on every generated token, from the compiler.

    python -m lego_jax.bench.loop_buffers [--config=configs/lego_ego4d.py] [--target=h200-x8]
        [--layers=4] [--batch=1] [--prompt_len=300] [--new_tokens=128] [--stacked]
        [--xla=name=value,...]

Compiles `lego_jax.infer.decode`'s generation (prefill + `lax.while_loop` of one-token steps) for
ONE device of a target, ahead of time from abstract shapes (no weights, no accelerator: the GPU
targets need the plan-gpu extra, as `lego-jax plan`), with the LLaMA widths of the config's
`llama` section and `--layers` blocks. It prints the compiler's memory and, for every while loop,
the buffers of at least one weight matrix's size that an iteration materialises: outputs of
fusions, copies, concatenations; parameters, bitcasts and tuple plumbing are free. A weight-sized
buffer in the decode loop is weight traffic beyond reading the weights once per token, the
budget of batch-1 decoding (docs/experiments/2026-12-04-decode-weights.md).
--stacked runs the blocks as the scan over stacked weights (vllm_generate.unstack_layers=False);
--xla adds XLA options to the compile (the decode loop's own GPU options are always there).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

FREE_OPS = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)")
_CALLEE = re.compile(
    r"(?:body|condition|to_apply|branch_computations|called_computations)=\{?%?([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, from `compiled.as_text()`."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.split("\n"):
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  return comps


def _elements(dims: str) -> int:
  n = 1
  for d in dims.split(","):
    n *= int(d) if d else 1
  return n


def loop_buffers(hlo_text: str, min_elements: int) -> dict[str, collections.Counter]:
  """For each while loop's body (and the computations it runs, nested loops included, fused
  computations excluded: they run inside one kernel): Counter of (opcode, dtype[shape], fusion
  name) for instructions whose output has >= min_elements elements and is not free plumbing."""
  comps = computations(hlo_text)
  bodies = {b for lines in comps.values() for line in lines
            for b in re.findall(r"body=%?([\w.\-]+)", line)}

  def reachable(name, seen):
    for line in comps.get(name, []):
      if " fusion(" in line:
        continue
      for callee in _CALLEE.findall(line):
        if callee not in seen:
          seen.add(callee)
          reachable(callee, seen)
    return seen

  out = {}
  for body in bodies:
    found = collections.Counter()
    for name in reachable(body, {body}):
      for line in comps.get(name, []):
        m = _INSTRUCTION.match(line)
        if not m:
          continue
        dtype, dims, op, rest = m.groups()
        if op in FREE_OPS or _elements(dims) < min_elements:
          continue
        called = re.search(r"calls=%?([\w\-]+)", rest)
        found[(op, f"{dtype}[{dims}]", called.group(1) if called else "")] += 1
    out[body] = found
  return out


def compile_decode(llama_config, device, batch: int, prompt_len: int, new_tokens: int,
                   unstack_layers: bool, options: dict | None = None):
  """The generation of `decode.generate` compiled for `device` from abstract shapes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from lego_jax.infer import decode
  from lego_jax.models.llama import Llama

  rep = NamedSharding(Mesh([device], ("data",)), P())
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(llama_config, rngs=nnx.Rngs(0))))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  state = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
  knobs = decode.SamplingConfig(max_new_tokens=new_tokens, eos_id=-1, top_k=50,
                                unstack_layers=unstack_layers).traced()
  knobs = jax.tree.map(lambda x: spec(x.shape, x.dtype), knobs)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (graphdef, state, spec((batch, prompt_len, llama_config.hidden_size), llama_config.dtype),
          spec((batch,), jnp.int32), spec(key.shape, key.dtype), knobs)
  options = {**(decode.compiler_options(device.platform) or {}), **(options or {})}
  traced = jax.jit(decode._generate, static_argnames=("graphdef", "cache_dtype")).trace(
      *args, cache_dtype=jnp.dtype(llama_config.dtype))
  return traced.lower().compile(options or None)


def _options(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--xla: {item!r} is not name=value")
    out[name] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lego_jax.bench.loop_buffers",
                              description=__doc__.split("\n\n")[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/lego_ego4d.py",
                 help="config file whose `llama` section gives the widths")
  p.add_argument("--target", default="h200-x8", help="a `lego-jax plan` target (one device)")
  p.add_argument("--layers", type=int, default=4, help="LLaMA blocks (the loop repeats them)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=300)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--stacked", action="store_true", help="the scan over stacked block weights")
  p.add_argument("--xla", default="", help="XLA options name=value,... for the compile")
  a = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from lego_jax import config as config_lib, plan
  from lego_jax.models.llama import LlamaConfig

  # The compile needs none of this host's devices (a CUDA plugin without a GPU fails to start).
  jax.config.update("jax_platforms", "cpu")

  try:
    options = _options(a.xla)
    cfg = config_lib.load(a.config)
    target = plan.target_of(a.target)
    device = plan.target_devices(target)[0]
    llama = LlamaConfig(**{**dict(cfg.llama), "num_layers": a.layers, "dtype": jnp.bfloat16,
                           "param_dtype": jnp.bfloat16})
  except (ValueError, OSError) as e:   # ConfigError is a ValueError
    print(f"loop_buffers: {e}", file=sys.stderr)
    return 2
  compiled = compile_decode(llama, device, a.batch, a.prompt_len, a.new_tokens,
                            unstack_layers=not a.stacked, options=options)
  mem = compiled.memory_analysis()
  print(f"{target.name} ({device.device_kind}), {a.layers} blocks of hidden "
        f"{llama.hidden_size} / mlp {llama.intermediate_size}, batch {a.batch}, prompt "
        f"{a.prompt_len} + {a.new_tokens}, {'stacked scan' if a.stacked else 'per-layer weights'}"
        f": arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
        f"{mem.temp_size_in_bytes / 2**30:.2f} GiB")
  smallest = min(llama.hidden_size * llama.hidden_size,
                 llama.hidden_size * llama.intermediate_size)
  for body, found in sorted(loop_buffers(compiled.as_text(), smallest).items()):
    print(f"while body {body}: {sum(found.values())} buffers of >= one weight matrix per trip")
    for (op, shape, called), n in found.most_common():
      print(f"  {n:4d} x {op} {shape} {called}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
