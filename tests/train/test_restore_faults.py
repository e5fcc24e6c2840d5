"""Damaged checkpoints and resumed histories: restore falls back to the newest intact checkpoint
(a deleted or truncated array file, a corrupt data item), says which and why, and deletes nothing;
a checkpoint of other model shapes is a config mismatch, told apart from damage; a resumed run's
metrics.jsonl holds each step once; resuming with another data.num_workers is one clear error."""

import json
from pathlib import Path

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax.train import checkpoint as ckpt_lib
from lego_jax.train import common, loop


def _state(scale: float = 1.0, width: int = 100):
  return {"params": {"w": jnp.arange(200.0 * width).reshape(200, width) * scale,
                     "b": jnp.ones(3) * scale},
          "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32)}


def _array_files(step_dir: Path) -> list[Path]:
  return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
                key=lambda p: p.stat().st_size)


def _save_steps(directory: Path, steps) -> None:
  with ckpt_lib.Checkpointer(directory, keep=10) as ckpt:
    for s in steps:
      ckpt.save(s, _state(scale=s), {"position": s}, {"seed": 0}, force=True)


def _files(directory: Path) -> set[str]:
  return {str(p.relative_to(directory.parent)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated array file", "deleted array file",
                                    "deleted array metadata", "corrupt data item"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys, damage):
  directory = tmp_path / "ck"
  _save_steps(directory, (1, 2, 3))
  latest = directory / "3"
  if damage == "truncated array file":
    with open(_array_files(latest)[-1], "r+b") as f:
      f.truncate(100)
  elif damage == "deleted array file":
    _array_files(latest)[-1].unlink()
  elif damage == "deleted array metadata":
    (latest / "state" / "manifest.ocdbt").unlink()
  else:
    (latest / "data" / "metadata").write_text('{"state": ')
  before = _files(directory)
  with ckpt_lib.Checkpointer(directory, keep=10) as ckpt:
    step, state, data = ckpt.restore(ckpt_lib.abstract_like(_state()))
    assert step == 2 and data == {"position": 2}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(_state(scale=2)["params"]["w"]))
    assert [s for s, _ in ckpt.damaged] == [3]
  err = capsys.readouterr().err
  assert f"checkpoint {directory}/3 is damaged (" in err
  assert f"restored checkpoint 2 in {directory}, the newest intact one (damaged, kept: 3)" in err
  assert _files(directory) == before  # restore deletes nothing


def test_every_checkpoint_damaged_is_one_error_naming_each(tmp_path):
  directory = tmp_path / "ck"
  _save_steps(directory, (1, 2))
  for s in (1, 2):
    for f in _array_files(directory / str(s)):
      f.unlink()
  with ckpt_lib.Checkpointer(directory) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointDamagedError) as e:
      ckpt.restore(ckpt_lib.abstract_like(_state()))
  msg = str(e.value)
  assert msg.startswith(f"every checkpoint in {directory} is damaged (2: ") and "; 1: " in msg
  assert "\n" not in msg


def test_other_model_shapes_are_a_config_mismatch_not_damage(tmp_path):
  directory = tmp_path / "ck"
  _save_steps(directory, (1, 2))
  with ckpt_lib.Checkpointer(directory) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
      ckpt.restore(ckpt_lib.abstract_like(_state(width=50)))
    # No fallback to an older checkpoint: it would not fit either.
    assert "checkpoint %s/2 does not fit the model of the current config (params/w: shape (200, 100) " \
        "in it, (200, 50) in the model)" % directory in str(e.value)
    renamed = {"params": {"kernel": jax.ShapeDtypeStruct((200, 100), jnp.float32),
                          "b": jax.ShapeDtypeStruct((3,), jnp.float32)},
               "step": jax.ShapeDtypeStruct((), jnp.int32),
               "nonfinite": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="arrays params/kernel not in it"):
      ckpt.restore(renamed)


# --- through the training loop --------------------------------------------------------------


class _Counter:
  """A loader whose iterator yields {"x": i} for i = 0, 1, ... and checkpoints its position."""

  def __iter__(self):
    return _CounterIterator()


class _CounterIterator:
  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return {"x": np.float32(self.i)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _step(state, batch, rng):
  new = dict(state, params={"w": state["params"]["w"] + batch["x"]}, step=state["step"] + 1)
  return new, {"loss": jnp.sum(new["params"]["w"])}


def _run(workdir: Path, num_steps: int, **kw):
  # Random (incompressible) values: Orbax stores arrays that compress small inside its index.
  state = {"params": {"w": jax.random.normal(jax.random.key(0), (128, 128))},
           "step": jnp.zeros((), jnp.int32),
           "nonfinite": jnp.zeros((), jnp.int32)}
  return loop.run(name="toy", workdir=workdir, config={}, state=state,
                  state_shardings=jax.tree.map(lambda x: x.sharding, state), step_fn=_step,
                  loader=_Counter(), batch_fn=lambda b: b, num_steps=num_steps, seed=0,
                  log_every=1, ckpt_every=1, keep=10, async_save=False, **kw)


def test_training_resumes_from_the_newest_intact_checkpoint_and_saves_past_the_damaged_one(tmp_path):
  _run(tmp_path, 6, stop_after=4)
  ckpts = tmp_path / "checkpoints" / "toy"
  _array_files(ckpts / "4")[-1].unlink()
  final = _run(tmp_path, 6)
  # Steps 4..6 redone from checkpoint 3 with the same data: the result equals a clean run's.
  clean = _run(tmp_path / "clean", 6)
  np.testing.assert_array_equal(np.asarray(final["params"]["w"]), np.asarray(clean["params"]["w"]))
  assert sorted(int(p.name) for p in ckpts.iterdir()) == [1, 2, 3, 4, 5, 6]
  assert (tmp_path / "checkpoints" / "toy.damaged" / "4" / "state").is_dir()  # kept, aside
  steps = [r["step"] for r in common.read_metrics(tmp_path / "logs" / "toy")]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_a_resumed_run_leaves_one_history_in_metrics_jsonl(tmp_path):
  _run(tmp_path, 8, stop_after=3)
  log = tmp_path / "logs" / "toy" / "metrics.jsonl"
  # What a run killed after logging steps 4 and 5 (and part of a line), but before their
  # checkpoints, leaves behind.
  with open(log, "a") as f:
    f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + json.dumps({"step": 5, "loss": -1.0})
            + "\n" + '{"step": 6, "lo')
  _run(tmp_path, 8)
  rows = common.read_metrics(tmp_path / "logs" / "toy")
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert all(r["loss"] > 0 for r in rows)
  assert not (log.parent / "metrics.jsonl.tmp").exists()
  # TensorBoard: the resumed run's event file opens with the purge marker (SessionLog START at
  # the first redone step), which makes TensorBoard drop the cut run's later points.
  events = sorted(log.parent.glob("events.out.tfevents.*"))
  assert [s for f in events for s in _session_starts(f)] == [4]


def _session_starts(path: Path) -> list[int]:
  from tensorboardX.proto import event_pb2

  data, out, i = path.read_bytes(), [], 0
  while i < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
    n = int.from_bytes(data[i:i + 8], "little")
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 16 + n
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      out.append(event.step)
  return out


def _grain_loader(workers: int):
  return grain.DataLoader(
      data_source=[np.float32(i) for i in range(64)],
      sampler=grain.IndexSampler(64, grain.NoSharding(), shuffle=False, num_epochs=1, seed=0),
      operations=[grain.Batch(1)], worker_count=workers)


def test_resuming_with_another_num_workers_is_one_clear_error(tmp_path):
  iterator = iter(_grain_loader(0))
  next(iterator)
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints" / "toy") as ckpt:
    ckpt.save(1, _state(), iterator.get_state(), {}, force=True)
  state = _state()
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    loop.run(name="toy", workdir=tmp_path, config={}, state=state,
             state_shardings=jax.tree.map(lambda x: x.sharding, state), step_fn=_step,
             loader=_grain_loader(2), batch_fn=lambda b: b, num_steps=2, seed=0)
  assert str(e.value) == (
      "checkpoint 1 of toy was written with data.num_workers=0, this run has 2: Grain cannot move "
      "a data position between worker counts; resume with --config.data.num_workers=0 (or a "
      "fresh --workdir)")
