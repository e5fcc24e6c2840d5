"""LEGO on Ego4D: every setting of the paper (and, behind switches, of the PyTorch release).

Full model sizes: LLaVA on LLaMA-2-13B-chat with a CLIP ViT-L/14 tower and a linear projector;
Stable Diffusion 1.5 UNet widened to 8 input channels, KL-f8 VAE, CLIP ViT-L/14 text encoder.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.name = "lego_ego4d"
  cfg.seed = 42

  cfg.data = dict(
      source="lego_json",             # "synthetic" or "lego_json" (the release's annotation format)
      dataset="ego4d",                # ego4d: "#C C cuts ..." narrations are normalised
      action_normalisation="release",  # the release's rule (first word lemmatised, rest verbatim);
                                      #   "project": also verbs after "and", "#unsure" dropped
      annotation_train="",            # path to the LEGO train annotation JSON
      annotation_val="",              # optional held-out split (the release has none)
      annotation_test="",             # path to the LEGO test (official val) annotation JSON
      frames_dir="",                  # directory of the release's JPEG frames
      metadata="",                    # optional metadata JSON (height/width per clip)
      llava_train="",                 # LLaVA conversation JSONs: train is the GPT-curated
      llava_val="",                   #   ego4d_for_tuning_forecasting.json (the release's
      llava_test="",                  #   scripts/download_gpt_curated_data.sh); required unless
      instructions="gpt_curated",     #   "released_vllm_outputs": targets built from the
                                      #   annotation's llava_forecast_finetune (the released
                                      #   VLLM's outputs; held-out splits always are)
      records_dir="",                 # ArrayRecord output; default WORKDIR/records
      num_shards=64,
      max_bad_fraction=0.01,          # conversion fails if more records than this are broken
      image_size=256,                 # LDM frames: LANCZOS squash to 256x256
      vllm_image_size=224,            # CLIP view: bicubic short side 224, center crop 224
      hflip_prob=0.5,                 # joint flip of input and target
      num_workers=2,
      synthetic=dict(num_train=0, num_val=0, num_test=0, seed=0, frame_size=256, objects=(2, 4)),
      tokenizer_dir="",               # LLaMA SentencePiece tokenizer directory (local)
      clip_tokenizer_dir="",          # CLIP BPE tokenizer directory (local)
      tokenizer_vocab_size=32000,
  )

  # CLIP ViT-L/14 @224 vision tower: 303,179,776 params.
  cfg.clip_vision = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                         image_size=224, patch_size=14, layer_norm_eps=1e-5, select_layer=-2,
                         projection_dim=768, position_init_std=0.02)
  # CLIP ViT-L/14 text encoder: 123,060,480 params.
  cfg.clip_text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12,
                       num_heads=12, max_position=77, layer_norm_eps=1e-5)
  # LLaMA-2-13B-chat: 13,015,864,320 params.
  cfg.llama = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                   num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position=4096, tie_embeddings=False)
  # LLaVA glue: ONE linear layer 1024 -> 5120 in LEGO ("mlp2x_gelu" is LLaVA-1.5's).
  cfg.llava = dict(projector="linear", vision_hidden=1024, text_hidden=5120,
                   projector_init_scale=1.0)
  # SD KL-f8 VAE: 83,653,863 params.
  cfg.vae = dict(in_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_groups=32, scaling_factor=0.18215)
  # SD-1.5 UNet with 8 input channels: 859,532,484 params.
  cfg.unet = dict(in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  attention_levels=(True, True, True, False), layers_per_block=2, num_heads=8,
                  transformer_depth=1, context_dim=768, norm_groups=32)
  # LEGO conditioner: proj_img, proj_txt (5120 -> 768) and a 2-layer pre-LN transformer encoder.
  cfg.conditioner = dict(llm_dim=5120, context_dim=768, text_len=77, num_heads=8, ffn_dim=2048,
                         num_layers=2, dropout=0.1)

  # The paper uses SD-1.5's pretrained VAE (init_checkpoint); train-vae trains one from scratch.
  cfg.vae_train = dict(batch_size=64, num_steps=50000, lr=4.5e-6, warmup_ratio=0.0,
                       weight_decay=0.0, kl_weight=1e-6, l2_weight=0.0, log_every=50,
                       ckpt_every=1000, skip_nonfinite=False, init_checkpoint="")
  cfg.vllm_train = dict(
      batch_size=128, grad_accum=8, epochs=3, num_steps=-1, lr=2e-5, weight_decay=0.0,
      warmup_ratio=0.03, schedule="constant",  # the release's DeepSpeed config: warmup then constant
      warmup_shape="log",             # DeepSpeed WarmupLR's default (log(k) / log(W)); "linear"
      max_length=2048, frozen=r"^vision/.*", remat=True, skip_nonfinite=False, log_every=10,
      ckpt_every=500,
      compute_dtype="bfloat16",       # bf16 compute, fp32 master weights and optimizer state
      grad_clip=1.0,                  # HF Trainer's max_grad_norm, which the release kept
      init_checkpoint="",             # LLaVA weights (any layout of lego_jax/models/llava.py)
      vision_checkpoint="",           # CLIP ViT-L/14 files when init_checkpoint holds no tower
      zero_image=False)               # ablation: image features zeroed (a text-only model)
  cfg.vllm_generate = dict(temperature=0.2, top_p=1.0, top_k=50, greedy=False, max_new_tokens=1024,
                           seed=42, batch_size=16, feature_dtype="float16", part_size=1000,
                           compute_dtype="bfloat16",
                           # per-layer weight copies in the decode loop: XLA:GPU copies each
                           # layer out of the stacked weights every step otherwise (one more
                           # copy of the blocks' weights in memory; False: the stacked scan)
                           unstack_layers=True)
  cfg.ldm_train = dict(
      batch_size=1024, grad_accum=4, num_steps=20000, lr=1e-4, weight_decay=0.01,
      lr_schedule="constant",         # the release's; "cosine": to 0 over num_steps, logged as lr
      b1=0.9, b2=0.999, eps=1e-8, ema_decay=0.9999, train_projections=True,
      ema_scope="unet",               # the release's LitEma(model): UNet only ("trained": all)
      use_image_embedding=True, use_text_embedding=True,
      text_source="generated",        # CLIP text of: "generated" R, "annotation", or "action"
      train_text_source="",           # in training pairs, if not text_source (tiny: annotation)
      drop_text_prob=0.05, drop_both_prob=0.05, drop_image_prob=0.05, remat=True,
      cache_frozen=False, scale_by_std=False, init="sd15", init_checkpoint="", init_use_ema=True,
      skip_nonfinite=False, log_every=50, ckpt_every=1000,
      sample_every=1000, num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      # Learning-efficiency options, off as in the release (lego_jax/infer/schedule.py):
      prediction_type="epsilon",      # or "v_prediction" (Salimans & Ho 2022)
      min_snr_gamma=0.0,              # > 0: min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5
      zero_terminal_snr=False)        # Lin et al. 2024 (needs v_prediction)
  # postprocess="release": bicubic resize of the float image, min-max, truncation (metrics/
  # inference.py); "project": min-max, rounding, PIL bicubic. image_format="release": each frame
  # under image_1's name (.jpg: JPEG at PIL's default quality 75, as the release saved them);
  # "png": lossless. Output size: height data.image_size, width round(W / H * height).
  # strength < 1: an SDEdit start from the input frame's noised latent (Meng et al. 2022), only
  # the last floor(num_steps * strength) steps run; 1 (the release) starts from pure noise.
  # colour_match="median": each decoded frame shifted by the per-channel median of (input -
  # frame), undoing a whole-frame colour drift (infer/ldm.py, match_colour); "none": the release.
  cfg.sampler = dict(kind="euler_ancestral", num_steps=100, text_guidance=7.5, image_guidance=1.5,
                     strength=1.0, colour_match="none", seed=0, use_ema=True, output_norm="minmax",
                     postprocess="release", image_format="release")
  # blip_b / blip_l also need --edit_file (the annotation JSON with the enriched descriptions).
  # lpips_release_range=True: LPIPS on [0, 1] inputs, as the release computed the paper's column
  # (False: the lpips package's [-1, 1]; the table marks such rows).
  cfg.eval = dict(metrics=("psnr", "lpips", "fid", "clip", "egovlp", "egovlp_plus", "blip_b",
                           "blip_l"),
                  lpips_net="alex", lpips_release_range=True, egovlp_frames=4, weights_dir="")
  cfg.mesh = dict(shape=(-1, 1, 1))   # (data, fsdp, tensor); -1 takes the remaining devices
  cfg.checkpoint = dict(keep=3, async_save=True)
  return cfg
