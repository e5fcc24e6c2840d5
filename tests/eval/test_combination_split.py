"""The demo's seen / held-out split: LEGO vs the label-only LDM per group, with standard errors,
in metrics.json's "by_combination" and in report.html."""

import math

import numpy as np
import pytest

from lego_jax import demo
from lego_jax.eval import action_region, report


def test_summarize_and_paired_differences_on_a_selection():
  per = {"region_psnr": [10.0, 12.0, float("inf"), 20.0], "hand_hit": [1.0, float("nan"), 0.0, 1.0]}
  other = {"region_psnr": [9.0, 13.0, 30.0, 18.0], "hand_hit": [0.0, 1.0, 0.0, 0.0]}
  all_ = action_region.summarize(per)
  assert all_["region_psnr"] == pytest.approx((10 + 12 + 100 + 20) / 4)  # +inf capped at 100
  assert all_["hand_hit_count"] == 3
  sel = action_region.summarize(per, [True, True, False, False])
  assert sel["region_psnr"] == 11.0 and sel["region_psnr_count"] == 2
  assert sel["region_psnr_se"] == pytest.approx(np.std([10, 12], ddof=1) / math.sqrt(2))
  assert sel["hand_hit_count"] == 1 and math.isnan(sel["hand_hit_se"])
  d = action_region.paired_differences(per, other, [True, True, False, True])
  assert d["region_psnr"] == pytest.approx((1 - 1 + 2) / 3)
  assert d["region_psnr_se"] == pytest.approx(np.std([1, -1, 2], ddof=1) / math.sqrt(3))
  assert d["hand_hit"] == 1.0 and d["hand_hit_count"] == 2  # the NaN example drops out
  # score_set's summary is summarize over every example.
  assert all_ == action_region.summarize(per, [True] * 4)


PICK = ("The {} hand reaches to the middle of the table and grasps the red pan by its rim, "
        "lifting it off the table to put it down {} of the table.")


def _examples(flags, said=None, truth=None):
  said = said or [PICK.format("left", "on the left side")] * len(flags)
  truth = truth or said
  return [{"description": d, "reference_description": r,
           "meta": {} if f is None else {"combination": "stir bowl" if not f else "stir pan",
                                         "combination_seen": f}}
          for f, d, r in zip(flags, said, truth)]


def test_combination_split_groups_lego_vs_label_only():
  flags = [True, False, True, False, False]
  per = {"lego": {"placement": [0.5, 0.9, 0.4, 0.8, 0.7]},
         "action_label": {"placement": [0.5, 0.1, 0.5, 0.2, 0.3]},
         "copy_input": {"placement": [0.0] * 5}}
  split = demo.combination_split(_examples(flags), per)
  assert set(split) == {"seen", "held_out"}
  held, seen = split["held_out"], split["seen"]
  assert held["num_test"] == 3 and seen["num_test"] == 2
  assert held["combinations"] == ["stir bowl"] and seen["combinations"] == ["stir pan"]
  assert held["methods"]["lego"]["placement"] == pytest.approx(0.8)
  assert held["methods"]["action_label"]["placement"] == pytest.approx(0.2)
  d = held["lego_minus_action_label"]
  assert d["placement"] == pytest.approx(0.6) and d["placement_count"] == 3
  assert d["placement_se"] == pytest.approx(np.std([0.8, 0.6, 0.4], ddof=1) / math.sqrt(3))
  assert seen["lego_minus_action_label"]["placement"] == pytest.approx(-0.05)
  assert held["vllm_states"] == {"hand": 1.0, "hand_count": 3, "destination": 1.0,
                                 "destination_count": 3}
  # The VLLM's stated hand and destination, against the ground truth's, per group.
  said = [PICK.format("left", "in the middle"), "The right hand holds a spoon.",
          PICK.format("right", "on the left side"), PICK.format("left", "on the left side"),
          "The left hand stirs."]
  truth = [PICK.format("left", "in the middle"), "The left hand holds a spoon.",
           PICK.format("left", "on the left side"), PICK.format("left", "on the right side"),
           "The left hand stirs."]
  states = demo.combination_split(_examples(flags, said, truth), per)
  assert states["held_out"]["vllm_states"] == pytest.approx(
      {"hand": 2 / 3, "hand_count": 3, "destination": 0.0, "destination_count": 1})
  assert states["seen"]["vllm_states"] == pytest.approx(
      {"hand": 0.5, "hand_count": 2, "destination": 1.0, "destination_count": 2})
  # No mark (the plain world or a real release), or a partly marked set: no split.
  assert demo.combination_split(_examples([None] * 3), per) == {}
  assert demo.combination_split(_examples([True, None, False, True, True]), per) == {}


def test_report_shows_the_split_with_standard_errors(tmp_path):
  flags = [True, False, True, False]
  per = {"lego": {"placement": [0.5, 0.9, 0.4, 0.7]},
         "action_label": {"placement": [0.5, 0.1, 0.5, 0.3]}}
  split = demo.combination_split(_examples(flags), per)
  row = {"placement": 0.6, "placement_se": 0.1, "placement_count": 4}
  metrics = {"num_test": 4, "methods": {"lego": row, "action_label": row, "copy_input": row},
             "by_combination": split}
  data = {"title": "t", "config_name": "tiny", "methods": demo.METHODS,
          "headline": demo.HEADLINE, "metrics": metrics, "columns": [], "rows": [], "plots": {}}
  page = report.write_html(tmp_path / "report.html", data).read_text()
  assert "Seen and held-out combinations" in page and "stir bowl" in page
  assert "held-out combinations (2 frames)" in page
  assert "held-out: hand 1.000 of 2, destination 1.000 of 2" in page
  d = split["held_out"]["lego_minus_action_label"]
  assert f"{d['placement']:+.3f}" in page and f"± {d['placement_se']:.3f}" in page
  # The shipped checkpoints' block gets its own table.
  metrics["shipped"] = {"num_test": 4, "methods": metrics["methods"], "by_combination": split}
  page = report.write_html(tmp_path / "shipped.html", data).read_text()
  assert "Seen and held-out combinations (shipped checkpoints)" in page
  # Without the mark the page has no such table.
  del metrics["by_combination"], metrics["shipped"]
  assert "Seen and held-out" not in report.write_html(tmp_path / "plain.html", data).read_text()
