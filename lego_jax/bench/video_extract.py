"""Frames extracted per second per core by data_prep.videos, and what that means for LEGO.

    python -m lego_jax.bench.video_extract [--height=720] [--seconds=30] [--gop=60] [--rounds=10]
    python -m lego_jax.bench.video_extract --video=/data/ego4d/v1/full_scale/<uid>.mp4

Makes a synthetic H.264 video (a panning textured scene, 30 fps, B-frames, keyframe every
--gop frames; or takes --video), draws random (input, target) pairs 0.5-2 s apart like Ego4D's
pre-condition -> PNR frames, as sparse as in the annotations (--pairs_per_minute, ~1 per 5 s),
and runs the real per-video worker on them in this process, --rounds times: seek, decode to the
exact frame, resize to short side 256, JPEG-encode. Per-core throughput is
extracted frames / CPU seconds of this process, so other load on the machine mostly inflates
wall time, not the number (the load average is printed). The same pairs are also extracted
without non-reference-frame skipping, and by decoding the whole video (the naive baseline).
The estimate: LEGO's ~147K pairs (85K Ego4D + 62K EPIC) x 2 frames on a 32-core host, one
worker per core. Real Ego4D/EPIC videos are mostly 1080p (about (1080/720)^2 = 2.25x the
decoding work of 720p): measure --height=1080 or a real --video for a closer figure.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from absl import app, flags

from data_prep import videos
from data_prep.video_frames import PairSpec, Position, VideoReader, encode_jpeg, resized_size

LEGO_PAIRS = 85_000 + 62_000
HOST_CORES = 32


def make_video(path: Path, *, height: int, seconds: float, fps: int, gop: int) -> Path:
  """A panning textured scene with a moving object: compresses like footage (unlike noise),
  and every frame differs. Frames are views into one wide image, so making them costs little."""

  width = 2 * round(height * 16 / 9 / 2)
  count = int(seconds * fps)
  rng = np.random.default_rng(0)
  blobs = rng.integers(0, 256, (height // 8 + 1, (width + 2 * count) // 8 + 1, 3), np.uint8)
  world = np.repeat(np.repeat(blobs, 8, axis=0), 8, axis=1)[:height]   # texture at 8 px scale
  world = (world // 2 + np.linspace(0, 120, world.shape[1], dtype=np.uint8)[None, :, None])
  container = av.open(str(path), "w")
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  stream = container.add_stream(codec, rate=fps)
  stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
  stream.codec_context.gop_size = gop
  stream.options = ({"preset": "superfast", "crf": "23", "bf": "3", "sc_threshold": "0"}
                    if codec == "libx264" else {"bf": "2"})
  side = height // 4
  for i in range(count):
    img = np.ascontiguousarray(world[:, 2 * i:2 * i + width])      # pan 2 px per frame
    y = int((height - side) * (0.5 + 0.4 * np.sin(i / 25.0)))
    x = int((width - side) * (0.5 + 0.4 * np.cos(i / 31.0)))
    img[y:y + side, x:x + side] = (200, 160, 120)                     # a moving "hand"
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def random_pairs(num_frames: int, fps: float, count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  pairs = []
  for k in range(count):
    gap = int(rng.uniform(0.5, 2.0) * fps)
    first = int(rng.integers(0, max(1, num_frames - gap - 1)))
    pairs.append(PairSpec(clip_id="bench", action_id=f"{k:05d}", video_id="bench",
                          input=Position(frame=first), target=Position(frame=first + gap),
                          raw_action="bench", action="bench"))
  return tuple(sorted(pairs, key=lambda p: p.id))


def run_worker(video: Path, pairs, out: Path, **options) -> dict:
  job = videos.VideoJob("bench", f"bench_{len(list(out.iterdir()))}", str(video), pairs)
  (out / "bench").mkdir(exist_ok=True)
  marker = videos.process_video(job, videos.ExtractOptions(**options), str(out), None)
  if marker.get("error") or marker["outcomes"].get("written") != len(pairs):
    raise RuntimeError(f"benchmark extraction failed: {marker['outcomes']} {marker['error']}")
  return marker


def decode_everything(video: Path, wanted: set[int]) -> tuple[float, float, int, int]:
  """The naive way: decode every frame, keep the wanted ones.
  -> (wall s, cpu s, decoded frames, wanted frames)."""


  wall, cpu = time.perf_counter(), time.process_time()
  n = 0
  with av.open(str(video)) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    for i, frame in enumerate(container.decode(stream)):
      n += 1
      if i in wanted:
        w, h = resized_size(frame.width, frame.height, 256)
        encode_jpeg(frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA",
                                     threads=1))
  return time.perf_counter() - wall, time.process_time() - cpu, n, len(wanted)


def main(argv) -> None:
  del argv


  FLAGS = flags.FLAGS
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="lego_bench_video_") as tmp:
    tmp = Path(tmp)
    if FLAGS.video:
      video = Path(FLAGS.video)
    else:
      t = time.perf_counter()
      video = make_video(tmp / "bench.mp4", height=FLAGS.height, seconds=FLAGS.seconds,
                         fps=FLAGS.fps, gop=FLAGS.gop)
      print(f"made {video.name}: {FLAGS.height}p, {FLAGS.seconds:g} s at {FLAGS.fps} fps, "
            f"GOP {FLAGS.gop}, {video.stat().st_size / 1e6:.1f} MB in "
            f"{time.perf_counter() - t:.1f} s")
    with VideoReader(str(video)) as reader:
      fps, size = float(reader.fps), (reader.width, reader.height)
      num_frames = reader.num_frames or int(FLAGS.seconds * fps)
    with av.open(str(video)) as container:
      codec = container.streams.video[0].codec_context.name
    per_round = max(1, round(FLAGS.pairs_per_minute * num_frames / fps / 60))
    out = tmp / "work"
    out.mkdir()
    run_worker(video, random_pairs(num_frames, fps, 2, seed=999), out)  # warm-up

    # Each round is one "video" with pairs at the annotations' density: as sparse as in
    # Ego4D/EPIC, so nearly every frame costs a seek (dense pairs would flatter the number).
    results = {}
    for name, skip in (("seek + skip non-ref", True), ("seek", False)):
      totals = np.zeros(5)
      for r in range(FLAGS.rounds):
        m = run_worker(video, random_pairs(num_frames, fps, per_round, seed=r), out,
                       skip_nonref=skip)
        totals += (m["wall_sec"], m["cpu_sec"], m["extracted_frames"], m["decoded_frames"],
                   m["seeks"])
      results[name] = totals
    naive = decode_everything(video, {p.input.frame for p in random_pairs(
        num_frames, fps, per_round, seed=0)} | {p.target.frame for p in random_pairs(
            num_frames, fps, per_round, seed=0)})
    load_after = os.getloadavg()

  print(f"video: {size[0]}x{size[1]} {codec} {fps:g} fps, {num_frames} frames; "
        f"{FLAGS.rounds} rounds of {per_round} pairs ({FLAGS.pairs_per_minute:g} per minute)")
  print(f"{'method':22s} {'wall s':>7s} {'cpu s':>7s} {'frames/s/core':>14s} "
        f"{'decoded/frame':>14s} {'seeks':>6s}")
  for name, (wall, cpu, extracted, decoded, seeks) in results.items():
    print(f"{name:22s} {wall:7.2f} {cpu:7.2f} {extracted / cpu:14.1f} "
          f"{decoded / extracted:14.1f} {int(seeks):6d}")
  wall, cpu, decoded, wanted = naive
  print(f"{'decode whole video':22s} {wall:7.2f} {cpu:7.2f} {wanted / cpu:14.1f} "
        f"{decoded / wanted:14.1f} {'-':>6s}   (one round)")
  wall, cpu, extracted, _, _ = results["seek + skip non-ref"]
  per_core = extracted / cpu
  frames = 2 * LEGO_PAIRS
  hours = frames / (per_core * HOST_CORES) / 3600
  print(f"\nper core: {per_core:.1f} frames/s seek-based, {per_core / (wanted / naive[1]):.1f}x "
        "decoding whole videos at this pair density")
  print(f"LEGO: {LEGO_PAIRS:,} pairs x 2 = {frames:,} frames on a {HOST_CORES}-core host, one "
        f"worker per core: ~{hours * 60:.0f} min ({hours:.2f} h) at this resolution and GOP, "
        "plus reading the videos from disk")
  print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on "
        f"{os.cpu_count()} cores (other processes share this machine; CPU time, not wall "
        "time, is the measure)")


if __name__ == "__main__":
  flags.DEFINE_string("video", None, "benchmark this video file instead of a synthetic one")
  flags.DEFINE_integer("height", 720, "synthetic video height (16:9)")
  flags.DEFINE_float("seconds", 30.0, "synthetic video length")
  flags.DEFINE_integer("fps", 30, "synthetic video frame rate")
  flags.DEFINE_integer("gop", 60, "synthetic video keyframe interval (frames)")
  flags.DEFINE_float("pairs_per_minute", 12.0, "pair density (Ego4D FHO and EPIC: ~1 per 5 s)")
  flags.DEFINE_integer("rounds", 10, "videos' worth of random pairs to extract")
  app.run(main)
