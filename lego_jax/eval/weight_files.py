"""Where each metric network's weights are looked for (nothing is downloaded).

Every file lives in `cfg.eval.weights_dir` (flat). A metric whose file is absent is skipped by
`lego-jax evaluate` with the message of `MissingWeightsError`: the file names looked for and where
a user gets them. `.safetensors` copies with the same stem are accepted everywhere (and preferred:
some release pickles hold non-tensor objects that the safe loader refuses).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

# metric -> (file names in weights_dir, where users get them)
WEIGHT_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "lpips_alex": (("alexnet-owt-7be5be79.pth", "alexnet.pth"),
                   "torchvision's ImageNet AlexNet (download.pytorch.org/models/alexnet-owt-7be5be79.pth)"),
    "lpips_vgg": (("vgg16-397923af.pth", "vgg16.pth"),
                  "torchvision's ImageNet VGG16 (download.pytorch.org/models/vgg16-397923af.pth)"),
    "lpips_squeeze": (("squeezenet1_1-b8a52dc0.pth", "squeezenet1_1.pth"),
                      "torchvision's ImageNet SqueezeNet 1.1 "
                      "(download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth)"),
    # The LPIPS linear heads: lpips/weights/v0.1/<net>.pth of the `lpips` PyPI package; also
    # found inside an installed `lpips` package when weights_dir has none.
    "lpips_alex_head": (("lpips_alex.pth", "alex.pth"), "the lpips package, lpips/weights/v0.1/alex.pth"),
    "lpips_vgg_head": (("lpips_vgg.pth", "vgg.pth"), "the lpips package, lpips/weights/v0.1/vgg.pth"),
    "lpips_squeeze_head": (("lpips_squeeze.pth", "squeeze.pth"),
                           "the lpips package, lpips/weights/v0.1/squeeze.pth"),
    "fid": (("pt_inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05.pth"),
            "pytorch-fid's FID Inception weights (github.com/mseitzer/pytorch-fid releases, "
            "fid_weights/pt_inception-2015-12-05-6726825d.pth)"),
    "clip": (("clip-vit-large-patch14", "clip-vit-large-patch14.safetensors"),
             "openai/clip-vit-large-patch14 from the Hugging Face hub (the snapshot directory "
             "with config.json and model.safetensors; any layout lego_jax.models.clip_vision "
             "reads that holds visual_projection)"),
    # The release scores Ego4D (EgoVLP and EgoVLP+) with egovlp.pth at 4 frames and EPIC-Kitchens
    # with epic_mir_plus.pth at 16 frames.
    "egovlp_ego4d": (("egovlp.pth",), "EgoVLP's Ego4D checkpoint (github.com/showlab/EgoVLP; "
                                      "LEGO's scripts/download_metric_weights.sh fetches it)"),
    "egovlp_epickitchens": (("epic_mir_plus.pth",),
                            "EgoVLP's EPIC-Kitchens MIR checkpoint (github.com/showlab/EgoVLP; "
                            "LEGO's scripts/download_metric_weights.sh fetches it)"),
    # BLIP-B / BLIP-L caption scores: a transformers snapshot (config.json, model.safetensors and
    # the tokenizer files) or the original BLIP checkpoint the release downloads.
    "blip_b": (("blip-image-captioning-base", "model_base_caption_capfilt_large.pth"),
               "Salesforce/blip-image-captioning-base from the Hugging Face hub (the snapshot "
               "directory), or model_base_caption_capfilt_large.pth (LEGO's "
               "scripts/download_metric_weights.sh)"),
    "blip_l": (("blip-image-captioning-large", "model_large_caption.pth"),
               "Salesforce/blip-image-captioning-large from the Hugging Face hub (the snapshot "
               "directory), or model_large_caption.pth (LEGO's scripts/download_metric_weights.sh)"),
    # EgoVLP's text tokenizer (the BLIP scores embed captions and descriptions with EgoVLP's text
    # tower, whose weights are in egovlp.pth / epic_mir_plus.pth).
    "distilbert_tokenizer": (("distilbert-base-uncased",),
                             "distilbert-base-uncased's tokenizer files (vocab.txt, "
                             "tokenizer_config.json) from the Hugging Face hub, or the "
                             "distilbert-base-uncased folder of LEGO's metric weights"),
}


class MissingWeightsError(FileNotFoundError):
  """A metric's weight file is not where it is looked for; says which file and where to get it."""

  def __str__(self):
    return str(self.args[0])


def find_weights(weights_dir: str | os.PathLike, what: str,
                 extra_dirs: Sequence[str | os.PathLike] = ()) -> Path:
  """The first existing candidate file for `what` (a WEIGHT_FILES key).

  Looks in `weights_dir` then `extra_dirs`, for each name and its `.safetensors` twin.
  """
  names, source = WEIGHT_FILES[what]
  dirs = [Path(d) for d in ([weights_dir] if weights_dir else []) + list(extra_dirs)]
  for d in dirs:
    for name in names:
      stem = name[:-len(Path(name).suffix)] if Path(name).suffix else name
      for cand in (d / f"{stem}.safetensors", d / name):
        if cand.exists():
          return cand
  where = f"in {', '.join(str(d) for d in dirs)}" if dirs else "(cfg.eval.weights_dir is not set)"
  raise MissingWeightsError(
      f"no weight file {' or '.join(names)} {where}; get it from {source} and put it "
      f"in --config.eval.weights_dir")
