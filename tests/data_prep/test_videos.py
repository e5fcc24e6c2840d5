"""Frame extraction from raw videos (data_prep.videos / video_frames / ego4d_fho / epic_kitchens).

The videos are made here with PyAV (H.264 via libx264 when the wheel has it, else MPEG-4; both
with B-frames and a short GOP, so seeking and frame reordering are exercised). Every frame
carries its own index as 8 black/white blocks across its top, which survive compression,
resizing and JPEG: a test reads the index back from an extracted JPEG, so "the right frame"
is checked, not assumed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_prep import ego4d_fho, epic_kitchens, videos
from data_prep.video_frames import (Position, VideoOpenError, VideoReader, resized_size,
                                    similarity, thumbnail)

W, H = 64, 48
H264 = "libx264" in av.codecs_available
CODEC = "libx264" if H264 else "mpeg4"
REPO = Path(__file__).resolve().parents[2]


def frame_image(index: int, scene: int = 0) -> np.ndarray:
  """(H, W, 3) uint8: a smooth colour texture (inverted in scene 1) under a strip of 8 blocks
  of 8x8 pixels, block b light iff bit b of `index` is set (mid contrast, so that the strip
  does not dominate the similarity of two frames)."""
  yy, xx = np.mgrid[0:H, 0:W]
  tex = 128 + 90 * np.sin(xx / 6.0 + yy / 9.0)
  if scene:
    tex = 255 - tex
  img = np.stack([tex, np.roll(tex, 7, axis=1), tex[::-1]], -1).astype(np.uint8)
  img[:8] = 70
  for b in range(8):
    if (index >> b) & 1:
      img[:8, b * 8:(b + 1) * 8] = 186
  return img


def read_index(jpeg_or_rgb) -> int:
  """The index a frame_image carries, read from an extracted frame of any size."""
  img = Image.open(io.BytesIO(jpeg_or_rgb)) if isinstance(jpeg_or_rgb, bytes) else \
      Image.fromarray(jpeg_or_rgb)
  a = np.asarray(img.convert("RGB").resize((W, H), Image.Resampling.BOX), np.float32).mean(-1)
  return sum(1 << b for b in range(8) if a[2:6, b * 8 + 2:b * 8 + 6].mean() > 128)


def write_video(path: Path, num_frames: int, *, fps: int | Fraction = 30, codec: str = CODEC,
                scene_cut: int | None = None, faststart: bool = False) -> Path:
  container = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
  stream = container.add_stream(codec, rate=fps)
  stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
  stream.codec_context.gop_size = 12
  if codec == "libx264":
    stream.options = {"crf": "12", "bf": "2", "sc_threshold": "0"}
  else:
    stream.options = {"bf": "2"}
    stream.codec_context.qscale = 2
  for i in range(num_frames):
    scene = int(scene_cut is not None and i >= scene_cut)
    frame = av.VideoFrame.from_ndarray(frame_image(i, scene), format="rgb24")
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def _action(uid, pre, pnr, text="#C C cuts the carrot", **kw):
  critical = None if pre is None else {"pre_45": 0, "pre_frame": pre, "pnr_frame": pnr,
                                       "post_frame": pnr + 1}
  clip_critical = None if pre is None else {"pre_frame": pre - 2, "pnr_frame": pnr - 2}
  return {"uid": uid, "narration_text": text, "is_valid_action": True, "is_rejected": False,
          "is_invalid_annotation": False, "critical_frames": critical,
          "clip_critical_frames": clip_critical, "structured_verb": "cut", **kw}


def _video(uid, intervals):
  return {"video_uid": uid, "video_metadata": {"fps": 30.0, "width": W, "height": H},
          "annotated_intervals": [{"clip_uid": clip, "narrated_actions": acts}
                                  for clip, acts in intervals]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  ego = root / "ego4d" / "full_scale"
  ego.mkdir(parents=True)
  write_video(ego / "vid_a.mp4", 96)
  write_video(ego / "vid_b.mp4", 96, scene_cut=60)
  write_video(ego / "vid_trunc.mp4", 96, faststart=True)
  data = (ego / "vid_trunc.mp4").read_bytes()
  (ego / "vid_trunc.mp4").write_bytes(data[:len(data) // 2])
  (ego / "vid_corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  fho = {"videos": [
      _video("vid_a", [("clip_a", [
          _action("a1", 5, 40), _action("a2", 41, 90, "#C C picks up the knife"),
          _action("a3", 60, 500), _action("a4", 7, 9, is_rejected=True),
          _action(None, None, None), _action("a6", 70, 70, "#C C holds the pan"),
          _action("a1", 5, 40)])]),
      _video("vid_b", [("clip_b", [_action("b1", 10, 30), _action("b2", 50, 75)])]),
      _video("vid_missing", [("clip_m", [_action("m1", 1, 2)])]),
      _video("vid_corrupt", [("clip_c", [_action("c1", 1, 2), _action("c2", 3, 4)])]),
      _video("vid_trunc", [("clip_t", [_action("t1", 2, 10), _action("t2", 80, 90)])]),
  ]}
  (root / "fho_main.json").write_text(json.dumps(fho))

  epic = root / "epic" / "P01" / "videos"
  epic.mkdir(parents=True)
  # Extension videos (PXX_1YY) are 50 fps and numbered at 50; MPEG-4, so both codecs and a
  # second time base are covered.
  write_video(epic / "P01_101.MP4", 150, fps=50, codec="mpeg4")
  write_video(epic / "P01_103.MP4", 60, fps=50, codec="mpeg4")
  rows = [
      # narration_id, video_id, start_ts, stop_ts, start_frame, stop_frame, narration
      ("P01_101_0", "P01_101", "00:00:00.20", "00:00:01.00", 11, 51, "open door"),
      ("P01_101_1", "P01_101", "00:00:02.00", "00:00:02.80", 101, 141, "take plate"),
      ("P01_101_2", "P01_101", "00:00:04.00", "00:00:06.00", 201, 301, "wash pan"),
      ("P01_101_3", "P01_101", "00:00:01.00", "00:00:00.50", 51, 26, "bad row"),
      ("P01_102_0", "P01_102", "00:00:00.10", "00:00:00.50", 6, 26, "close tap"),
      ("P01_103_0", "P01_103", "00:00:00.02", "00:00:00.62", 2, 32, "cut onion"),
  ]
  csv_path = root / "EPIC_100_train.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["narration_id", "participant_id", "video_id", "narration_timestamp",
                "start_timestamp", "stop_timestamp", "start_frame", "stop_frame", "narration",
                "verb", "verb_class", "noun", "noun_class", "all_nouns", "all_noun_classes"])
    for nid, vid, t0, t1, f0, f1, text in rows:
      w.writerow([nid, "P01", vid, t0, t0, t1, f0, f1, text, text.split()[0], 0,
                  text.split()[-1], 0, f"['{text.split()[-1]}']", "[0]"])
  return {"root": root, "ego_videos": root / "ego4d", "fho": root / "fho_main.json",
          "epic_videos": root / "epic", "epic_csv": csv_path}


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip_nonref", [True, False])
def test_reader_returns_exact_frames_by_seeking(data, skip_nonref):
  path = data["ego_videos"] / "full_scale" / "vid_a.mp4"
  wanted = [90, 3, 41, 40, 5, 95, 0, 70, 500, -1, 41]
  with VideoReader(str(path), skip_nonref=skip_nonref) as reader:
    assert reader.fps == 30 and (reader.width, reader.height) == (W, H)
    got = {i: read_index(f.to_ndarray(format="rgb24")) for i, f in reader.read(wanted)}
    assert got == {i: i for i in (0, 3, 5, 40, 41, 70, 90, 95)}
    assert reader.missing == {-1: "before_start", 500: "past_end"}
    assert reader.inexact == 0
    # Seeking, not decoding all 96 frames: GOPs of 12 around 0-5, 40-41, 70, 90-95, and the
    # last one for 500. Skipping non-reference frames decodes fewer still.
    assert reader.seeks == 5
    assert reader.decoded_frames <= (45 if skip_nonref else 60)


def test_mpeg4_with_b_frames_in_avi_counts_from_the_first_frame(tmp_path):
  """AVI stamps MPEG-4 part 2 B-frame streams' first frame 1 while start_time says 0: frame i
  must still be the i-th frame, not the (i-1)-th."""
  path = write_video(tmp_path / "b.avi", 40, fps=25, codec="mpeg4")
  with av.open(str(path)) as c:   # the case itself: the first frame is not at start_time
    first = next(c.decode(c.streams.video[0]))
    assert (c.streams.video[0].start_time, first.pts) == (0, 1)
  with VideoReader(str(path)) as reader:
    got = {i: read_index(f.to_ndarray(format="rgb24")) for i, f in reader.read([0, 1, 13, 39])}
    assert got == {0: 0, 1: 1, 13: 13, 39: 39} and reader.missing == {}


def test_edit_list_pre_roll_is_not_frame_0(data, tmp_path):
  """An MP4 cut at frame 30 by stream copy keeps the GOP from keyframe 24 as pre-roll before its
  edit list's start: frame 0 is the source's frame 30, not the first decodable one (24)."""
  with av.open(str(data["ego_videos"] / "full_scale" / "vid_a.mp4")) as inp, \
      av.open(str(tmp_path / "cut.mp4"), "w") as out:
    ist = inp.streams.video[0]
    ost = out.add_stream_from_template(ist)
    step, start = int(1 / (ist.average_rate * ist.time_base)), ist.start_time
    for pkt in inp.demux(ist):
      if pkt.dts is None or pkt.dts < start + 22 * step:   # from the GOP of keyframe 24 on
        continue
      pkt.pts, pkt.dts, pkt.stream = pkt.pts - start - 30 * step, pkt.dts - start - 30 * step, ost
      out.mux(pkt)
  with VideoReader(str(tmp_path / "cut.mp4")) as reader:
    got = {i: read_index(f.to_ndarray(format="rgb24")) for i, f in reader.read([0, 1, 20])}
  assert got == {0: 30, 1: 31, 20: 50}


def test_reader_rejects_files_that_are_not_videos(data):
  with pytest.raises(VideoOpenError):
    VideoReader(str(data["ego_videos"] / "full_scale" / "vid_corrupt.mp4"))


def test_sizes_positions_and_similarity():
  assert resized_size(1920, 1080, 256) == (456, 256)   # EPIC release frames: 456x256
  assert resized_size(1440, 1920, 256) == (256, 342)   # portrait: width is the short side
  assert resized_size(W, H, 0) == (W, H)
  fps = Fraction(60000, 1001)
  assert Position(frame=100).index(fps) == 100
  assert Position(sec=10.0).index(fps) == 599            # 10 s * 59.94 = 599.4
  assert Position(frame=100, offset_sec=-1.0).index(fps) == 40
  assert Position(frame=10, offset_sec=-1.0).index(fps) == 0   # clamped at the first frame
  a, b = thumbnail(frame_image(3)), thumbnail(frame_image(4))
  assert similarity(a, a) == pytest.approx(1.0)
  assert 0.5 < similarity(a, b) < 0.999
  assert similarity(a, thumbnail(frame_image(3, scene=1))) < 0.0
  flat = np.full((32, 32), 100.0, np.float32)
  assert similarity(flat, flat + 51) == pytest.approx(0.8)


def test_ego4d_annotations(data, tmp_path):
  pairs, skipped = ego4d_fho.load_pairs(data["fho"])
  by_id = {p.id: p for p in pairs}
  assert skipped == {"rejected": 1, "no_critical_frames": 1}
  a1 = by_id["clip_a/a1"]
  assert (a1.video_id, a1.input, a1.target) == ("vid_a", Position(frame=5), Position(frame=40))
  assert (a1.raw_action, a1.action) == ("#C C cuts the carrot", "cut the carrot")
  assert by_id["clip_a/a2"].action == "pick up the knife"
  assert [p.id for p in pairs].count("clip_a/a1") == 2   # duplicates are removed later

  clips, _ = ego4d_fho.load_pairs(data["fho"], videos="clips", ids=["clip_b"])
  assert [(p.id, p.video_id, p.input.frame, p.target.frame) for p in clips] == [
      ("clip_b/b1", "clip_b", 8, 28), ("clip_b/b2", "clip_b", 48, 73)]
  # The object form of other FHO files, and pre after pnr.
  alt = {"videos": [_video("v", [("c", [
      {**_action("x", 0, 0), "critical_frames": {"pre_frame": {"frame": 12, "clip_frame": 2},
                                                  "pnr_frame": {"frame_number": 20}}},
      _action("y", 9, 3)])])]}
  (tmp_path / "alt.json").write_text(json.dumps(alt))
  pairs, skipped = ego4d_fho.load_pairs(tmp_path / "alt.json")
  assert [(p.id, p.input.frame, p.target.frame) for p in pairs] == [("c/x", 12, 20)]
  assert skipped == {"input_after_target": 1}


def test_epic_annotations(data):
  fps = Fraction(50)
  frames, skipped = epic_kitchens.load_pairs(data["epic_csv"], input_offset_sec=0.1)
  times, _ = epic_kitchens.load_pairs(data["epic_csv"], positions="timestamps",
                                      input_offset_sec=0.1)
  assert skipped == {"bad_row": 1}
  for pairs in (frames, times):
    got = {p.id: (p.input.index(fps), p.target.index(fps)) for p in pairs}
    assert got == {"P01_101/P01_101_0": (5, 30), "P01_101/P01_101_1": (95, 120),
                   "P01_101/P01_101_2": (195, 250), "P01_102/P01_102_0": (0, 15),
                   "P01_103/P01_103_0": (0, 16)}
  assert frames[0].action == frames[0].raw_action == "open door"
  late, _ = epic_kitchens.load_pairs(data["epic_csv"], target_fraction=1.0)
  assert late[0].target.index(fps) == 50


# Rows of the published EPIC_100_validation.csv (EPIC-55 videos, fps from
# EPIC_100_video_info.csv) and EPIC_100_uda_target_val.csv (an extension video):
# (video fps, video_id, start_timestamp, stop_timestamp, start_frame, stop_frame).
PUBLISHED_ROWS = [
    (Fraction(60000, 1001), "P24_09", "00:32:44.72", "00:32:46.97", 117883, 118018),
    (Fraction(30000, 1001), "P18_02", "00:03:07.02", "00:03:08.28", 11221, 11296),
    (Fraction(48000, 1001), "P17_02", "00:08:54.65", "00:08:57.24", 32079, 32234),
    (Fraction(90), "P18_09", "00:04:31.36", "00:04:34.77", 16281, 16486),
    (Fraction(50), "P03_101", "00:06:40.50", "00:06:42.70", 20025, 20135),
]


def _write_epic_csv(path: Path, rows) -> Path:
  """rows: (narration_id, video_id, start_ts, stop_ts, start_frame, stop_frame, narration)."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["narration_id", "video_id", "start_timestamp", "stop_timestamp", "start_frame",
                "stop_frame", "narration"])
    w.writerows(rows)
  return path


def test_epic_frame_numbers_count_at_60_fps_for_epic55_and_50_for_the_extension(tmp_path):
  """The CSVs number EPIC-55 frames at 60 fps whatever the video's rate: frames and timestamps
  must land on the same video frame (within the timestamps' 0.01 s), not 2x / 1.25x apart."""
  rows = [(f"{vid}_0", vid, t0, t1, f0, f1, "x") for _, vid, t0, t1, f0, f1 in PUBLISHED_ROWS]
  path = _write_epic_csv(tmp_path / "rows.csv", rows + [("A_1_0", "A_1", "00:00:01.00",
                                                         "00:00:02.00", 61, 121, "odd id")])
  frames, skipped = epic_kitchens.load_pairs(path, target_fraction=0.0)
  times, _ = epic_kitchens.load_pairs(path, positions="timestamps", target_fraction=0.0)
  assert skipped == {"unknown_video_kind": 1}
  assert [epic_kitchens.annotation_fps(p.video_id) for p in frames] == [60, 60, 60, 60, 50]
  got = [(p.input.index(fps), t.input.index(fps))
         for (fps, *_), p, t in zip(PUBLISHED_ROWS, frames, times)]
  # (start_frame - 1) / 60 s at the video's rate: 117882 * 1000/1001, 11220 / 2 * 1000/1001, ...
  assert [f for f, _ in got] == [117764, 5604, 25637, 24420, 20024]
  assert all(abs(f - t) <= 2 for f, t in got), got
  assert dict(frames[0].meta)["annotation_fps"] == 60


def test_epic55_video_at_29_97_fps_extracts_the_annotated_frame(tmp_path):
  """End to end: a 29.97 fps EPIC-55 video, frames numbered at 60 fps (start_frame 61 is 1 s,
  video frame 30; at the video's own rate it would be frame 60, past this 2 s video's end)."""
  videos_dir = tmp_path / "videos"
  videos_dir.mkdir()
  write_video(videos_dir / "P02_05.MP4", 60, fps=Fraction(30000, 1001), codec="mpeg4")
  path = _write_epic_csv(tmp_path / "rows.csv", [
      ("P02_05_0", "P02_05", "00:00:01.00", "00:00:01.50", 61, 91, "open fridge")])
  pairs, skipped = videos.load_annotations("epic", {"train": str(path)}, {})
  reports, _ = videos.extract(pairs, videos_dir, tmp_path / "out",
                              options=videos.ExtractOptions(short_side=0), skipped=skipped)
  assert reports["train"].outcomes["written"] == 1
  (rec,) = _records_by_id(tmp_path / "out", "train").values()
  assert (read_index(rec["input_jpeg"]), read_index(rec["target_jpeg"])) == (30, 37)
  meta = json.loads(rec["meta"])
  assert (meta["input_frame"], meta["annotation_fps"]) == (30, 60)


def _records_by_id(out: Path, split: str) -> dict[str, dict]:
  out_records = {}
  for shard in sorted((out / "work" / split).glob("*.array_record")):
    for r in videos.read_work_file(shard):
      assert r["id"] not in out_records
      out_records[r["id"]] = r
  return out_records


def test_ego4d_extraction_end_to_end(data, tmp_path):
  """Exact frames, every failure counted, filters, the LEGO layout and the TFDS records the
  Grain pipeline reads."""
  from data_prep import lego_json
  from lego_jax.data import pipeline, records

  pairs, skipped = videos.load_annotations(
      "ego4d", {"train": str(data["fho"])}, {},
      descriptions={"clip_a": {"a1": {"llava_forecast_finetune": "Hold the knife firmly."}}})
  assert skipped["train"]["duplicate_id"] == 1
  out, lego = tmp_path / "out", tmp_path / "lego"
  opts = videos.ExtractOptions(short_side=96, min_similarity=0.2, max_similarity=0.995)
  reports, markers = videos.extract(pairs, data["ego_videos"], out, options=opts, lego_dir=lego,
                                    skipped=skipped)
  r = reports["train"]
  assert r.outcomes == {"written": 4, "video_missing": 1, "video_unreadable": 2,
                        "frame_before_start": 0, "frame_past_end": 2, "frame_not_found": 0,
                        "decode_error": 0, "near_duplicate": 1, "unrelated": 1,
                        "worker_error": 0}
  assert sum(r.outcomes.values()) == r.pairs == 11
  assert r.processed == ["vid_a", "vid_b", "vid_corrupt", "vid_trunc"] and r.resumed == []
  assert "vid_corrupt" in r.errors

  written = _records_by_id(out, "train")
  assert sorted(written) == ["clip_a/a1", "clip_a/a2", "clip_b/b1", "clip_t/t1"]
  frames = {p.id: (p.input.frame, p.target.frame) for p in pairs["train"]}
  video_of = {p.id: p.video_id for p in pairs["train"]}
  for rid, rec in written.items():
    assert (read_index(rec["input_jpeg"]), read_index(rec["target_jpeg"])) == frames[rid]
    assert Image.open(io.BytesIO(rec["input_jpeg"])).size == (128, 96)
    assert (rec["height"], rec["width"]) == (H, W)
    meta = json.loads(rec["meta"])
    assert (meta["input_frame"], meta["target_frame"]) == frames[rid]
    assert meta["video_id"] == video_of[rid] and meta["source"] == "ego4d_fho"
  assert written["clip_a/a1"]["description"] == "Hold the knife firmly."
  assert written["clip_a/a2"]["action"] == "pick up the knife"

  # The LEGO release layout, read back by the release converter itself.
  paths = videos.write_lego_release(lego, markers)
  annotation = json.loads(paths["train"].read_text())
  assert sorted(f"{c}/{a}" for c in annotation for a in annotation[c]) == sorted(written)
  metadata = lego_json.read_metadata(paths["metadata"])
  entry = next(e for e in lego_json.pair_entries(annotation, "x") if e.id == "clip_b/b1")
  rec = lego_json.load_pair(entry, lego / "frames", metadata, "ego4d")
  assert (read_index(rec["input_jpeg"]), read_index(rec["target_jpeg"])) == (10, 30)
  assert (rec["action"], rec["height"], rec["width"]) == ("cut the carrot", H, W)

  # TFDS records: the same pairs, in video order; instruction records for described pairs.
  result = videos.write_records(tmp_path / "records", markers, out / "work", num_shards=2)
  assert result["pairs"]["num_records"] == {"train": 4}
  assert result["instruct"]["num_records"] == {"train": 1}
  src = records.open_split(tmp_path / "records", "train")
  ids = [records.to_python(src[i])["id"] for i in range(len(src))]
  assert ids == ["clip_a/a1", "clip_a/a2", "clip_b/b1", "clip_t/t1"]
  loader = pipeline.pair_loader(tmp_path / "records", "train", batch_size=4, image_size=32,
                                vllm_image_size=None, shuffle=False, num_epochs=1)
  batch = next(iter(loader))
  assert batch["input"].shape == (4, 32, 32, 3)
  assert list(batch["action"]) == ["cut the carrot", "pick up the knife", "cut the carrot",
                                   "cut the carrot"]
  inst = records.open_split(tmp_path / "records", "train", records.INSTRUCT)
  first = records.to_python(inst[0])
  assert (first["id"], first["answer"]) == ("clip_a/a1", "Hold the knife firmly.")
  assert "cut the carrot" in first["prompt"]

  # Without the filters the two filtered pairs are written.
  reports, _ = videos.extract(pairs, data["ego_videos"], tmp_path / "nofilter",
                              options=videos.ExtractOptions(short_side=96))
  assert reports["train"].outcomes["written"] == 6


def test_resume_redoes_only_what_is_missing_and_never_duplicates(data, tmp_path):
  pairs, skipped = videos.load_annotations("epic", {"train": str(data["epic_csv"])}, {},
                                           epic_positions="timestamps")
  out = tmp_path / "out"
  opts = videos.ExtractOptions(short_side=0)
  first, markers = videos.extract(pairs, data["epic_videos"], out, options=opts, workers=2,
                                  skipped=skipped)
  r = first["train"]
  assert r.processed == ["P01_101", "P01_103"]
  assert {k: v for k, v in r.outcomes.items() if v} == {
      "written": 3, "frame_past_end": 1, "video_missing": 1}
  before = _records_by_id(out, "train")
  assert {rid: (read_index(x["input_jpeg"]), read_index(x["target_jpeg"]))
          for rid, x in before.items()} == {
      "P01_101/P01_101_0": (10, 30), "P01_101/P01_101_1": (100, 120), "P01_103/P01_103_0": (1, 16)}

  # A finished run is not redone.
  again, _ = videos.extract(pairs, data["epic_videos"], out, options=opts, workers=2)
  assert again["train"].processed == [] and again["train"].resumed == ["P01_101", "P01_103"]

  # One video's output lost (or a run killed while it was written): only it is redone.
  (out / "work" / "train" / "P01_103.json").unlink()
  (out / "work" / "train" / ".P01_101.array_record.tmp123").write_bytes(b"half")
  third, markers = videos.extract(pairs, data["epic_videos"], out, options=opts, workers=2)
  assert third["train"].processed == ["P01_103"] and third["train"].resumed == ["P01_101"]
  assert third["train"].outcomes == r.outcomes
  after = _records_by_id(out, "train")
  assert after.keys() == before.keys()
  assert all(after[k]["input_jpeg"] == before[k]["input_jpeg"] for k in after)
  assert not list((out / "work").rglob(".*.tmp*"))

  # Other options are other records: everything is redone.
  fourth, _ = videos.extract(pairs, data["epic_videos"], out,
                             options=videos.ExtractOptions(short_side=32))
  assert fourth["train"].processed == ["P01_101", "P01_103"]


def test_command_line(data, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_prep.videos", "--source=epic",
         f"--annotations=train:{data['epic_csv']}", f"--videos_dir={data['epic_videos']}",
         f"--out={out}", "--workers=1", "--num_shards=1", "--short_side=64"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "written              3" in run.stdout and "video_missing        1" in run.stdout
  report = json.loads((out / "report.json").read_text())
  assert report["splits"]["train"]["outcomes"]["frame_past_end"] == 1
  assert report["splits"]["train"]["skipped"] == {"bad_row": 1}
  assert report["records"]["pairs"]["num_records"] == {"train": 3}
  assert report["records"]["instruct"] is None   # no descriptions given

  bad = subprocess.run(cmd[:4] + [f"--annotations=train:{tmp_path / 'nope.csv'}"] + cmd[5:],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("data_prep.videos: error: annotation")
