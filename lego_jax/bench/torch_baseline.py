"""The PyTorch baselines of `lego-jax bench --baseline=torch`: what a user would run instead.

Every bench's reference is built at the SAME shapes from the same config sections, with random
weights (speed does not depend on their values):

  unet-train   diffusers UNet2DConditionModel (SD-1.x topology, 8 input channels), AdamW on the
               eps-MSE, fresh timesteps and noise each step.
  ldm-train    the LEGO release's step: diffusers AutoencoderKL (frozen: mode of the input, sample
               of the target), transformers CLIPTextModel (frozen), the conditioner as
               torch.nn (Linear projections + TransformerEncoder, pre-LN, relu), classifier-free
               dropout, the UNet, AdamW over UNet + conditioner.
  vllm-train   transformers LlavaForConditionalGeneration (CLIP tower frozen; its projector is
               LLaVA-1.5's 2-layer MLP where LEGO's is one Linear: < 0.1% of the FLOPs), labels
               masked as ours, AdamW; gradient checkpointing when remat is on.
  vllm-decode  transformers LlamaForCausalLM.generate with output_hidden_states (how the release
               gets H_t), min_new_tokens = max_new_tokens so every row makes the same count.
  sample       the UNet, VAE, CLIP text and conditioner above in k-diffusion's Euler-ancestral
               loop with the 3-way dual-guidance batch, sigmas from lego_jax's schedule.

Precision: the bench's compute dtype; bfloat16 runs under torch.autocast with fp32 master weights
for training (as the anchors' "bf16 autocast"), bf16 weights for inference. `compiled=True`
wraps the networks in torch.compile (the optimizer stays eager).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from lego_jax.bench.harness import Impl
from lego_jax.bench.workloads import context_length, latent_size, num_patches
from lego_jax.models import lego_ldm


@dataclasses.dataclass(frozen=True)
class Spec:
  what: str
  cfg: Any
  batch: int
  dtype: str              # "float32" | "bfloat16"
  remat: bool
  seq_len: int
  prompt_len: int
  new_tokens: int
  sample_steps: int
  threads: int
  device: str             # "cpu" | "cuda"


def compile_supported(what: str) -> bool:
  # transformers' generate recompiles per cache length unless its static cache is used, which
  # is a different program from what the release runs; decode is timed eager only.
  return what != "vllm-decode"


def _torch():
  import torch  # optional (the torch extra): only --baseline=torch needs it

  return torch


def _sync(spec: Spec) -> None:
  if spec.device == "cuda":
    _torch().cuda.synchronize()


def _autocast(spec: Spec):
  torch = _torch()
  if spec.dtype == "bfloat16":
    return torch.autocast(device_type=spec.device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def _dtype(spec: Spec):
  torch = _torch()
  return torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32


# --- networks ---------------------------------------------------------------------------------


def diffusers_unet(cfg):
  from diffusers import UNet2DConditionModel  # optional: only --baseline=torch needs it

  u = cfg.unet
  attention = tuple(bool(a) for a in u.attention_levels)
  return UNet2DConditionModel(
      sample_size=32, in_channels=u.in_channels, out_channels=u.out_channels,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(attention)),
      block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
      cross_attention_dim=u.context_dim, attention_head_dim=u.num_heads,  # = heads (SD quirk)
      transformer_layers_per_block=u.transformer_depth, norm_num_groups=u.norm_groups)


def diffusers_vae(cfg):
  from diffusers import AutoencoderKL  # optional: only --baseline=torch needs it

  v = cfg.vae
  n = len(v.block_out_channels)
  return AutoencoderKL(
      in_channels=v.in_channels, out_channels=v.in_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
      latent_channels=v.latent_channels, norm_num_groups=v.norm_groups,
      scaling_factor=v.scaling_factor)


def clip_text_model(cfg):
  import transformers  # optional: only --baseline=torch needs it

  c = cfg.clip_text
  return transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      max_position_embeddings=c.max_position, layer_norm_eps=c.layer_norm_eps))


def conditioner_module(cfg):
  """LEGO's projection_img / projection_txt / self_attn_mix as the release builds them."""
  torch = _torch()
  c = cfg.conditioner

  class Conditioner(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.proj_img = torch.nn.Linear(c.llm_dim, c.context_dim)
      self.proj_txt = torch.nn.Linear(c.llm_dim, c.context_dim)
      layer = torch.nn.TransformerEncoderLayer(c.context_dim, c.num_heads, c.ffn_dim, c.dropout,
                                               activation="relu", batch_first=True,
                                               norm_first=True)
      self.mix = torch.nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)

    def forward(self, h_img, h_txt):
      return self.proj_img(h_img), self.mix(self.proj_txt(h_txt))

  return Conditioner()


def _alphas_cumprod(cfg):
  return lego_ldm.schedule_of(cfg).alphas_cumprod


# --- benches ----------------------------------------------------------------------------------


def build(spec: Spec, compiled: bool):
  """The `Impl` of one baseline (torch is imported here: only --baseline=torch needs it)."""
  torch = _torch()
  if spec.device == "cpu":
    torch.set_num_threads(spec.threads)
  torch.manual_seed(0)
  builder = {"unet-train": _unet_train, "ldm-train": _ldm_train, "vllm-train": _vllm_train,
             "vllm-decode": _vllm_decode, "sample": _sample}[spec.what]
  if spec.device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  step, modules = builder(spec, compiled)
  name = "torch_compile" if compiled else "torch_eager"
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "precision": "bf16 autocast" if spec.dtype == "bfloat16" else "fp32"}

  def timed_step():
    step()
    _sync(spec)
    if spec.device == "cuda":
      info["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())

  def close():
    modules.clear()
    if spec.device == "cuda":
      torch.cuda.empty_cache()

  return Impl(name, timed_step, info=info, close=close, compiles_on_first_call=compiled)


def _compile(module, compiled: bool):
  return _torch().compile(module) if compiled else module


def _unet_train(spec: Spec, compiled: bool):
  torch = _torch()
  cfg, dev, b = spec.cfg, spec.device, spec.batch
  unet = diffusers_unet(cfg).to(dev).train()
  net = _compile(unet, compiled)
  opt = torch.optim.AdamW(unet.parameters(), lr=cfg.ldm_train.lr,
                          weight_decay=cfg.ldm_train.weight_decay)
  size, half = latent_size(cfg), cfg.unet.out_channels
  target = torch.randn(b, half, size, size, device=dev)
  cond = torch.randn(b, cfg.unet.in_channels - half, size, size, device=dev)
  context = torch.randn(b, context_length(cfg), cfg.unet.context_dim, device=dev)
  acp = torch.as_tensor(_alphas_cumprod(cfg), device=dev)

  def step():
    t = torch.randint(0, len(acp), (b,), device=dev)
    noise = torch.randn_like(target)
    a = acp[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * target + (1 - a).sqrt() * noise
    with _autocast(spec):
      eps = net(torch.cat([noisy, cond], dim=1), t, context).sample
    loss = torch.nn.functional.mse_loss(eps.float(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step, [unet, net, opt]


def _ldm_train(spec: Spec, compiled: bool):
  torch = _torch()
  cfg, dev, b = spec.cfg, spec.device, spec.batch
  t_cfg = cfg.ldm_train
  unet = diffusers_unet(cfg).to(dev).train()
  vae = diffusers_vae(cfg).to(dev).eval().requires_grad_(False)
  clip = clip_text_model(cfg).to(dev).eval().requires_grad_(False)
  cond = conditioner_module(cfg).to(dev).train()
  net, vae_c, clip_c, cond_c = (_compile(m, compiled) for m in (unet, vae, clip, cond))
  params = list(unet.parameters()) + (list(cond.parameters()) if t_cfg.train_projections else [])
  opt = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  images_in = torch.rand(b, 3, size, size, device=dev) * 2 - 1
  images_out = torch.rand(b, 3, size, size, device=dev) * 2 - 1
  ids = torch.randint(1, vocab, (b, text_len), device=dev)
  empty = torch.randint(1, vocab, (1, text_len), device=dev)
  h_img = torch.randn(b, num_patches(cfg), llm, device=dev)
  h_txt = torch.randn(b, text_len, llm, device=dev)
  acp = torch.as_tensor(_alphas_cumprod(cfg), device=dev)
  scale = cfg.vae.scaling_factor

  def step():
    with torch.no_grad(), _autocast(spec):
      input_latent = vae_c.encode(images_in).latent_dist.mode()
      target = vae_c.encode(images_out).latent_dist.sample() * scale
      text = clip_c(ids).last_hidden_state
      empty_text = clip_c(empty).last_hidden_state
    r = torch.rand(b, device=dev)
    drop_text = r < t_cfg.drop_text_prob + t_cfg.drop_both_prob
    drop_image = (r >= t_cfg.drop_text_prob) & (
        r < t_cfg.drop_text_prob + t_cfg.drop_both_prob + t_cfg.drop_image_prob)
    keep = (~drop_text).float().view(b, 1, 1)
    with _autocast(spec):
      img_tokens, txt_tokens = cond_c(h_img, h_txt)
      text = torch.where(drop_text.view(b, 1, 1), empty_text.expand_as(text), text)
      context = torch.cat([text, img_tokens * keep, txt_tokens * keep], dim=1)
      input_latent = input_latent * (~drop_image).float().view(b, 1, 1, 1)
      t = torch.randint(0, len(acp), (b,), device=dev)
      noise = torch.randn_like(target, dtype=torch.float32)
      a = acp[t].view(b, 1, 1, 1)
      noisy = a.sqrt() * target.float() + (1 - a).sqrt() * noise
      eps = net(torch.cat([noisy, input_latent.float()], dim=1), t, context).sample
    loss = torch.nn.functional.mse_loss(eps.float(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step, [unet, vae, clip, cond, net, vae_c, clip_c, cond_c, opt]


def llava_model(spec: Spec):
  import transformers  # optional: only --baseline=torch needs it

  cfg = spec.cfg
  v, l = cfg.clip_vision, cfg.llama
  image_token = l.vocab_size - 1  # a real id: transformers embeds input ids before the merge
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
          num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
          image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.projection_dim,
          layer_norm_eps=v.layer_norm_eps),
      text_config=llama_config(cfg), image_token_index=image_token,
      image_seq_length=num_patches(cfg), vision_feature_layer=-2,
      vision_feature_select_strategy="default")
  return transformers.LlavaForConditionalGeneration(config), image_token


def llama_config(cfg):
  import transformers  # optional: only --baseline=torch needs it

  l = cfg.llama
  return transformers.LlamaConfig(
      vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
      num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
      num_key_value_heads=l.num_kv_heads, rms_norm_eps=l.rms_norm_eps,
      rope_theta=l.rope_theta, max_position_embeddings=l.max_position,
      tie_word_embeddings=l.tie_embeddings)


def _vllm_train(spec: Spec, compiled: bool):
  torch = _torch()
  cfg, dev, b, t = spec.cfg, spec.device, spec.batch, spec.seq_len
  model, image_token = llava_model(spec)
  model = model.to(dev).train()
  model.model.vision_tower.requires_grad_(False)
  if spec.remat:
    model.gradient_checkpointing_enable()
  net = _compile(model, compiled)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                          lr=cfg.vllm_train.lr, weight_decay=cfg.vllm_train.weight_decay)
  patches = num_patches(cfg)
  ids = torch.randint(1, cfg.llama.vocab_size - 1, (b, t), device=dev)
  ids[:, 4:4 + patches] = image_token
  labels = ids.clone()
  labels[:, :max(patches + 4, (2 * t) // 3)] = -100
  size = cfg.clip_vision.image_size
  pixels = torch.randn(b, 3, size, size, device=dev)

  def step():
    with _autocast(spec):
      loss = net(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], cfg.vllm_train.grad_clip or 1e9)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step, [model, net, opt]


def _vllm_decode(spec: Spec, compiled: bool):
  torch = _torch()
  import transformers  # optional: only --baseline=torch needs it

  cfg, dev, b = spec.cfg, spec.device, spec.batch
  g = cfg.vllm_generate
  model = transformers.LlamaForCausalLM(llama_config(cfg)).to(dev, _dtype(spec)).eval()
  ids = torch.randint(3, cfg.llama.vocab_size, (b, spec.prompt_len), device=dev)
  mask = torch.ones_like(ids)
  n = spec.new_tokens
  sampling = (dict(do_sample=False) if g.greedy else
              dict(do_sample=True, temperature=float(g.temperature), top_p=float(g.top_p),
                   top_k=int(g.top_k)))

  def step():
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, output_hidden_states=True,
                           return_dict_in_generate=True, pad_token_id=0, eos_token_id=2,
                           **sampling)
    assert out.sequences.shape[1] == spec.prompt_len + n, out.sequences.shape

  return step, [model]


def _sample(spec: Spec, compiled: bool):
  torch = _torch()
  cfg, dev, b = spec.cfg, spec.device, spec.batch
  dt = _dtype(spec)
  unet = diffusers_unet(cfg).to(dev, dt).eval()
  vae = diffusers_vae(cfg).to(dev, dt).eval()
  clip = clip_text_model(cfg).to(dev, dt).eval()
  cond = conditioner_module(cfg).to(dev, dt).eval()
  net = _compile(unet, compiled)
  schedule = lego_ldm.schedule_of(cfg)
  sigmas = np.asarray(schedule.get_sigmas(spec.sample_steps), np.float64)
  ts = np.asarray(schedule.sigma_to_t(jnp.asarray(sigmas[:-1], jnp.float32)), np.float64)
  size, text_len = cfg.data.image_size, cfg.conditioner.text_len
  vocab, llm = cfg.clip_text.vocab_size, cfg.conditioner.llm_dim
  images = (torch.rand(b, 3, size, size, device=dev) * 2 - 1).to(dt)
  ids = torch.randint(1, vocab, (b, text_len), device=dev)
  empty = torch.randint(1, vocab, (1, text_len), device=dev)
  h_img = torch.randn(b, num_patches(cfg), llm, device=dev, dtype=dt)
  h_txt = torch.randn(b, text_len, llm, device=dev, dtype=dt)
  s = cfg.sampler
  scale = cfg.vae.scaling_factor

  def step():
    with torch.no_grad():
      image_latent = vae.encode(images).latent_dist.mode()
      text = clip(ids).last_hidden_state
      img_tokens, txt_tokens = cond(h_img, h_txt)
      cond_ctx = torch.cat([text, img_tokens, txt_tokens], dim=1)
      uncond = torch.cat([clip(empty).last_hidden_state.expand_as(text),
                          torch.zeros_like(img_tokens), torch.zeros_like(txt_tokens)], dim=1)
      ctx3 = torch.cat([cond_ctx, uncond, uncond])
      img3 = torch.cat([image_latent, image_latent, torch.zeros_like(image_latent)])
      x = torch.randn(b, cfg.unet.out_channels, *image_latent.shape[2:], device=dev) * sigmas[0]
      for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c_in = 1.0 / (sigma ** 2 + 1.0) ** 0.5
        x3 = torch.cat([x, x, x]) * c_in
        t = torch.full((3 * b,), ts[i], device=dev)
        eps = net(torch.cat([x3.to(dt), img3.to(dt)], dim=1), t, ctx3).sample.float()
        e_ti, e_0i, e_00 = eps.chunk(3)
        guided = e_00 + s.text_guidance * (e_ti - e_0i) + s.image_guidance * (e_0i - e_00)
        denoised = x - sigma * guided
        sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                    / sigma ** 2) ** 0.5)
        sigma_down = max(sigma_next ** 2 - sigma_up ** 2, 0.0) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
          x = x + torch.randn_like(x) * sigma_up
      vae.decode((x / scale).to(dt)).sample

  return step, [unet, vae, clip, cond, net]
