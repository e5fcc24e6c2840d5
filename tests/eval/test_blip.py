"""BLIP captioner parity against transformers' BlipForConditionalGeneration (small random config,
saved with save_pretrained and, renamed, as an original BLIP checkpoint), greedy and beam
captions token for token, full-size parameter counts, and the BLIP-B / BLIP-L scores end to end
in `lego-jax evaluate` against a hand computation with the torch models."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from PIL import Image

from lego_jax.eval import blip
from lego_jax.eval import evaluate as ev
from helpers import rel_max

WORDS = ["a", "picture", "of", "person", "cut", "the", "carrot", "knife", "board", "hand", "left",
         "right", "pick", "up", "bowl", "open", "door", "pan", "stir", "on", "table", "with"]


def _vocab(path):
  """A 120-entry BERT vocabulary with BERT's special ids (0, 100-103) and [DEC] at 104."""
  toks = ["[PAD]"] + WORDS + [f"w{i}" for i in range(100 - 1 - len(WORDS))]
  toks += ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + [f"##s{i}" for i in range(15)]
  assert len(toks) == 120 and toks.index("[SEP]") == 102
  path.write_text("\n".join(toks) + "\n")
  return path


def _tokenizer(d):
  d.mkdir(parents=True, exist_ok=True)
  tok = transformers.BertTokenizer(str(_vocab(d / "vocab.txt")), bos_token="[DEC]")
  tok.save_pretrained(str(d))
  return tok


def _shake(model, scale):
  """Random weights of a useful size: the default init makes near-flat logits (argmax ties)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model


def _small_blip():
  cfg = transformers.BlipConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      text_config=dict(vocab_size=120, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=32, bos_token_id=104,
                       sep_token_id=102, pad_token_id=0, encoder_hidden_size=32))
  torch.manual_seed(0)
  model = _shake(transformers.BlipForConditionalGeneration(cfg).eval(), 0.3)
  # A tied head makes a small random decoder repeat its input token forever. Large position
  # embeddings vary the next token with the step, and a raised [SEP] logit ends some captions
  # early: decoding then meets EOS at several lengths and beam search differs from greedy.
  emb = model.text_decoder.bert.embeddings
  with torch.no_grad():
    torch.manual_seed(5)
    emb.position_embeddings.weight.copy_(6.0 * torch.randn_like(emb.position_embeddings.weight))
    emb.word_embeddings.weight.copy_(torch.randn_like(emb.word_embeddings.weight))
    model.text_decoder.cls.predictions.bias.zero_()
    model.text_decoder.cls.predictions.bias[102] = 7.0
  return model


def _to_original(sd):
  """transformers names -> original BLIP (timm ViT) names, as model_*_caption*.pth hold them."""
  subs = [(r"^vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
          (r"^vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
          (r"^vision_model\.embeddings\.patch_embedding", "visual_encoder.patch_embed.proj"),
          (r"^vision_model\.encoder\.layers\.", "visual_encoder.blocks."),
          (r"^vision_model\.post_layernorm", "visual_encoder.norm"),
          (r"\.self_attn\.projection", ".attn.proj"), (r"\.self_attn\.qkv", ".attn.qkv"),
          (r"\.layer_norm1", ".norm1"), (r"\.layer_norm2", ".norm2")]
  out = {}
  for k, v in sd.items():
    for a, b in subs:
      k = re.sub(a, b, k) if k.startswith(("vision_model", "visual_encoder")) else k
    out[k] = v
  return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  torch.set_num_threads(1)
  d = tmp_path_factory.mktemp("blip")
  ref = _small_blip()
  ref.save_pretrained(d / "blip-image-captioning-base")
  tok = _tokenizer(d / "blip-image-captioning-base")
  ours, path = blip.build_blip(str(d), "blip_b")
  assert path.name == "blip-image-captioning-base"
  return ref, ours, tok, d


def _pixels(seed, n=2):
  return np.random.default_rng(seed).normal(0, 1, (n, 32, 32, 3)).astype(np.float32)


def _torch_px(x):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_logits_parity_both_layouts(small, tmp_path):
  ref, ours, _, _ = small
  x = _pixels(1)
  ids = np.array([[104, 1, 2, 3, 17, 9, 44], [104, 1, 2, 3, 5, 6, 108]], np.int64)
  with torch.no_grad():
    want = ref(pixel_values=_torch_px(x), input_ids=torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(nnx.jit(lambda m, p, i: m(p, i))(ours, x, ids))
  assert got.shape == want.shape == (2, 7, 120)
  assert rel_max(got, want) <= 1e-4
  # The original BLIP checkpoint layout (under "model", timm ViT names, LayerNorm eps 1e-6).
  sd = _to_original(ref.state_dict())
  torch.save({"model": sd}, tmp_path / "model_large_caption.pth")
  orig, _ = blip.build_blip(str(tmp_path), "blip_l", vision_eps=1e-5, vision_heads=2,
                            text_heads=2)   # heads: not in the file; 64 per head assumed
  assert orig.cfg.vision_layers == 2 and orig.cfg.bos_token_id == 30522  # no config.json
  got2 = np.asarray(nnx.jit(lambda m, p, i: m(p, i))(orig, x, ids))
  np.testing.assert_allclose(got2, got, rtol=0, atol=1e-6)
  assert blip.config_from_state_dict({k: v.numpy() for k, v in sd.items()}).vision_eps == 1e-6


def _until_eos(row, eos=102):
  row = list(np.asarray(row))
  return row[:row.index(eos) + 1] if eos in row else row


def _release_beam_search(ref, pixels, prompt, k=3, max_length=20, min_length=5, eos=102):
  """transformers 4.19.2's beam search (BeamSearchScorer, length_penalty 1, early_stopping
  False), the generate() the release ran, written out over the torch model's logits."""
  out = []
  with torch.no_grad():
    images = ref.vision_model(pixel_values=pixels).last_hidden_state
    for image in images:
      ids, sums = torch.tensor([list(prompt)] * k), torch.tensor([0.0] + [-1e9] * (k - 1))
      pool, done = [], False   # (score, tokens without the EOS)

      def add(tokens, score):
        if len(pool) < k or score > min(s for s, _ in pool):
          pool.append((score, tokens))
          if len(pool) > k:
            pool.remove(min(pool, key=lambda h: h[0]))

      while True:
        logits = ref.text_decoder(input_ids=ids,
                                  encoder_hidden_states=image[None].expand(k, -1, -1)).logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        cur = ids.shape[1]
        if cur < min_length:
          logp[:, eos] = -float("inf")
        top, idx = (logp + sums[:, None]).reshape(-1).topk(2 * k)
        nxt = []
        for rank, (score, j) in enumerate(zip(top.tolist(), idx.tolist())):
          beam, tok = divmod(j, logp.shape[1])
          if tok == eos:
            if rank < k:
              add(ids[beam].tolist(), score / cur)
          else:
            nxt.append((score, beam, tok))
          if len(nxt) == k:
            break
        done = len(pool) == k and min(s for s, _ in pool) >= top.max().item() / cur
        ids = torch.cat([ids[[b for _, b, _ in nxt]], torch.tensor([[t] for _, _, t in nxt])], 1)
        sums = torch.tensor([s for s, _, _ in nxt])
        if done or ids.shape[1] >= max_length:
          break
      if not done:
        for tokens, score in zip(ids.tolist(), sums.tolist()):
          add(tokens, score / ids.shape[1])
      best = max(pool, key=lambda h: h[0])[1]
      out.append(best + [eos] if len(best) < max_length else best)
  return out


def test_captions_token_for_token(small):
  """Greedy and beam search (3 beams, max_length 20, min_length 5) vs generate(); the release's
  beam scoring vs transformers 4.19.2's algorithm written out."""
  ref, ours, tok, _ = small
  x = _pixels(2, n=6)
  prompt = blip.prompt_ids(tok, ours.cfg)
  assert prompt == (104, 1, 2, 3)   # [DEC] a picture of
  inputs = tok(["a picture of"] * 6, return_tensors="pt")
  got = {}
  for beams in (1, 3):
    with torch.no_grad():
      want = ref.generate(pixel_values=_torch_px(x), input_ids=inputs.input_ids,
                          attention_mask=inputs.attention_mask, num_beams=beams, do_sample=False,
                          max_length=20, min_length=5).numpy()
    got[beams] = blip.caption_tokens(ours, x, prompt, blip.DecodeSettings(
        num_beams=beams, beam_semantics="transformers"))
    assert got[beams].shape == (6, 20)
    for g, w in zip(got[beams], want):
      assert _until_eos(g) == _until_eos(w)
    texts = blip.decode_captions(tok, got[beams])
    assert texts == [tok.decode(w, skip_special_tokens=True)[len("a picture of"):] for w in want]
  # The case is not trivial: captions end at several lengths, beam search keeps a longer one.
  lengths = {len(_until_eos(g)) for g in got[3]}
  assert len(lengths) >= 3 and 20 in lengths
  assert any(_until_eos(a) != _until_eos(b) for a, b in zip(got[1], got[3]))

  release = blip.caption_tokens(ours, x, prompt, blip.DecodeSettings())   # the default
  want = _release_beam_search(ref, _torch_px(x), prompt)
  assert [_until_eos(g) for g in release] == want
  # ... and the two scorings disagree here (the release's favours shorter captions).
  assert sum(_until_eos(a) != _until_eos(b) for a, b in zip(release, got[3])) == 2


@pytest.mark.parametrize("vision", [dict(), dict(hidden_size=1024, num_hidden_layers=24,
                                                 num_attention_heads=16, intermediate_size=4096)])
def test_full_size_parameter_counts(vision):
  from lego_jax.weights.state import count_params

  width = vision.get("hidden_size", 768)
  cfg = transformers.BlipConfig(vision_config=dict(image_size=384, patch_size=16, **vision),
                                text_config=dict(encoder_hidden_size=width))
  with torch.device("meta"):
    ref = transformers.BlipForConditionalGeneration(cfg)
  want = sum(p.numel() for p in ref.parameters())   # tied LM head counted once
  ours = count_params(blip.abstract_blip(blip.BLIP_LARGE if vision else blip.BLIP_BASE))
  assert ours == want
  # 223,971,644 / 446,290,492: the hub's 247M / 470M also count the untied copy of the LM head.
  assert want == (446_290_492 if vision else 223_971_644)


def test_missing_weights_message(tmp_path):
  from lego_jax.eval.weight_files import MissingWeightsError

  with pytest.raises(MissingWeightsError) as e:
    blip.build_blip(str(tmp_path), "blip_l")
  msg = str(e.value)
  assert "blip-image-captioning-large" in msg and "model_large_caption.pth" in msg
  assert "Salesforce/blip-image-captioning-large" in msg and "\n" not in msg


# ---- the metric end to end ----

def _distilbert_egovlp(d):
  """A small EgoVLP checkpoint (text tower + txt_proj, plus a 1-layer video tower) and its
  distilbert tokenizer folder, in the release's file layout."""
  from lego_jax.eval import egovlp
  from lego_jax.weights.mapping import jax_to_torch
  from lego_jax.weights.state import param_shapes

  torch.manual_seed(3)
  text = _shake(transformers.DistilBertModel(transformers.DistilBertConfig(
      vocab_size=120, dim=64, n_layers=1, n_heads=1, hidden_dim=96,
      max_position_embeddings=64)).eval(), 0.1)
  proj = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 16))
  vcfg = egovlp.EgoVLPConfig(embed_dim=64, depth=1, num_heads=1, patch_size=8, image_size=32,
                             projection_dim=16, num_frames=4)
  rng = np.random.default_rng(0)
  video = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in jax_to_torch(
      {k: rng.normal(0, 0.1, s).astype(np.float32)
       for k, s in param_shapes(egovlp.abstract_egovlp(vcfg)).items()},
      egovlp.VIDEO_RULES).items()}
  sd = {**video, **{f"text_model.{k}": v for k, v in text.state_dict().items()},
        **{f"txt_proj.{k}": v for k, v in proj.state_dict().items()}}
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
             d / "egovlp.pth")
  tok_dir = d / "distilbert-base-uncased"
  tok_dir.mkdir()
  dtok = transformers.DistilBertTokenizer(str(_vocab(tok_dir / "vocab.txt")))
  dtok.save_pretrained(str(tok_dir))
  return text, proj, dtok


def test_blip_scores_in_evaluate(small, tmp_path):
  ref, _, tok, d = small
  text, proj, dtok = _distilbert_egovlp(d)
  rng = np.random.default_rng(4)
  edits, keys = {}, []
  for i in range(3):
    key = f"clip{i}/act{i}/frame_{i:04d}"
    keys.append(key)
    for role in ("gen", "ref"):
      (tmp_path / role / f"clip{i}/act{i}").mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)).save(
          tmp_path / role / f"{key}.png")
    words = rng.choice(WORDS, 6 + 17 * i)   # 8, 25, 42 tokens: two length buckets
    edits.setdefault(f"clip{i}", {})[f"act{i}"] = {"action": "#C C cuts the carrot",
                                                   "llava_forecast_finetune": " ".join(words)}
  (tmp_path / "edits.json").write_text(json.dumps(edits))

  res = ev.run_evaluation(str(tmp_path / "gen"), str(tmp_path / "ref"), tmp_path / "out",
                          name="run", metrics=("psnr", "blip_b", "blip_l"), weights_dir=str(d),
                          batch=2, progress=False, edit_file=str(tmp_path / "edits.json"))
  assert set(res["skipped"]) == {"blip_l"} and "model_large_caption.pth" in res["skipped"]["blip_l"]
  rows = list(csv.DictReader(open(tmp_path / "out/run/per_image.csv")))
  got = np.array([float(r["blip_b"]) for r in rows])
  captions = json.loads((tmp_path / "out/run/captions_blip_b.json").read_text())
  assert sorted(captions) == keys

  # By hand with the torch models, the release's recipe (its prompt ids: [CLS] -> [DEC], no [SEP]).
  want = []
  prompt = [tok.bos_token_id] + tok("a picture of").input_ids[1:-1]
  with torch.no_grad():
    for key in keys:
      img = Image.open(tmp_path / "gen" / f"{key}.png").convert("RGB").resize((32, 32),
                                                                               Image.BICUBIC)
      x = (np.asarray(img, np.float32) / 255 - blip.CLIP_MEAN) / blip.CLIP_STD
      out = _release_beam_search(ref, _torch_px(x[None].astype(np.float32)), prompt)
      cap = tok.decode(out[0], skip_special_tokens=True)[len("a picture of"):]
      assert captions[key] == cap
      desc = edits[key.split("/")[0]][key.split("/")[1]]["llava_forecast_finetune"]
      emb = [proj(text(**dtok(t, return_tensors="pt", truncation=True)).last_hidden_state[:, 0])
             for t in (desc, cap)]
      want.append(float(F.cosine_similarity(emb[0], emb[1])[0]))
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.all(np.abs(got) <= 1) and np.isfinite(res["metrics"]["blip_b"])
  assert res["metrics"]["blip_b"] == pytest.approx(np.mean(want), abs=2e-5)

  md, _, _ = ev.write_results_table(tmp_path / "out", with_paper=False)
  header = [l for l in md.read_text().splitlines() if l.startswith("| method")][0]
  assert header.endswith("| LPIPS ↓ | BLIP-B ↑ |")   # BLIP-L: no run has it, no column
  row = [l for l in md.read_text().splitlines() if l.startswith("| run |")][0]
  assert row.endswith(f"| {100 * res['metrics']['blip_b']:.2f} |")

  no_edits = ev.run_evaluation(str(tmp_path / "gen"), str(tmp_path / "ref"), tmp_path / "out",
                               name="run2", metrics=("psnr", "blip_b"), weights_dir=str(d),
                               progress=False)
  assert "--edit_file" in no_edits["skipped"]["blip_b"]
