"""launch/gpu_bench.sh's memory comparison: a bench run meets the plan row of the same program
(config, stage, micro-batch per device) and the table says both compilers' numbers."""

import json

from lego_jax.bench import vs_plan

GIB = 2**30


def _plan_row(stage, micro, target="h100-80g-x8", compiler="gpu", **extra):
  return {"stage": stage, "target": target, "compiler": compiler, "mesh": {"data": 8, "fsdp": 1,
          "tensor": 1}, "micro_batch_per_device": micro,
          "bytes_per_device": {"arguments": 14 * GIB, "outputs": 13 * GIB, "aliased": 13 * GIB,
                               "temporaries": 40 * GIB, "peak": 54 * GIB}, **extra}


def test_pairs_and_table(tmp_path, capsys):
  plan = {"config": "lego_ego4d", "rows": [
      _plan_row("ldm", 32.0, compiler_options={"xla_gpu_enable_triton_gemm": False}),
      _plan_row("ldm", 16.0), _plan_row("sample", 4.0), _plan_row("vae", 8.0),
      _plan_row("ldm", 32.0, target="tpu-v5p-8", compiler="tpu"),
      {"stage": "ldm", "target": "a100-40g-x8", "error": "does not compile"}]}
  ldm = {"bench": "ldm-train", "config": "lego_ego4d", "batch": 128, "num_devices": 1,
         "shapes": {"grad_accum": 4}, "peak_memory_bytes": 60 * GIB,
         "compiled_memory": {"argument_bytes": 14 * GIB, "temp_bytes": 30 * GIB,
                             "total_bytes": 45 * GIB}}
  other = [("sample_b32", {"bench": "sample", "config": "lego_ego4d", "batch": 32,
                           "num_devices": 1, "shapes": {}}),  # 32 frames: the plan has 4
           ("unet", {"bench": "unet-train", "config": "lego_ego4d", "batch": 32}),
           ("tiny_ldm", {**ldm, "config": "tiny"})]
  matched = vs_plan.pairs([("ldm_run", ldm)] + other, plan)
  assert [(name, row["micro_batch_per_device"], row["target"]) for name, _, row in matched] == [
      ("ldm_run", 32.0, "h100-80g-x8")]  # GPU rows only, unless a target is named
  assert [row["target"] for _, _, row in vs_plan.pairs([("ldm_run", ldm)], plan, "tpu-v5p-8")] \
      == ["tpu-v5p-8"]
  table = vs_plan.lines(matched)
  assert len(table) == 3
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  assert cells[:3] == ["ldm_run", "ldm", "32"]
  assert cells[4] == "54.00 (14.00 + 40.00)" and cells[5] == "45.00 (14.00 + 30.00)"
  assert cells[6] == "60.00" and cells[7] == f"{45 / 54:.2f}"
  assert "xla_gpu_enable_triton_gemm" in cells[3]

  # The command: results from a directory, the plan from a file; nothing to pair is exit 1.
  for name, r in [("ldm_run", ldm)] + other:
    (tmp_path / f"{name}.json").write_text(json.dumps(r))
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  assert vs_plan.main(["vs_plan", str(tmp_path), str(tmp_path / "plan.json")]) == 0
  assert "| ldm_run | ldm | 32 |" in capsys.readouterr().out
  (tmp_path / "ldm_run.json").unlink()
  assert vs_plan.main(["vs_plan", str(tmp_path), str(tmp_path / "plan.json")]) == 1
  assert vs_plan.main(["vs_plan", str(tmp_path), str(tmp_path / "missing.json")]) == 1
  assert vs_plan.main(["vs_plan"]) == 2


def test_refused_rows_are_skipped():
  # libtpu's out-of-HBM refusal (plan.hbm_refusal): a row with the stage and micro-batch but no
  # compiled program, so no bytes to compare.
  refused = {"stage": "ldm", "target": "tpu-v6e-8", "compiler": "tpu",
             "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "micro_batch_per_device": 32.0,
             "refused": {"required_bytes": 40 * GIB, "available_bytes": 31 * GIB,
                         "required_for": "HLO temporaries", "message": "Ran out of memory"},
             "fits": False}
  plan = {"config": "lego_ego4d", "rows": [refused, {**refused, "compiler": "gpu",
                                                     "target": "h100-80g-x8"}]}
  ldm = {"bench": "ldm-train", "config": "lego_ego4d", "batch": 128, "num_devices": 1,
         "shapes": {"grad_accum": 4}}
  assert vs_plan.pairs([("ldm_run", ldm)], plan, "tpu-v6e-8") == []
  assert vs_plan.pairs([("ldm_run", ldm)], plan) == []
  compiled = _plan_row("ldm", 32.0, target="tpu-v6e-8", compiler="tpu")
  plan["rows"].append(compiled)
  assert [row for _, _, row in vs_plan.pairs([("ldm_run", ldm)], plan, "tpu-v6e-8")] == [compiled]
