"""FID: the Inception network against a PyTorch reference written here with torchvision's
Inception3 names and pytorch-fid's patched blocks, and the statistics / distance / cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lego_jax.eval import fid
from lego_jax.eval import inception as inc
from helpers import rel_max

nn = torch.nn


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg3(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(avg3(x))], 1)


class B(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class C(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = m(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg3(x))], 1)


class D(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class E(nn.Module):
  def __init__(self, cin, last):
    super().__init__()
    self.last = last
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    # FIDInceptionE_2 (the last block) max-pools; FIDInceptionE_1 averages without padding.
    pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.last else avg3(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class TorchFIDInception(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a = D(768)
    self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A randomly initialised reference saved under pytorch-fid's file name, and our copy of it."""
  torch.manual_seed(0)
  net = TorchFIDInception().eval()
  with torch.no_grad():  # He-scaled weights and non-trivial BN statistics keep activations O(1)
    for m in net.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.normal_(0, (2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 2.0)
  d = tmp_path_factory.mktemp("fidw")
  torch.save(net.state_dict(), d / "pt_inception-2015-12-05-6726825d.pth")
  return net, inc.build_inception(str(d))


def test_inception_pool3_parity_small_input(reference):
  net, model = reference
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 83, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  from flax import nnx
  got = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
  assert got.shape == want.shape == (2, 2048)
  assert np.std(want) > 1e-2  # the features are not degenerate
  assert rel_max(got, want) <= 1e-4


def test_pool3_features_resize_and_normalise_like_pytorch_fid(reference):
  net, model = reference
  img = np.random.default_rng(1).uniform(0, 1, (1, 40, 57, 3)).astype(np.float32)
  with torch.no_grad():
    t = F.interpolate(torch.from_numpy(img.transpose(0, 3, 1, 2).copy()), size=(299, 299),
                      mode="bilinear", align_corners=False)
    want = net(2 * t - 1).numpy()
  got = inc.pool3_features_np(model, img)
  assert rel_max(got, want) <= 1e-4


def test_key_map_covers_every_parameter_and_rejects_strays(reference):
  net, _ = reference
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  model = inc.load_inception(inc.abstract_inception(), sd)
  assert len(inc.conv_names()) == 94  # torchvision's Inception3 has 94 BasicConv2d
  sd["Mixed_6b.branch7x7_9.conv.weight"] = sd["Mixed_6b.branch7x7_2.conv.weight"]
  with pytest.raises(KeyError, match="Mixed_6b.branch7x7_9.conv.weight"):
    inc.load_inception(model, sd)


def _ref_fid(mu1, s1, mu2, s2):
  """Independent: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))) for PSD S1, S2."""
  w, v = np.linalg.eigh(s1)
  r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  e = np.linalg.eigvalsh(r @ s2 @ r)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(e, 0, None))))


def test_frechet_distance_statistics_in_float64():
  rng = np.random.default_rng(0)
  a = rng.normal(0, 1, (200, 16)).astype(np.float32)
  b = (rng.normal(0.3, 1.5, (150, 16)) @ rng.normal(0, 0.5, (16, 16))).astype(np.float32)
  mu1, s1 = fid.activation_statistics(a)
  mu2, s2 = fid.activation_statistics(b)
  assert mu1.dtype == s1.dtype == np.float64
  np.testing.assert_allclose(s1, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-12)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _ref_fid(mu1, s1, mu2, s2), rtol=1e-6)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
  # Fewer images than dimensions: a singular product, still a finite distance.
  mu3, s3 = fid.activation_statistics(a[:5])
  assert np.isfinite(fid.frechet_distance(mu3, s3, mu2, s2))
  with pytest.raises(ValueError, match="at least 2"):
    fid.activation_statistics(a[:1])


def test_stats_cache_keyed_by_files_sizes_and_mtimes(tmp_path):
  files = []
  for i in range(3):
    p = tmp_path / f"{i}.png"
    p.write_bytes(b"x" * (i + 1))
    files.append(p)
  key = fid.set_key(files)
  assert fid.set_key(reversed(files)) == key
  cache = fid.StatsCache(tmp_path / "cache")
  assert cache.load(key) is None
  cache.save(key, np.arange(3.0), np.eye(3), 3)
  mu, sigma, n = cache.load(key)
  np.testing.assert_array_equal(mu, np.arange(3.0))
  assert n == 3 and sigma.dtype == np.float64
  st = files[1].stat()
  os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  assert fid.set_key(files) != key
  assert fid.set_key(files[:2]) != fid.set_key(files)
