"""Tokenizers: the offline-trained SentencePiece model, LLaVA's <image> split, CLIP (B, 77)."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from lego_jax.data import prompts, synthetic, tokenizer


@pytest.fixture(scope="module")
def corpus():
  exs = [e for _, _, e in synthetic.generate_split("train", 60, 0, 16)]
  return ([f"{prompts.chat_prompt(prompts.human_turn(e.action))} {e.description}" for e in exs]
          + [e.action for e in exs] + [e.description for e in exs])


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  return tokenizer.train_tokenizer(corpus, out, 400), out


def test_trained_model_has_llama_conventions_and_round_trips(trained, corpus):
  tok, out = trained
  assert (out / "tokenizer.model").is_file()
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  assert tok.vocab_size == 400
  for text in (corpus[0], corpus[-1]):  # the chat template with its newlines, a description
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    assert tok.decode(ids) == text
    # The corpus compresses well: about a token per word.
    assert len(ids) - 2 <= 1.5 * len(text.split())
  assert tok.sp.id_to_piece(tok.encode("a\nb", bos=False)[1]) == "\n"
  # Characters never seen map to unk, they do not break encoding.
  assert 0 in tok.encode("cut the ✓")
  assert tokenizer.load_tokenizer(out).encode(corpus[-1]) == tok.encode(corpus[-1])


def test_training_is_deterministic(corpus, trained, tmp_path):
  _, out = trained
  tokenizer.train_tokenizer(corpus, tmp_path, 400)
  assert (tmp_path / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()


def test_encode_with_image_follows_llava(trained):
  tok, _ = trained
  prompt = prompts.chat_prompt(prompts.human_turn("cut the red carrot"))
  ids = tok.encode_with_image(prompt)
  # LLaVA's tokenizer_image_token: every chunk tokenised alone with BOS, BOS kept once, -200
  # in place of "<image>".
  before, after = prompt.split("<image>")
  want = [1] + tok.encode(before, bos=True)[1:] + [-200] + tok.encode(after, bos=True)[1:]
  assert ids == want and ids.count(-200) == 1
  # The second chunk's dummy prefix is LLaVA's too: it decodes as a space where the image was.
  assert tok.decode(ids) == before + " " + after


def test_clip_ids_from_sentencepiece(trained, tmp_path):
  tok, out = trained
  clip = tokenizer.ClipTokenizer(sentencepiece=tok)
  long_text = " ".join(["the red cup"] * 60)
  ids = clip(["cut the carrot", long_text, ""])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  body = tok.encode("cut the carrot", bos=False)
  assert list(ids[0, :len(body) + 2]) == [1] + body + [2]
  assert (ids[0, len(body) + 2:] == 2).all()  # padded with EOS, as CLIP's tokenizer pads
  assert ids[1, 0] == 1 and ids[1, -1] == 2 and (ids[1, 1:-1] != 2).all()  # truncated, EOS kept
  assert list(ids[2, :2]) == [1, 2]
  # From a config: the workdir's trained model when no CLIP tokenizer directory is given.
  cfg = ConfigDict({"data": {"tokenizer_dir": str(out), "clip_tokenizer_dir": ""},
                    "clip_text": {"vocab_size": 512}})
  np.testing.assert_array_equal(tokenizer.load_clip_tokenizer(cfg, tmp_path)(["x y"]),
                                clip(["x y"]))
  cfg.clip_text.vocab_size = 100
  with pytest.raises(tokenizer.TokenizerError, match="does not fit the CLIP text encoder"):
    tokenizer.load_clip_tokenizer(cfg, tmp_path)


def _tiny_clip_dir(path):
  """A real transformers CLIPTokenizer over a toy byte-level BPE vocabulary, saved to disk."""
  from transformers import CLIPTokenizer

  words = ["cut</w>", "the</w>", "carrot</w>", "red</w>", "cup</w>"]
  letters = sorted(set("cutheaorpd"))
  vocab = {ch: i for i, ch in enumerate(letters + [c + "</w>" for c in letters] + words)}
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  merges = ["c u", "cu t</w>", "t h", "th e</w>", "c a", "ca r", "car r", "carr o", "carro t</w>",
            "r e", "re d</w>", "cu p</w>"]
  vocab.update({m.replace(" ", ""): len(vocab) + i for i, m in enumerate(merges)
                if m.replace(" ", "") not in vocab})
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
  tok.save_pretrained(path)
  return vocab


def test_clip_ids_from_a_local_clip_tokenizer(tmp_path):
  vocab = _tiny_clip_dir(tmp_path)
  clip = tokenizer.load_clip_hf(tmp_path)
  ids = clip(["cut the red carrot", "the cup"])
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert ids.shape == (2, 77)
  assert list(ids[0, :6]) == [bos, vocab["cut</w>"], vocab["the</w>"], vocab["red</w>"],
                              vocab["carrot</w>"], eos]
  assert (ids[0, 6:] == eos).all()  # CLIP pads with <|endoftext|>
  assert ids[1, 0] == bos and ids[1, 3] == eos


def test_missing_tokenizer_files_say_where_to_get_them(tmp_path):
  with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer.model does not exist.*LLaMA-2"):
    tokenizer.load_tokenizer(tmp_path / "nope")
  with pytest.raises(tokenizer.TokenizerError,
                     match=r"CLIP tokenizer not found.*openai/clip-vit-large-patch14"):
    tokenizer.load_clip_hf(tmp_path)
  with pytest.raises(ValueError, match="too small"):
    tokenizer.train_tokenizer(["a b c"], tmp_path, 100)
  with pytest.raises(ValueError, match="no text"):
    tokenizer.train_tokenizer(["", "  "], tmp_path, 200)
