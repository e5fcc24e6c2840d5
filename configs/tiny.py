"""The embedded default: the SAME pipeline as the paper's configs at a size that runs on 2 CPU
cores in minutes, on synthetic egocentric scenes the package generates itself (no downloads).

Model sections use the field names of each model's Config dataclass in lego_jax/models/.
"""

import pathlib

import ml_collections

from lego_jax import config


def get_config() -> ml_collections.ConfigDict:
  cfg = config.load(pathlib.Path(__file__).with_name("lego_ego4d.py"))
  cfg.name = "tiny"

  cfg.data.source = "synthetic"
  cfg.data.action_normalisation = "project"   # the demo's records as measured (see ldm_train)
  cfg.data.image_size = 64            # frames squashed to 64x64 for the LDM
  cfg.data.vllm_image_size = 32       # CLIP view for the VLLM
  # One object per scene: its place and so the acting hand are only in the frame (the VLLM must
  # look), without finding which of 2-4 objects the text names (docs/experiments/vllm-looks.md).
  # num_test 128: a standard error of ~0.02 on placement (64 frames left the goal inside it); the
  # first 64 are the frames the demo scored before (docs/experiments/heldout-combinations.md, Run 15).
  cfg.data.synthetic = dict(num_train=512, num_val=32, num_test=128, seed=0, frame_size=64,
                            objects=(1, 1))
  # The held-out-combinations world, where the paper makes its claim (the VLLM brings what the
  # LDM's pairs do not teach; docs/experiments/heldout-combinations.md): each verb-kind
  # combination has its own hand and, for "pick up", its own destination, stated only by the
  # descriptions; the LDM's pairs never show `holdout`'s combinations, while 512 instruction-only
  # frames (frame + action + description, no target) cover all of them. The test split alternates
  # held-out and seen combinations, and the demo scores the two groups apart.
  # Half the training pairs are done against the rule (the other hand; for "pick up" another
  # destination), as their descriptions state: the action label alone then does not fix the
  # effect, so the LDM learns to read the description (ldm_train.train_text_source below);
  # val and test keep the rules.
  # balance_poses: those swapped pick-ups are done in every (hand, destination) pose about
  # equally often, so the held-out pick-ups' poses (the hand lifting to its own side) are in the
  # pairs; without it they came from ~1.5% of them and the held-out pick-ups failed
  # (docs/experiments/heldout-combinations.md, Run 8).
  cfg.data.synthetic.update(combination_rules=True,
                            holdout=("stir bowl", "pick up pan", "pick up carrot"),
                            num_instruction=512, hand_swap=0.5, balance_poses=True)
  cfg.data.num_shards = 2
  # The synthetic descriptions say left/right and which hand: a flipped pair would contradict
  # its own text, so the embedded default does not flip (real LEGO data keeps the release's 0.5).
  cfg.data.hflip_prob = 0.0
  cfg.data.tokenizer_vocab_size = 512

  # No pretrained CLIP offline: the random tower trains with the VLLM (frozen="" below), its
  # position table at std 1 so patch features say where they are, the projector at 0.02x so H_i
  # enters near the text embeddings' norm; without these it did not look
  # (docs/experiments/vllm-looks.md).
  cfg.clip_vision.update(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                         image_size=32, patch_size=8, projection_dim=32, position_init_std=1.0)
  cfg.clip_text.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, max_position=77)
  cfg.llama.update(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=4, max_position=512)
  cfg.llava.update(vision_hidden=64, text_hidden=128, projector_init_scale=0.02)
  cfg.vae.update(block_out_channels=(16, 32, 32), layers_per_block=1, norm_groups=8)
  cfg.unet.update(block_out_channels=(64, 128), attention_levels=(True, True),
                  layers_per_block=1, num_heads=4, context_dim=64, norm_groups=16)
  cfg.conditioner.update(llm_dim=128, context_dim=64, num_heads=4, ffn_dim=128)

  # Batch 8: under half the time of 16, its reconstructions still well above what the briefly
  # trained LDM draws (docs/experiments/tiny-demo.md).
  cfg.vae_train.update(batch_size=8, num_steps=400, lr=2e-3, l2_weight=1.0, log_every=50,
                       ckpt_every=300)
  cfg.vllm_train.update(batch_size=16, grad_accum=1, num_steps=600, frozen="", lr=1e-3, max_length=160,
                        warmup_shape="linear",  # the demo as measured (see ldm_train below)
                        log_every=20, ckpt_every=100, compute_dtype="float32")
  cfg.vllm_generate.update(max_new_tokens=48, part_size=64, compute_dtype="float32")
  # cache_frozen: the frozen VAE and CLIP text run once, not in every step. scale_by_std: the
  # tiny VAE's latents are far from SD's scale, so LDM's 1/std rule gives the schedule unit-variance
  # data. 320 steps of 8 score as 400 of 16 did at less cost (docs/experiments/tiny-demo.md).
  # ema_scope "trained" (EMA of the conditioner too), postprocess / image_format below and
  # action_normalisation "project" keep the demo as it was measured (docs/experiments/tiny-demo.md).
  # v-prediction (Salimans & Ho 2022; the paper configs keep the release's epsilon): at 320 steps
  # it kept the scene 1.07 +- 0.21 dB better outside the action region (25.65 dB, 0.57 below the
  # VAE's ceiling), placement +0.014 +- 0.007; min-SNR-5 measured no gain
  # (docs/experiments/ldm-learning-options.md).
  cfg.ldm_train.update(batch_size=8, grad_accum=1, num_steps=320, lr=5e-4, ema_decay=0.999,
                       ema_scope="trained",
                       log_every=40, ckpt_every=160, sample_every=160, init="random",
                       scale_by_std=True, cache_frozen=True, prediction_type="v_prediction",
                       # The training pairs' own descriptions (they state swapped hands);
                       # sampling reads the VLLM's R (text_source "generated") as LEGO does.
                       train_text_source="annotation")
  # Guidance off and clamped output: on the briefly trained tiny LDM, the paper's 7.5 / 1.5 and
  # per-image min-max stretched errors into washed-out frames (docs/experiments/tiny-demo.md).
  # Lossless PNGs and the project's post-processing order keep the demo's frames (and its
  # published scores) as they were; the paper configs write as the release does.
  cfg.sampler.update(num_steps=20, text_guidance=1.0, image_guidance=1.0, output_norm="clamp",
                     postprocess="project", image_format="png")
  cfg.mesh.shape = (-1, 1, 1)
  # `lego-jax demo` (lego_jax/demo.py): scale multiplies every training stage's steps (0.05 for a
  # quick look), num_test limits the held-out frames generated (0: all), grid_rows the report's.
  # shipped_sampler: how the demo's shipped block samples the shipped LDMs (lego_jax/assets/tiny,
  # 8800 steps, the last 1600 annealed): DDIM without guidance from the input frame's latent
  # noised to 90% of the way (an SDEdit start, the last 18 of 20 steps), each decoded frame's
  # colour then shifted onto the input's (colour_match="median"): the setting of a 3x3 grid
  # (strength 0.8-1, image guidance 1-1.5, colour-matched) farthest inside all three of issue
  # 16's goals (scene within 1 dB of the VAE's ceiling, hand hit >= 0.6, placement >= 0.3), in
  # standard errors, on a dev split (data.synthetic.seed=1; docs/experiments/
  # heldout-combinations.md, Runs 17-18). The from-scratch LDMs sample with cfg.sampler above.
  cfg.demo = dict(scale=1.0, num_test=0, grid_rows=8,
                  shipped_sampler=dict(kind="ddim", image_guidance=1.0, strength=0.9,
                                       colour_match="median"))
  return cfg
