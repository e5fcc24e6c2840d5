"""EgoVLP video tower parity against a PyTorch FrozenInTime written here from the release's
SpaceTimeTransformer (names `video_model.*`, `vid_proj.0`, `txt_proj.1`, `text_model.*` under
`state_dict` with DataParallel's `module.` prefix), and the EgoVLP / EgoVLP+ metric recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from lego_jax.eval import egovlp as ev
from lego_jax.weights.mapping import KeyMappingError
from helpers import rel_max

nn = torch.nn
SMALL = dict(embed_dim=48, depth=2, num_heads=3, patch_size=8, image_size=32, projection_dim=16)


def attn(q, k, v):
  return torch.einsum("bij,bjd->bid", torch.einsum("bid,bjd->bij", q, k).softmax(-1), v)


class VarAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.h = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, over, f, n):
    b, length, d = x.shape
    h, dh = self.h, d // self.h
    heads = lambda t: t.reshape(b, length, h, dh).permute(0, 2, 1, 3).reshape(b * h, length, dh)  # noqa: E731
    q, k, v = map(heads, self.qkv(x).chunk(3, dim=-1))
    q = q * dh ** -0.5
    cls_out = attn(q[:, :1], k, v)
    q_, k_, v_ = q[:, 1:], k[:, 1:], v[:, 1:]
    if over == "space":   # '(b h) (f n) d -> ((b h) f) n d'
      to = lambda t: t.reshape(b * h * f, n, dh)  # noqa: E731
    else:                 # '(b h) (f n) d -> ((b h) n) f d'
      to = lambda t: t.reshape(b * h, f, n, dh).permute(0, 2, 1, 3).reshape(b * h * n, f, dh)  # noqa: E731
    q_, k_, v_ = to(q_), to(k_), to(v_)
    r = q_.shape[0] // k.shape[0]
    cls_k, cls_v = k[:, :1].repeat_interleave(r, 0), v[:, :1].repeat_interleave(r, 0)
    out = attn(q_, torch.cat([cls_k, k_], 1), torch.cat([cls_v, v_], 1))
    if over == "space":
      out = out.reshape(b * h, f * n, dh)
    else:
      out = out.reshape(b * h, n, f, dh).permute(0, 2, 1, 3).reshape(b * h, f * n, dh)
    out = torch.cat([cls_out, out], 1)
    out = out.reshape(b, h, length, dh).permute(0, 2, 1, 3).reshape(b, length, d)
    return self.proj(out)


class Mlp(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
    self.attn, self.timeattn = VarAttention(d, heads), VarAttention(d, heads)
    self.mlp = Mlp(d)

  def forward(self, x, f, n):
    t = self.timeattn(self.norm3(x), "time", f, n)
    s = self.attn(self.norm1(x + t), "space", f, n)
    x = x + s
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, d, p):
    super().__init__()
    self.proj = nn.Conv2d(3, d, p, p)


class SpaceTimeTransformer(nn.Module):
  def __init__(self, d, depth, heads, p, size, frames):
    super().__init__()
    self.frames, self.n = frames, (size // p) ** 2
    self.patch_embed = PatchEmbed(d, p)
    self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, self.n + 1, d) * 0.02)
    self.temporal_embed = nn.Parameter(torch.randn(1, frames, d) * 0.02)
    self.blocks = nn.ModuleList([Block(d, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)

  def forward(self, x):  # (B, F, C, H, W)
    b, f, c, hh, ww = x.shape
    x = self.patch_embed.proj(x.reshape(-1, c, hh, ww)).flatten(2).transpose(2, 1)
    x = x.reshape(b, -1, x.shape[-1])
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
    tile = self.pos_embed[:, 1:].repeat(1, self.frames, 1)
    tile = tile + self.temporal_embed.repeat_interleave(self.n, 1)
    total = torch.cat([self.pos_embed[:, :1], tile], 1)
    x = x + total[:, :x.shape[1]]
    for blk in self.blocks:
      x = blk(x, f, self.n)
    return self.norm(x)[:, 0]


class FrozenInTime(nn.Module):
  def __init__(self, frames):
    super().__init__()
    s = SMALL
    self.video_model = SpaceTimeTransformer(s["embed_dim"], s["depth"], s["num_heads"],
                                            s["patch_size"], s["image_size"], frames)
    self.text_model = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=50, dim=24, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16))
    self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(24, s["projection_dim"]))
    self.vid_proj = nn.Sequential(nn.Linear(s["embed_dim"], s["projection_dim"]))

  def video(self, x):
    return self.vid_proj(self.video_model(x))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  torch.manual_seed(0)
  ref = FrozenInTime(frames=4).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  d = tmp_path_factory.mktemp("egovlp")
  # As EgoVLP's trainer saves it: DataParallel names under state_dict, plus bookkeeping.
  torch.save({"arch": "FrozenInTime", "epoch": 7,
              "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
             d / "egovlp.pth")
  ours = ev.build_egovlp(str(d), dataset="ego4d", num_frames=4, num_heads=3)
  return ref, ours, d


def _torch(video):
  return torch.from_numpy(video.transpose(0, 1, 4, 2, 3).copy())


@pytest.mark.parametrize("frames", [4, 3])
def test_video_embedding_parity(pair, frames):
  ref, ours, _ = pair
  video = np.random.default_rng(frames).normal(0, 1, (2, frames, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.video(_torch(video)).numpy()
  from flax import nnx
  got = np.asarray(nnx.jit(lambda m, v: m(v))(ours, video))
  assert got.shape == want.shape == (2, 16)
  assert rel_max(got, want) <= 1e-4


def _release_frame(img):
  """torchvision Resize(32) on a tensor (bilinear, no antialias), CenterCrop(32), ImageNet."""
  x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
  h, w = x.shape[-2:]
  size = (32, int(32 * w / h)) if h <= w else (int(32 * h / w), 32)
  x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
  top, left = int(round((x.shape[-2] - 32) / 2.0)), int(round((x.shape[-1] - 32) / 2.0))
  x = x[..., top:top + 32, left:left + 32]
  mean = torch.tensor(ev.IMAGENET_MEAN)[None, :, None, None]
  std = torch.tensor(ev.IMAGENET_STD)[None, :, None, None]
  return ((x - mean) / std)[0]


def _sim(a, b):
  a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
  return (a * b).sum(1).numpy()


def test_egovlp_and_plus_metrics_follow_the_release(pair):
  ref, ours, _ = pair
  rng = np.random.default_rng(5)
  gt = rng.uniform(0, 1, (2, 45, 61, 3)).astype(np.float32)
  gen = np.clip(gt + rng.normal(0, 0.4, gt.shape), 0, 1).astype(np.float32)
  inp = rng.uniform(0, 1, gt.shape).astype(np.float32)
  with torch.no_grad():
    clip = lambda imgs: torch.stack([_release_frame(i) for i in imgs])[None]  # noqa: E731
    want = [_sim(ref.video(clip([g] * 4)), ref.video(clip([r] * 4))) for g, r in zip(gen, gt)]
    want_plus = [_sim(ref.video(clip([i, i, g, g])), ref.video(clip([i, i, r, r])))
                 for i, g, r in zip(inp, gen, gt)]
  got = np.asarray(ev.egovlp_similarity(ours, gen, gt, frames=4))
  got_plus = np.asarray(ev.egovlp_plus_similarity(ours, inp, gen, gt, frames=4))
  np.testing.assert_allclose(got, np.concatenate(want), atol=2e-5)
  np.testing.assert_allclose(got_plus, np.concatenate(want_plus), atol=2e-5)
  assert np.all(np.abs(got - got_plus) > 1e-6)  # the context frames change the score


def test_temporal_embed_fit_and_key_errors(pair):
  ref, _, d = pair
  sd = {f"module.{k}": v.numpy() for k, v in ref.state_dict().items()}
  wide = ev.load_egovlp(ev.abstract_egovlp(ev.EgoVLPConfig(**SMALL, num_frames=6)), sd)
  t = np.asarray(wide.temporal_embed[...])
  np.testing.assert_array_equal(t[:, :4], ref.video_model.temporal_embed.detach().numpy())
  np.testing.assert_array_equal(t[:, 4:], 0.0)
  narrow = ev.load_egovlp(ev.abstract_egovlp(ev.EgoVLPConfig(**SMALL, num_frames=2)), sd)
  np.testing.assert_array_equal(np.asarray(narrow.temporal_embed[...]),
                                ref.video_model.temporal_embed.detach().numpy()[:, :2])
  sd["module.video_model.blocks.1.attn.qkv.weight_orig"] = sd.pop(
      "module.video_model.blocks.1.attn.qkv.weight")
  with pytest.raises(KeyMappingError, match="weight_orig"):
    ev.load_egovlp(ev.abstract_egovlp(ev.EgoVLPConfig(**SMALL)), sd)


def test_epic_uses_epic_checkpoint(tmp_path):
  from lego_jax.eval.weight_files import MissingWeightsError

  with pytest.raises(MissingWeightsError, match="epic_mir_plus.pth"):
    ev.build_egovlp(str(tmp_path), dataset="epickitchens", num_frames=16)


def test_text_tower_parity_with_transformers_distilbert(pair):
  """EgoVLP's compute_text: DistilBertModel last_hidden_state[:, 0] -> txt_proj (ReLU, Linear)."""
  from flax import nnx
  ref, _, _ = pair
  sd = {f"module.{k}": v.numpy() for k, v in ref.state_dict().items()}
  cfg = ev.EgoVLPTextConfig(vocab_size=50, dim=24, num_layers=1, num_heads=2, hidden_dim=32,
                            max_position=16, projection_dim=16)
  text = ev.load_egovlp_text(nnx.eval_shape(lambda: ev.EgoVLPText(cfg, rngs=nnx.Rngs(0))), sd)
  ids = np.array([[1, 7, 9, 4, 0, 0], [3, 5, 2, 8, 11, 6]], np.int64)
  mask = (ids > 0).astype(np.int64)
  mask[1] = 1
  with torch.no_grad():
    hidden = ref.text_model(input_ids=torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask)).last_hidden_state[:, 0]
    want = ref.txt_proj(hidden).numpy()
  got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(text, ids, mask))
  assert rel_max(got, want) <= 1e-4
