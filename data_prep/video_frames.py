"""Exact frames out of long videos, by seeking (PyAV): the low level of `data_prep.videos`.

A LEGO pair needs two frames of a video that can be an hour long; decoding the whole video for
them costs ~1000x more than needed. `VideoReader.read(indices)` seeks to the keyframe at or before
each wanted frame and decodes forward only to it; wanted frames closer together than one GOP are
reached by decoding on instead of seeking again.

Frame numbering. Frame i is the i-th frame of the video stream in display order (0-based), i.e.
the frame whose presentation time is `start + i / fps`, with `start` the timestamp of the first
frame the decoder gives and `fps` the stream's average frame rate:
index = round((pts - start) * time_base * fps), computed in exact fractions. That is the
numbering of `ffmpeg -i v.mp4 %d.jpg` (minus one) and of the Ego4D and EPIC-KITCHENS annotations,
whose videos are constant frame rate. `start` is not the container's start_time: MPEG-4 part 2
with B-frames in AVI stamps its first frame 1 while start_time says 0, which would make every
frame one late. A time t (seconds from the first frame) is the frame index round(t * fps). If a
video skips a frame (variable rate, damage), the first frame at or after the wanted index is
taken when it is at most `frame_tolerance` frames later; such frames are counted as inexact.

`PairSpec` / `Position` describe one wanted (input, target) pair independently of the dataset,
so the Ego4D and EPIC converters only differ in how they read annotations.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import deque
from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Position:
  """A frame of a video as an annotation gives it: a frame index or a time, plus an offset.

  Exactly one of `frame` (0-based index) and `sec` (seconds from the first frame; a Fraction
  where the annotation is exact, e.g. EPIC frame numbers at a fixed rate) is set; the index is
  only known once the video's frame rate is, so it is resolved in the worker.
  """
  frame: int | None = None
  sec: float | Fraction | None = None
  offset_sec: float = 0.0

  def __post_init__(self):
    if (self.frame is None) == (self.sec is None):
      raise ValueError(f"Position needs exactly one of frame / sec, got {self}")

  def index(self, fps: Fraction) -> int:
    base = self.frame if self.frame is not None else round(Fraction(self.sec) * fps)
    index = int(base + round(Fraction(self.offset_sec) * fps))
    # An offset never moves a valid position before the first frame: the earliest context is it.
    return max(0, index) if base >= 0 else index


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """One LEGO example to cut out of a video: input frame, target (action) frame and its text.

  `clip_id`/`action_id` become the record id "clip/action" and the LEGO JSON keys; `video_id`
  names the video file (its stem). `meta` is JSON-serialisable, copied into the record's meta.
  """
  clip_id: str
  action_id: str
  video_id: str
  input: Position
  target: Position
  raw_action: str
  action: str
  description: str = ""
  meta: tuple[tuple[str, object], ...] = ()

  @property
  def id(self) -> str:
    return f"{self.clip_id}/{self.action_id}"


class VideoOpenError(Exception):
  """The file is not a readable video (missing moov atom, garbage bytes, no video stream)."""


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) with the short side `short_side` and the long side rounded to an even number.

  Even like ffmpeg's `scale=-2:256`, which is how the EPIC release got 456x256 from 1920x1080.
  `short_side <= 0` keeps the native size.
  """
  if short_side <= 0:
    return width, height
  if width >= height:
    return max(2, 2 * round(width * short_side / height / 2)), short_side
  return short_side, max(2, 2 * round(height * short_side / width / 2))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def thumbnail(rgb: np.ndarray, size: int = 32) -> np.ndarray:
  """(size, size) float32 grayscale in [0, 255]: the cheap view the similarity filters compare."""
  img = Image.fromarray(rgb).convert("L").resize((size, size), Image.Resampling.BOX)
  return np.asarray(img, dtype=np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
  """Normalised cross-correlation of two thumbnails, in [-1, 1].

  Invariant to global brightness/contrast, so lighting flicker does not look like motion and a
  scene cut looks unrelated. Two (nearly) flat images have no correlation to speak of; for them
  it falls back to 1 - mean absolute difference / 255.
  """
  a = a.astype(np.float64).ravel()
  b = b.astype(np.float64).ravel()
  da, db = a - a.mean(), b - b.mean()
  na, nb = float(np.sqrt(da @ da)), float(np.sqrt(db @ db))
  if na < 1e-3 * a.size or nb < 1e-3 * b.size:  # std below ~0.001 gray levels
    return 1.0 - float(np.abs(a - b).mean()) / 255.0
  return float(da @ db) / (na * nb)


class VideoReader:
  """Seek-based exact-frame reader for one video file.

  Args:
    path: the video file.
    threads: decoder threads. 1 in a process pool (one process per core is faster than frame
      threads, which also delay every seek by `threads` frames).
    skip_nonref: let the decoder drop non-reference frames (most B-frames) that lie before the
      next wanted frame: nothing depends on them, and it saves ~1/3 of the decoding.
    frame_tolerance: how many frames later than wanted a substitute frame may be (see module doc).
  """

  def __init__(self, path: str, *, threads: int = 1, skip_nonref: bool = True,
               frame_tolerance: int = 2):
    try:
      self._container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
      raise VideoOpenError(f"{path}: {e}") from e
    if not self._container.streams.video:
      self._container.close()
      raise VideoOpenError(f"{path}: no video stream")
    self._stream = self._container.streams.video[0]
    ctx = self._stream.codec_context
    ctx.thread_count = max(1, threads)
    ctx.thread_type = "FRAME" if threads > 1 else "SLICE"
    rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
    if not rate or self._stream.time_base is None:
      self._container.close()
      raise VideoOpenError(f"{path}: stream has no frame rate / time base")
    self.fps = Fraction(rate)
    self._time_base = Fraction(self._stream.time_base)
    self._start = self._first_pts(path)
    self.width = ctx.width
    self.height = ctx.height
    self.num_frames = self._stream.frames or None   # container's count; may be absent or wrong
    self._skip_nonref = skip_nonref
    self._frame_tolerance = frame_tolerance
    # Seek when the next wanted frame is further ahead than one GOP; learnt from keyframes seen.
    self._gop = max(1, int(2 * self.fps))
    self._gop_learnt = False
    # Counters for the benchmark and the report.
    self.decoded_frames = 0
    self.seeks = 0
    self.inexact = 0
    # Filled by read(): wanted index -> why it was not delivered.
    self.missing: dict[int, str] = {}

  def close(self):
    self._container.close()

  def _first_pts(self, path) -> int:
    """The timestamp of the first frame the decoder gives: frame 0 (see the module doc)."""
    start = self._stream.start_time
    try:
      for frame in self._container.decode(self._stream):
        if frame.pts is not None:
          # A frame before the stream's start is pre-roll an edit list hides (when the decoder
          # does not drop it itself): frame 0 is then still the one at the start.
          return frame.pts if start is None else max(start, frame.pts)
    except av.error.FFmpegError as e:
      self._container.close()
      raise VideoOpenError(f"{path}: its first frame does not decode: {e}") from e
    self._container.close()
    raise VideoOpenError(f"{path}: no decodable frame")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def index_of_pts(self, pts: int) -> int:
    return round((pts - self._start) * self._time_base * self.fps)

  def _pts_of_index(self, index: int) -> int:
    return self._start + math.floor(Fraction(index) / (self.fps * self._time_base))

  def _decode_from(self, seek_index: int, pending: deque) -> Iterator[tuple[int, av.VideoFrame]]:
    """Seek to the keyframe at or before `seek_index`, then yield (index, frame) in display order.

    Reads `pending` (sorted wanted indices, consumed by the caller) to decide per packet whether
    the decoder may drop a non-reference frame.
    """
    self.seeks += 1
    pts = 0 if seek_index <= 0 else self._pts_of_index(seek_index)
    self._container.seek(pts, backward=True, any_frame=False, stream=self._stream)
    ctx = self._stream.codec_context
    last_key = None
    for packet in self._container.demux(self._stream):
      if self._skip_nonref:
        # Only frames strictly before the next wanted one may be dropped: the first frame at or
        # after it must be seen, whatever its type.
        before = (packet.pts is not None and bool(pending)
                  and self.index_of_pts(packet.pts) < pending[0])
        ctx.skip_frame = "NONREF" if before else "DEFAULT"
      for frame in ctx.decode(packet):
        if frame.pts is None:
          continue
        self.decoded_frames += 1
        index = self.index_of_pts(frame.pts)
        if frame.key_frame:
          if last_key is not None and index > last_key:
            spacing = index - last_key
            self._gop = max(self._gop, spacing) if self._gop_learnt else spacing
            self._gop_learnt = True
          last_key = index
        yield index, frame

  def _frames_from(self, target: int, pending: deque) -> Iterator[tuple[int, av.VideoFrame]]:
    """Frames in display order from a keyframe at or before `target` (re-seeking further back
    when the container's index lands after it, e.g. open GOPs)."""
    seek_index, backoff = target, self._gop
    while True:
      frames = self._decode_from(seek_index, pending)
      first = next(frames, None)
      if first is None:
        return
      if first[0] > target and seek_index > 0:
        seek_index, backoff = max(0, seek_index - backoff), 2 * backoff
        continue
      yield first
      yield from frames
      return

  def read(self, indices: Sequence[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (index, frame) for each distinct wanted index that exists, in increasing order.

    Indices not delivered end up in `self.missing` with a reason: "before_start" (negative),
    "past_end" (the video ends before it), "not_found" (the video skips it by more than
    `frame_tolerance` frames). A decoding error propagates as av.error.FFmpegError; the frames
    yielded before it are good.
    """
    self.missing = {}
    pending = deque(sorted(set(int(i) for i in indices)))
    while pending and pending[0] < 0:
      self.missing[pending.popleft()] = "before_start"
    frames, position = None, None   # the running decode, and the index it last produced
    sought = None                    # the wanted index the running decode was started for
    while pending:
      target = pending[0]
      far = position is None or target - position > self._gop
      if frames is None or (target != sought and far):
        frames, position, sought = self._frames_from(target, pending), None, target
      for index, frame in frames:
        position = index
        while pending and pending[0] < index - self._frame_tolerance:
          self.missing[pending.popleft()] = "not_found"
        if pending and pending[0] <= index:
          wanted = pending.popleft()
          if wanted != index:
            self.inexact += 1
          yield wanted, frame
          while pending and pending[0] <= index:  # more wanted frames the video skipped
            self.missing[pending.popleft()] = "not_found"
        if not pending:
          return
        if pending[0] != sought and pending[0] - index > self._gop:
          break   # cheaper to seek than to decode on (never twice for the same frame)
      else:
        for i in pending:   # the stream ended before them
          self.missing[i] = "past_end"
        return
