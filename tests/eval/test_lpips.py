"""LPIPS parity against a PyTorch reference written here (torchvision layouts, lpips' algorithm).

The reference backbones are torch.nn.Sequential stacks with torchvision's indices, so their saved
state dicts have the published key layout (`features.N.*`, SqueezeNet's Fire
`features.N.squeeze/expand1x1/expand3x3`); the heads are the REAL v0.1 heads shipped in the lpips
wheel when that package is installed (`pip install --no-deps lpips`), random ones otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from lego_jax.eval import lpips as lp
from lego_jax.eval.weight_files import MissingWeightsError
from lego_jax.weights.io import read_state_dict
from lego_jax.weights.mapping import KeyMappingError
from lego_jax.weights.state import load_params, param_shapes
from helpers import rel_max

nn = torch.nn


class Fire(nn.Module):
  def __init__(self, cin, sq, ex):
    super().__init__()
    self.squeeze = nn.Conv2d(cin, sq, 1)
    self.expand1x1 = nn.Conv2d(sq, ex, 1)
    self.expand3x3 = nn.Conv2d(sq, ex, 3, padding=1)

  def forward(self, x):
    x = torch.relu(self.squeeze(x))
    return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def torch_features(net: str) -> nn.Sequential:
  R = lambda: nn.ReLU()  # noqa: E731
  if net == "alex":
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), R(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(64, 192, 5, padding=2), R(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(192, 384, 3, padding=1), R(), nn.Conv2d(384, 256, 3, padding=1),
                         R(), nn.Conv2d(256, 256, 3, padding=1), R(), nn.MaxPool2d(3, 2))
  if net == "vgg":
    layers, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(c, v, 3, padding=1), R()]
        c = v
    return nn.Sequential(*layers)
  return nn.Sequential(nn.Conv2d(3, 64, 3, 2), R(), nn.MaxPool2d(3, 2, ceil_mode=True),
                       Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
                       Fire(128, 32, 128), Fire(256, 32, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
                       Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256),
                       Fire(512, 64, 256))


class TorchNet(nn.Module):
  """torchvision's module shape: `features` + a `classifier` (unused by LPIPS, in the file)."""

  def __init__(self, net):
    super().__init__()
    self.features = torch_features(net)
    self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8, 4))


# lpips.pretrained_networks slices, written independently of lego_jax's layer lists.
SLICES = {"alex": [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)],
          "vgg": [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)],
          "squeeze": [(0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13)]}
SHIFT = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
SCALE = torch.tensor([.458, .448, .450])[None, :, None, None]


def torch_taps(features, net, x):
  x = (x - SHIFT) / SCALE
  out = []
  for a, b in SLICES[net]:
    for i in range(a, b):
      x = features[i](x)
    out.append(x)
  return out


def torch_lpips(features, heads, net, x0, x1):
  total = 0
  for k, (f0, f1) in enumerate(zip(torch_taps(features, net, x0), torch_taps(features, net, x1))):
    n0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
    n1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
    w = heads[f"lin{k}.model.1.weight"]
    total = total + torch.nn.functional.conv2d((n0 - n1) ** 2, w).mean(dim=(2, 3), keepdim=True)
  return total.flatten()


def heads_for(net, rng):
  d = lp.installed_heads_dir()
  if d is not None:
    return {k: torch.from_numpy(v) for k, v in read_state_dict(d / f"{net}.pth").items()}, True
  return {f"lin{k}.model.1.weight": torch.from_numpy(rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32))
          for k, c in enumerate(lp.tap_channels(net))}, False


features = nnx.jit(lambda m, x: m.features(x))


# Sizes chosen so every net keeps >= 1 pixel at its last tap; 51 px exercises ceil-mode pooling.
@pytest.mark.parametrize("net,size", [("alex", 67), ("vgg", 34), ("squeeze", 51)])
def test_lpips_parity_with_torch_reference(net, size, tmp_path):
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  ref = TorchNet(net).eval()
  heads, real = heads_for(net, rng)
  names = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
           "squeeze": "squeezenet1_1-b8a52dc0.pth"}
  torch.save(ref.state_dict(), tmp_path / names[net])
  torch.save(heads, tmp_path / f"lpips_{net}.pth")

  model = lp.build_lpips(net, str(tmp_path))  # file names, safe reading, key map

  x0 = rng.uniform(-1, 1, (2, size, size + 3, 3)).astype(np.float32)
  x1 = rng.uniform(-1, 1, (2, size, size + 3, 3)).astype(np.float32)
  t0, t1 = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x0, x1))
  with torch.no_grad():
    want_taps = torch_taps(ref.features, net, t0)
    want = torch_lpips(ref.features, heads, net, t0, t1).numpy()
  got_taps = features(model, x0)
  assert len(got_taps) == len(want_taps) == len(lp.tap_channels(net))
  for g, w in zip(got_taps, want_taps):
    w = w.numpy().transpose(0, 2, 3, 1)
    assert g.shape == w.shape
    assert rel_max(g, w) <= 1e-4
  got = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, x0, x1))
  assert got.shape == (2,)
  assert np.all(want > 0)
  assert rel_max(got, want) <= 1e-4
  if real:  # the shipped heads are non-negative with known maxima (lpips v0.1)
    assert float(heads["lin0.model.1.weight"].min()) >= 0.0


def test_release_range_feeds_unit_images_unchanged(tmp_path):
  rng = np.random.default_rng(1)
  model = lp.abstract_lpips("alex")  # random numpy weights: JAX's own init is slow on CPU
  load_params(model, {k: rng.normal(0, 0.05, s).astype(np.float32)
                      for k, s in param_shapes(model).items()})
  gen = rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
  ref = rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
  correct = float(lp.lpips_distance(model, gen, ref)[0])
  release = float(lp.lpips_distance(model, gen, ref, release_range=True)[0])
  call = nnx.jit(lambda m, a, b: m(a, b))
  np.testing.assert_allclose(correct, float(call(model, 2 * ref - 1, 2 * gen - 1)[0]), rtol=1e-5)
  np.testing.assert_allclose(release, float(call(model, ref, gen)[0]), rtol=1e-5)
  assert abs(correct - release) > 1e-4 * abs(correct)
  assert abs(float(lp.lpips_distance(model, ref, ref)[0])) < 1e-12


def test_saved_lpips_module_layout_and_key_errors(tmp_path):
  """A torchmetrics/lpips module file: `net.net.sliceK.N.*`, `net.linK.*`, scaling buffers."""
  torch.manual_seed(2)
  ref = TorchNet("alex").eval()
  rng = np.random.default_rng(2)
  heads, _ = heads_for("alex", rng)
  saved = {}
  for s, (a, b) in enumerate(SLICES["alex"], start=1):
    for i in range(a, b):
      for name, p in ref.features[i].named_parameters():
        saved[f"net.net.slice{s}.{i}.{name}"] = p.detach().numpy()
  saved.update({f"net.{k}": v.numpy() for k, v in heads.items()})
  saved["net.scaling_layer.shift"] = SHIFT.numpy()
  saved["net.scaling_layer.scale"] = SCALE.numpy()
  model = lp.load_lpips(lp.abstract_lpips("alex"), saved)
  x = rng.uniform(-1, 1, (1, 67, 67, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_taps(ref.features, "alex", torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[-1]
  assert rel_max(features(model, x)[-1], want.numpy().transpose(0, 2, 3, 1)) <= 1e-4

  broken = dict(saved)
  del broken["net.net.slice3.6.weight"]
  broken["net.net.slice3.7.weight"] = saved["net.net.slice3.6.weight"]
  with pytest.raises(KeyMappingError) as e:
    lp.load_lpips(lp.abstract_lpips("alex"), broken)
  assert "net.conv6.kernel" in str(e.value) and "net.conv7.kernel" in str(e.value)


def test_missing_backbone_names_the_file(tmp_path):
  with pytest.raises(MissingWeightsError) as e:
    lp.build_lpips("vgg", str(tmp_path))
  assert "vgg16-397923af.pth" in str(e.value) and str(tmp_path) in str(e.value)
