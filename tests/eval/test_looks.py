"""The "does the VLLM learn to look" comparison: the table built from hand-made accuracy.json
files, launch/vllm_looks.sh's commands (run against a stand-in python that records them), and
train-vllm's num_steps=0 (the untrained control) saving the initial weights as checkpoint 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lego_jax import config as config_lib
from lego_jax.data import tokenizer
from lego_jax.data.prompts import chat_prompt, human_turn
from lego_jax.eval import looks
from lego_jax.train import vllm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "vllm_looks.sh"

ACCURACY = {
    "untrained": {"location": 0.0, "hand": 0.0, "object": 0.0, "num": 64, "exact": 0.0},
    "trained": {"location": 0.875, "hand": 0.8125, "object": 0.96875, "num": 64, "exact": 0.25},
    "text_only": {"location": 0.34375, "hand": 0.5625, "object": 0.9375, "num": 64, "exact": 0.0},
}


def write_accuracies(workdir: Path, split: str = "test", runs=ACCURACY) -> None:
  for run, acc in runs.items():
    p = looks.accuracy_path(workdir, run, split)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(acc))


def test_compare_rows_chance_and_margin():
  c = looks.compare(ACCURACY)
  assert [r["run"] for r in c["rows"]] == ["untrained", "trained", "text_only"]
  trained = c["rows"][1]
  assert trained == {"run": "trained", "label": "trained", "num": 64, "location": 0.875,
                     "hand": 0.8125, "object": 0.96875, "exact": 0.25}
  assert c["chance"] == {"location": 1 / 3, "hand": 0.5}
  # The better control is text-only for both: 0.875 - 0.34375, 0.8125 - 0.5625.
  assert c["trained_margin"] == pytest.approx({"location": 0.53125, "hand": 0.25})


def test_compare_margin_takes_the_better_control_per_rate():
  runs = {"untrained": dict(ACCURACY["untrained"], hand=0.7), "trained": ACCURACY["trained"],
          "text_only": ACCURACY["text_only"]}
  assert looks.compare(runs)["trained_margin"] == pytest.approx(
      {"location": 0.875 - 0.34375, "hand": 0.8125 - 0.7})
  # No trained run or no control: no margin, rows still listed.
  assert "trained_margin" not in looks.compare({"untrained": ACCURACY["untrained"]})
  with pytest.raises(ValueError, match="unknown runs"):
    looks.compare({"trained_twice": ACCURACY["trained"]})


def test_markdown_table():
  text = looks.markdown(looks.compare(ACCURACY), wall_s=1530)
  lines = text.splitlines()
  assert lines[0] == "Descriptions of the held-out `test` split naming the right ..."
  assert lines[2] == "| model | location | hand | object | exact | examples |"
  assert "| untrained (random init) | 0.0% | 0.0% | 0.0% | 0.0% | 64 |" in lines
  assert "| trained | 87.5% | 81.2% | 96.9% | 25.0% | 64 |" in lines
  assert "| text-only (zero image) | 34.4% | 56.2% | 93.8% | 0.0% | 64 |" in lines
  assert "| chance | 33.3% | 50.0% | - | - | |" in lines
  assert "trained minus the better control: location +53.1 points, hand +25.0 points" in lines
  assert lines[-1] == "wall time: 25.5 min"


def test_build_writes_json_and_markdown(tmp_path, capsys):
  write_accuracies(tmp_path)
  assert looks.main([str(tmp_path), "--wall_s=60"]) == 0
  printed = capsys.readouterr().out
  assert printed == (tmp_path / "looks.md").read_text()
  saved = json.loads((tmp_path / "looks.json").read_text())
  assert saved["split"] == "test" and saved["wall_s"] == 60.0
  assert [r["location"] for r in saved["rows"]] == [0.0, 0.875, 0.34375]
  assert saved["trained_margin"]["location"] == pytest.approx(0.53125)
  # Another split and output folder.
  write_accuracies(tmp_path, "val")
  out = tmp_path / "report"
  assert looks.main([str(tmp_path), "--split=val", f"--out={out}"]) == 0
  assert json.loads((out / "looks.json").read_text())["split"] == "val"
  write_accuracies(tmp_path, "train")
  assert looks.main([str(tmp_path), "--split=train", f"--out={out}"]) == 0
  assert (out / "looks.md").read_text().startswith("Descriptions of the training `train` split")


def test_missing_or_foreign_accuracy_is_a_clear_error(tmp_path, capsys):
  write_accuracies(tmp_path, runs={k: v for k, v in ACCURACY.items() if k != "text_only"})
  assert looks.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "text_only/features/test/accuracy.json does not exist" in err
  p = looks.accuracy_path(tmp_path, "text_only", "test")
  p.parent.mkdir(parents=True)
  p.write_text(json.dumps({"psnr": 12.0}))
  assert looks.main([str(tmp_path)]) == 2
  assert "lacks location, hand, object, num" in capsys.readouterr().err


def test_script_runs_the_three_models_on_shared_data(tmp_path):
  """The script against a stand-in python that logs each `-m lego_jax` command and does
  nothing; the table step runs for real on hand-made accuracy.json files."""
  log = tmp_path / "commands.txt"
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
if [ "$2" = lego_jax ]; then printf '%s\\n' "$*" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  workdir = tmp_path / "looks"
  write_accuracies(workdir)
  write_accuracies(workdir, "train", {k: dict(v, num=512) for k, v in ACCURACY.items()})
  env = dict(os.environ, PYTHON=str(fake))
  run = subprocess.run(["bash", str(SCRIPT), str(workdir), "--config.vllm_train.num_steps=7"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "| trained | 87.5% | 81.2% | 96.9% | 25.0% | 64 |" in run.stdout
  assert json.loads((workdir / "looks.json").read_text())["split"] == "test"
  assert json.loads((workdir / "train_split" / "looks.json").read_text())["rows"][1]["num"] == 512
  # The held-out table comes last, with the wall time.
  assert run.stdout.index("training `train` split") < run.stdout.index("held-out `test` split")
  assert run.stdout.rstrip().splitlines()[-1].startswith("wall time: ")
  commands = log.read_text().splitlines()
  data = (f"--config=configs/tiny.py --config.data.records_dir={workdir}/data/records "
          f"--config.data.tokenizer_dir={workdir}/data/tokenizer")
  steps = ("--config.data.synthetic.combination_rules=false --config.data.synthetic.holdout=() "
           "--config.data.synthetic.hand_swap=0 --config.data.synthetic.num_instruction=0 --config.vllm_train.num_steps=7")
  assert commands == [
      f"-m lego_jax prepare-data --config=configs/tiny.py --workdir={workdir}/data {steps}",
      # The run's own setting comes last, so it wins over the extra flags.
      f"-m lego_jax train-vllm --workdir={workdir}/untrained {data} {steps} "
      "--config.vllm_train.num_steps=0",
      f"-m lego_jax extract --workdir={workdir}/untrained {data} {steps} "
      "--config.vllm_train.num_steps=0",
      f"-m lego_jax train-vllm --workdir={workdir}/trained {data} {steps}",
      f"-m lego_jax extract --workdir={workdir}/trained {data} {steps}",
      f"-m lego_jax train-vllm --workdir={workdir}/text_only {data} {steps} "
      "--config.vllm_train.zero_image=true",
      f"-m lego_jax extract --workdir={workdir}/text_only {data} {steps} "
      "--config.vllm_train.zero_image=true",
  ]


def test_script_help():
  run = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
  assert run.returncode == 0
  assert run.stdout.startswith("Does the VLLM learn to look?")
  assert "launch/vllm_looks.sh [WORKDIR] [--config.section.key=value ...]" in run.stdout


def test_train_vllm_zero_steps_saves_the_initial_weights(tmp_path):
  # No records are read when nothing trains: a tokenizer is all train-vllm needs.
  lines = [chat_prompt(human_turn(a)) + " The right hand lifts it." for a in ("lift the cup",
                                                                           "cut the carrot")]
  tokenizer.train_tokenizer(lines * 8, tmp_path / "tokenizer", 128)
  cfg = config_lib.load("tiny", ["vllm_train.num_steps=0", "llama.num_layers=1",
                                 "clip_vision.num_layers=1"])
  assert vllm.num_train_steps(cfg, tmp_path) == 0
  vllm.train(cfg, tmp_path)
  ckpt = vllm.checkpointer(tmp_path)
  assert ckpt.all_steps() == [0]
  ckpt.close()
  assert vllm.trained_source(cfg, tmp_path) == "WORKDIR/checkpoints/vllm step 0"
  model, _ = vllm.load_trained(cfg, tmp_path, mesh=vllm.sharding.make_mesh(
      (-1, 1, 1), devices=jax.devices()[:1]))
  init = nnx.state(vllm.initialise(cfg), nnx.Param)
  loaded = nnx.state(model, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               loaded, init)
