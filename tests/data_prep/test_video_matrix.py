"""Frame extraction across the codecs, containers and rates issue 18's 118 cases found right:
each video carries every frame's index in its pixels (test_videos.frame_image), and the reader
must return frame i as the i-th frame shown, whatever the GOP, B-frames, open GOPs, the codec,
a fractional rate or a stream that starts late, and name the frames past the end.
(H.264 with B-frames at GOP 12, edit lists, MPEG-4 in AVI, 50 and 29.97 fps EPIC videos and
truncated files are in test_videos.py.)"""

from fractions import Fraction
from pathlib import Path

import av
import pytest

from data_prep.video_frames import VideoReader
from test_videos import H, W, frame_image, read_index

N = 150  # more than one GOP of 120
WANTED = [0, 1, 2, 59, 60, 61, 118, 119, 120, 121, 149, N, N + 40]


def _encode(path: Path, codec: str, *, fps=30, gop: int = 12, options=None,
            start_s: float = 0.0) -> Path:
  with av.open(str(path), "w") as out:
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.options = dict(options or {})
    # A late start: every timestamp shifted by start_s (as in a clip cut from a longer one).
    shift = None
    for i in list(range(N)) + [None]:
      frames = [] if i is None else [av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")]
      for packet in stream.encode(*frames):
        if start_s:
          shift = shift if shift is not None else int(round(start_s / packet.time_base))
          packet.pts += shift
          packet.dts += shift
        out.mux(packet)
  return path


CASES = {
    "H.264, B-frames, GOP 120": ("mp4", "libx264", {}, 120,
                                 {"crf": "12", "bf": "3", "sc_threshold": "0"}, 0.0),
    "H.264, open GOP (mkv)": ("mkv", "libx264", {}, 30,
                              {"crf": "12", "bf": "3", "x264-params": "open-gop=1:scenecut=0"},
                              0.0),
    "HEVC, B-frames": ("mp4", "libx265", {}, 30,
                       {"crf": "12", "x265-params": "bframes=3:log-level=error"}, 0.0),
    "VP9 (webm)": ("webm", "libvpx-vp9", {}, 30, {"crf": "10", "b": "0", "deadline": "realtime"},
                   0.0),
    "H.264 at 59.94 fps": ("mp4", "libx264", {"fps": Fraction(60000, 1001)}, 30,
                           {"crf": "12", "bf": "2"}, 0.0),
    "H.264 at 29.97 fps, starting at 2.5 s (mkv)": ("mkv", "libx264",
                                                    {"fps": Fraction(30000, 1001)}, 30,
                                                    {"crf": "12", "bf": "2"}, 2.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_ith_frame_whatever_the_codec_container_and_rate(tmp_path, case):
  ext, codec, kw, gop, options, start_s = CASES[case]
  if codec not in av.codecs_available:
    pytest.skip(f"this PyAV wheel has no {codec}")
  path = _encode(tmp_path / f"v.{ext}", codec, gop=gop, options=options, start_s=start_s, **kw)
  if start_s:  # the case itself: the stream's first frame is shown at start_s, not at 0
    with av.open(str(path)) as c:
      st = c.streams.video[0]
      assert abs(float(st.start_time * st.time_base) - start_s) < 0.01
  with VideoReader(str(path)) as reader:
    assert (reader.width, reader.height) == (W, H)
    if "fps" in kw:
      assert abs(reader.fps - float(kw["fps"])) < 1e-3
    got = {i: read_index(f.to_ndarray(format="rgb24")) for i, f in reader.read(WANTED)}
    assert got == {i: i for i in WANTED if i < N}
    assert reader.missing == {N: "past_end", N + 40: "past_end"}
    assert reader.inexact == 0
