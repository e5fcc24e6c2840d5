"""configs/tiny.py in the held-out-combinations world (lego_jax/data/synthetic.py, `Options`):
tests the paper's claim where the paper makes it, that the VLLM brings knowledge the diffusion
model's pairs do not teach.

Each verb-kind combination has its own hand and, for "pick up", where the object is put down,
stated only by the descriptions; the LDM's train / val pairs never show `holdout`'s
combinations (each of their verbs and kinds is seen in other combinations), while the VLLM's
instruction data (`num_instruction` extra frames with action and description, no target frame)
covers every combination. The demo then scores LEGO vs the label-only LDM on the seen and the
held-out combinations separately (metrics.json "by_combination").

    lego-jax demo --config=configs/tiny_heldout.py --workdir=DIR
"""

import pathlib

from lego_jax import config


def get_config():
  cfg = config.load(pathlib.Path(__file__).with_name("tiny.py"))
  cfg.name = "tiny_heldout"
  cfg.data.synthetic.combination_rules = True
  cfg.data.synthetic.holdout = ("stir bowl", "pick up pan", "pick up carrot")
  cfg.data.synthetic.num_instruction = 512
  return cfg
