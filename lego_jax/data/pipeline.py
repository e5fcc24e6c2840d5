"""Grain input pipelines: ArrayRecord records -> decoded, resized, jointly flipped batches.

    records (tfds data source) [+ extra per-example sources zipped by index]
      -> Decode         JPEG/PNG bytes -> PIL images (numpy only at the end: each round trip
                        copies a frame), text bytes -> str
      -> Resize         LDM view: LANCZOS squash to image_size; CLIP view: bicubic short side
                        vllm_image_size + centre crop + CLIP mean/std (from the UNflipped input:
                        the VLLM's features are not flipped, as in the release)
      -> JointFlip      one coin per example (seeded by Grain per record) flips input, target
                        and mask together
      -> ToArrays       LDM frames to uint8 arrays, mask to bool
      -> Batch
Frames stay uint8 to the device: `images.frames_to_unit_range` turns them into float32 in
[-1, 1] inside the jitted programs (4x fewer bytes through the worker queues and host->device
copies, and no per-pixel float arithmetic in the workers: 178 -> 322 pairs/s at 256 px with 2
workers on the 2-core machine, `python -m lego_jax.bench.data_pipeline`).
A `grain.DataLoader` runs it: seeded shuffling, one shard per host (ShardOptions by process
index/count), `worker_count` worker processes, and an iterator whose `get_state()` /
`set_state()` resume the exact sequence (with the same worker_count: each worker batches its own
share of the records). `to_global` turns a host's batch into global jax.Arrays.
With workers, Grain hands each batch over in POSIX shared memory that it unlinks only when the
batch is garbage-collected, on a background thread: batches alive at exit (or freed just before
it) and the batches still queued in an iterator nobody closed were left to multiprocessing's
resource tracker ("There appear to be N leaked shared_memory objects" at the end of the demo).
So the loaders here unlink each batch's blocks as it arrives (the mapping stays valid until the
arrays go; nothing is copied) and their iterators close: `close()`, `with`, or when exhausted;
closing waits until Grain has unlinked the batches its buffers still held (`_finish_unlinks`).

Batch (per host) of the pair pipeline, B = batch size, S = image_size, V = vllm_image_size:
  input, target  (B, S, S, 3) uint8                   mask       (B, S, S, 1) bool (action pixels)
  clip_input     (B, V, V, 3) float32 CLIP-normalised  has_mask   (B,) bool (False: real data)
  flipped        (B,) bool       index (B,) int32 record index in the split
  height, width  (B,) int32 original frame size
  id, action, raw_action, description, meta  (B,) str
The instruction pipeline gives clip_image (B, V, V, 3), prompt, answer, id, index.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from lego_jax.data import images, records


def exit_with_parent(poll_s: float = 1.0) -> None:
  """In a Grain worker process: exit as soon as the training process that started it is gone.

  Grain's workers are spawned children that unpickle this module's transforms, so this runs in
  each of them at import. A parent ended by kill -9 cannot stop them; without this they (and the
  multiprocessing resource tracker, which waits for them) stayed alive for minutes, holding their
  memory. A dead parent shows as a changed parent pid (the orphan is re-parented)."""
  import multiprocessing
  import os
  import threading
  import time

  parent_process = multiprocessing.parent_process()
  if parent_process is None:
    return
  # The pid the parent had, not os.getppid() now: the parent may already be gone at this import.
  parent = parent_process.pid

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(1)

  threading.Thread(target=watch, name="lego-jax-exit-with-parent", daemon=True).start()


exit_with_parent()


def ensure_flags_parsed() -> None:
  """Grain reads absl flags; outside an absl app (tests, notebooks) mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class ZippedSource:
  """Record i of `base` plus "index": i and, for each extra source, name: extra[i].

  Extra sources are random-access sources aligned with `base` by index (e.g. the VLLM features
  a later stage writes in the order of the split); their records are passed through as they
  are, to be decoded by an operation of that stage."""

  def __init__(self, base, extras: Mapping[str, Any] | None = None):
    self.base = base
    self.extras = dict(extras or {})
    for name, src in self.extras.items():
      if len(src) != len(base):
        raise ValueError(f"extra source {name!r} has {len(src)} records, the split has "
                         f"{len(base)}: they must align by index")

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, i: int) -> dict:
    record = dict(self.base[i])
    record["index"] = i
    for name, src in self.extras.items():
      record[name] = src[i]
    return record

  def __repr__(self) -> str:  # part of Grain's checkpointed state: keep it stable
    return f"ZippedSource({self.base!r}, extras={sorted(self.extras)})"


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


@dataclasses.dataclass(frozen=True)
class DecodePair(grain.transforms.Map):
  frames: bool = True  # False: no view of the frames is wanted (e.g. cached latents stand in)

  def map(self, r: dict) -> dict:
    out = {k: r[k] for k in r if k not in records.PAIR_BYTES and k not in records.PAIR_STRINGS
           and k not in records.PAIR_INTS}
    for k in records.PAIR_STRINGS:
      out[k] = _text(r[k])
    out["height"], out["width"] = np.int32(r["height"]), np.int32(r["width"])
    out["index"] = np.int32(r["index"])
    if not self.frames:
      return out
    # Frames stay PIL images until ToArrays: each numpy round trip would copy them.
    out["input"] = images.decode_rgb_image(r["input_jpeg"])
    out["target"] = images.decode_rgb_image(r["target_jpeg"])
    out["has_mask"] = np.bool_(len(r["mask_png"]) > 0)
    out["mask"] = (images.decode_mask_image(r["mask_png"]) if out["has_mask"]
                   else Image.new("L", out["input"].size, 0))
    return out


@dataclasses.dataclass(frozen=True)
class ResizePair(grain.transforms.Map):
  image_size: int | None      # None: no LDM view
  vllm_image_size: int | None  # None: no CLIP view

  def map(self, r: dict) -> dict:
    if self.vllm_image_size:
      r["clip_input"] = images.clip_view(r["input"], self.vllm_image_size)
    if self.image_size:
      r["input"] = images.squash_image(r["input"], self.image_size)
      r["target"] = images.squash_image(r["target"], self.image_size)
      r["mask"] = images.squash_image(r["mask"], self.image_size, Image.Resampling.NEAREST)
    else:
      for k in ("input", "target", "mask"):
        r.pop(k, None)
    return r


@dataclasses.dataclass(frozen=True)
class JointFlip(grain.transforms.RandomMap):
  """Horizontal flip of input, target and mask together with probability `prob`."""
  prob: float

  def random_map(self, r: dict, rng: np.random.Generator) -> dict:
    flip = bool(rng.random() < self.prob) if self.prob > 0 else False
    r["flipped"] = np.bool_(flip)
    if flip:
      for k in ("input", "target", "mask"):
        if k in r:
          r[k] = r[k].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return r


class ToArrays(grain.transforms.Map):
  def map(self, r: dict) -> dict:
    if "input" in r:
      r["input"] = np.asarray(r["input"])
      r["target"] = np.asarray(r["target"])
      r["mask"] = np.asarray(r["mask"])[..., None] > 127
    return r


@dataclasses.dataclass(frozen=True)
class DecodeInstruct(grain.transforms.Map):
  vllm_image_size: int

  def map(self, r: dict) -> dict:
    out = {k: r[k] for k in r if k not in records.INSTRUCT_BYTES
           and k not in records.INSTRUCT_STRINGS}
    for k in records.INSTRUCT_STRINGS:
      out[k] = _text(r[k])
    out["index"] = np.int32(r["index"])
    out["clip_image"] = images.clip_view(images.decode_rgb_image(r["image_jpeg"]),
                                         self.vllm_image_size)
    return out


def host_shard_options() -> grain.sharding.ShardOptions:
  """This host's share of every epoch: one shard per JAX process."""
  return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                     shard_count=jax.process_count(), drop_remainder=True)


def _own_shared_memory(batch):
  """Unlinks the shared-memory blocks a worker handed `batch` over in (see module doc): the name
  goes (and with it the resource tracker's record), the mapping stays until the arrays are freed.
  Grain would unlink them on a thread when the arrays are collected, which an exiting process
  does not wait for."""
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

  for leaf in jax.tree.leaves(batch):
    if isinstance(leaf, SharedMemoryArray) and leaf._unlink_on_del:  # noqa: SLF001
      leaf._unlink_on_del = False  # noqa: SLF001  (Grain's __del__ then only unmaps it)
      leaf.shm.unlink()
  return batch


def _finish_unlinks() -> None:
  """Waits until Grain has unlinked the shared memory of the batches a closed iterator dropped.

  Batches the workers had finished but nobody read (an evaluation left after its first batch:
  the whole epoch is already in Grain's interleave buffers, opened) are dropped on close, but
  they sit in reference cycles, and Grain unlinks their blocks on its deletion thread pool,
  which an exiting process does not wait for: without this the resource tracker reported them
  as leaked. So: collect the cycles, then hold every pool thread at one barrier, which each
  reaches only after the deletions queued before it have run."""
  import gc

  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

  pool = SharedMemoryArray._del_thread_pool  # noqa: SLF001  (None: no worker ever ran here)
  if pool is None:
    return
  gc.collect()
  n = pool._processes  # noqa: SLF001  (ThreadPool's thread count)
  barrier = threading.Barrier(n)
  waits = [pool.apply_async(barrier.wait, (60.0,)) for _ in range(n)]
  for w in waits:
    w.wait(120.0)


class BatchIterator:
  """A Grain DataLoader iterator (get_state / set_state resume it) whose batches own no shared
  memory name, and which stops its worker processes on `close()`, at the end of a `with` block,
  or when exhausted, emptying their queues (Grain would leave them to the garbage collector)."""

  def __init__(self, iterator):
    self._iterator = iterator
    _LIVE.add(self)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self):
    if self._iterator is None:
      raise ValueError("this data iterator is closed")
    try:
      return _own_shared_memory(next(self._iterator))
    except StopIteration:
      self.close()
      raise

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state) -> None:
    self._iterator.set_state(state)

  def close(self) -> None:
    inner = getattr(self._iterator, "_iterator", None)  # the DataLoaderIterator's dataset iterator
    if inner is not None and hasattr(inner, "close"):
      inner.close()
      _finish_unlinks()
    # Dropped now, not at interpreter teardown, where Grain's __del__ finds its modules gone and
    # prints a traceback.
    self._iterator = None

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False


_LIVE: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  # An iterator still open at exit (held by a caller to the end) is closed before
  # multiprocessing's own exit handler (registered earlier, so run later) ends the workers with
  # their queues full.
  for it in list(_LIVE):
    it.close()
  # And batches a closed iterator's threads dropped only after its close() had waited.
  _finish_unlinks()


class DataLoader(grain.DataLoader):
  """grain.DataLoader whose iterators are BatchIterators."""

  def __iter__(self) -> BatchIterator:
    return BatchIterator(super().__iter__())


def close_iterator(iterator) -> None:
  """Stops the workers of a loader iterator (a BatchIterator, or one that holds several in
  `.iterators`, as distributed.ShardedIterator does); anything else is left as it is."""
  for it in getattr(iterator, "iterators", None) or [iterator]:
    if hasattr(it, "close"):
      it.close()


def make_loader(source, operations: Sequence, *, batch_size: int, seed: int, shuffle: bool,
                num_epochs: int | None, shard_options: grain.sharding.ShardOptions | None = None,
                worker_count: int = 0, drop_remainder: bool = True,
                read_threads: int = 2) -> DataLoader:
  """The common DataLoader: sampler (shuffle, epochs, host shard) + operations + Batch."""
  ensure_flags_parsed()
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1")
  shard_options = shard_options or host_shard_options()
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=shuffle,
      num_epochs=num_epochs, seed=int(seed) % (2**32))
  ops = list(operations) + [grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)]
  return DataLoader(
      data_source=source, sampler=sampler, operations=ops, worker_count=worker_count,
      shard_options=shard_options,
      read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))


def pair_loader(records_dir: str | Path, split: str, *, batch_size: int, image_size: int | None,
                vllm_image_size: int | None, hflip_prob: float = 0.0, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None,
                shard_options: grain.sharding.ShardOptions | None = None, worker_count: int = 0,
                drop_remainder: bool = True, extra_sources: Mapping[str, Any] | None = None,
                extra_operations: Sequence = ()) -> grain.DataLoader:
  """Batches of action-frame pairs (see module doc). `extra_operations` run after the
  standard ones, before batching (e.g. decoding zipped `extra_sources`)."""
  source = ZippedSource(records.open_split(records_dir, split, records.PAIRS), extra_sources)
  ops = [DecodePair(frames=bool(image_size or vllm_image_size)),
         ResizePair(image_size, vllm_image_size)]
  if image_size:
    ops += [JointFlip(hflip_prob), ToArrays()]
  elif hflip_prob > 0:  # the coin alone: a later operation (the LDM's latent cache) applies it
    ops += [JointFlip(hflip_prob)]
  return make_loader(source, ops + list(extra_operations), batch_size=batch_size, seed=seed,
                     shuffle=shuffle, num_epochs=num_epochs, shard_options=shard_options,
                     worker_count=worker_count, drop_remainder=drop_remainder)


def instruct_loader(records_dir: str | Path, split: str, *, batch_size: int,
                    vllm_image_size: int, seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = None,
                    shard_options: grain.sharding.ShardOptions | None = None,
                    worker_count: int = 0, drop_remainder: bool = True,
                    extra_operations: Sequence = ()) -> grain.DataLoader:
  """Batches of instruction records: clip_image, prompt, answer, id, index."""
  source = ZippedSource(records.open_split(records_dir, split, records.INSTRUCT))
  ops = [DecodeInstruct(vllm_image_size)] + list(extra_operations)
  return make_loader(source, ops, batch_size=batch_size, seed=seed, shuffle=shuffle,
                     num_epochs=num_epochs, shard_options=shard_options,
                     worker_count=worker_count, drop_remainder=drop_remainder)


def records_dir_of(data_cfg, workdir: str | Path) -> Path:
  return Path(data_cfg.records_dir) if data_cfg.records_dir else Path(workdir) / "records"


def train_pairs(cfg, workdir: str | Path, batch_size: int, *, split: str = "train",
                views: Sequence[str] = ("ldm", "clip"), **kwargs) -> grain.DataLoader:
  """The training pipeline from a config: shuffled, endless, flipped with cfg.data.hflip_prob,
  cfg.data.num_workers worker processes, seeded by cfg.seed. `batch_size` is per host."""
  d = cfg.data
  return pair_loader(
      records_dir_of(d, workdir), split, batch_size=batch_size,
      image_size=d.image_size if "ldm" in views else None,
      vllm_image_size=d.vllm_image_size if "clip" in views else None,
      hflip_prob=d.hflip_prob, seed=cfg.seed, shuffle=True, num_epochs=None,
      worker_count=d.num_workers, drop_remainder=True, **kwargs)


def eval_pairs(cfg, workdir: str | Path, batch_size: int, *, split: str = "test",
               views: Sequence[str] = ("ldm", "clip"), **kwargs) -> grain.DataLoader:
  """One ordered pass, no flips, nothing dropped (every example once). With worker processes
  each worker batches its own share of the split, so up to num_workers batches come out short
  and batches interleave; `index` says which example each row is."""
  d = cfg.data
  return pair_loader(
      records_dir_of(d, workdir), split, batch_size=batch_size,
      image_size=d.image_size if "ldm" in views else None,
      vllm_image_size=d.vllm_image_size if "clip" in views else None,
      hflip_prob=0.0, seed=cfg.seed, shuffle=False, num_epochs=1,
      worker_count=d.num_workers, drop_remainder=False, **kwargs)


def is_numeric(x) -> bool:
  return isinstance(x, np.ndarray) and x.dtype.kind in "biuf"


def to_global(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict:
  """A host's batch -> global jax.Arrays split over the mesh's batch axes (logical "batch");
  strings stay host-local numpy arrays. Every host passes its own equally sized batch."""
  from lego_jax.parallel.sharding import named_sharding

  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if is_numeric(v):
      sharding = named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1))
      out[k] = jax.make_array_from_process_local_data(sharding, v)
    else:
      out[k] = v
  return out
