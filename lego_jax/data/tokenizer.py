"""Tokenizers, all from local files (no hub access, ever).

LLaMA side: a SentencePiece `tokenizer.model` in a directory: the LLaMA-2 file for the real model
(cfg.data.tokenizer_dir), or, for the embedded default, a small BPE model that `prepare-data`
trains offline on the synthetic corpus into WORKDIR/tokenizer/ with the LLaMA conventions
(unk 0, bos 1, eos 2, no pad piece, identity normalisation, newline a piece of its own): one
loading code path serves both. Unlike LLaMA's, the trained model has no byte fallback: its 256
byte pieces would take half of a 512-id vocabulary; characters absent from the corpus map to unk.

CLIP-text side: (B, 77) ids. Full size: transformers' CLIPTokenizer from a local directory
(cfg.data.clip_tokenizer_dir). Tiny default: the SentencePiece model as BOS, text, EOS, padded
with EOS (the padding CLIP ViT-L/14's tokenizer uses), truncated so EOS always survives.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lego_jax.data.prompts import IMAGE_PLACEHOLDER

MODEL_FILE = "tokenizer.model"
CLIP_LENGTH = 77
IMAGE_TOKEN_ID = -200  # LLaVA's stand-in for the image features inside input ids
MIN_TRAINED_VOCAB = 128  # 3 specials + the corpus's characters + room for merges

LLAMA_HELP = ("the LLaMA-2 `tokenizer.model` ships with the LLaMA-2 / LLaVA weights (e.g. "
              "https://huggingface.co/meta-llama/Llama-2-13b-chat-hf after accepting its "
              "licence); point --config.data.tokenizer_dir at the directory holding it, or leave "
              "tokenizer_dir empty to use the one `lego-jax prepare-data` trains in "
              "WORKDIR/tokenizer")
CLIP_HELP = ("it needs the tokenizer files (vocab.json + merges.txt, or tokenizer.json) of "
             "openai/clip-vit-large-patch14 (https://huggingface.co/openai/clip-vit-large-patch14);"
             " download them once and point --config.data.clip_tokenizer_dir at that directory")


class TokenizerError(FileNotFoundError):
  pass


class Tokenizer:
  """A SentencePiece model with LLaMA's id conventions."""

  def __init__(self, model_file: str | Path):
    self.path = Path(model_file)
    self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
    # LLaMA has no pad piece; LLaVA pads with unk (id 0), and so do we.
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    ids = self.sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    """Drops special ids, the image stand-in and anything outside the vocabulary."""
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size
            and int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
    return self.sp.decode(keep)

  def encode_with_image(self, prompt: str, image_token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """LLaVA's tokenisation of a prompt with "<image>": each text chunk is tokenised on its own
    (so each gets SentencePiece's dummy prefix, as in LLaVA), one BOS in front, and
    `image_token_id` where the placeholder was."""
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    ids = [self.bos_id]
    for k, chunk in enumerate(chunks):
      if k:
        ids.append(image_token_id)
      ids.extend(self.sp.encode(chunk) if chunk else [])
    return ids


def tokenizer_dir(data_cfg, workdir: str | Path) -> Path:
  return Path(data_cfg.tokenizer_dir) if data_cfg.tokenizer_dir else Path(workdir) / "tokenizer"


def load_tokenizer(directory: str | Path) -> Tokenizer:
  path = Path(directory) / MODEL_FILE
  if not path.is_file():
    raise TokenizerError(f"LLaMA tokenizer not found: {path} does not exist; {LLAMA_HELP}")
  return Tokenizer(path)


def train_tokenizer(lines: Iterable[str], out_dir: str | Path, vocab_size: int) -> Tokenizer:
  """Trains a BPE SentencePiece model on `lines` (offline, single-threaded: the same lines give
  the same file) and writes out_dir/tokenizer.model atomically. The vocabulary may come out
  smaller than `vocab_size` when the corpus has fewer merges to offer."""
  if vocab_size < MIN_TRAINED_VOCAB:
    raise ValueError(f"tokenizer_vocab_size={vocab_size} is too small for a trained tokenizer "
                     f"(at least {MIN_TRAINED_VOCAB})")
  sentences = [line for line in lines if line.strip()]
  if not sentences:
    raise ValueError("no text to train the tokenizer on")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      byte_fallback=False, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
      user_defined_symbols=["\n"],  # the chat template's line breaks
      allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = out_dir / (MODEL_FILE + ".tmp")
  tmp.write_bytes(model.getvalue())
  os.replace(tmp, out_dir / MODEL_FILE)
  return Tokenizer(out_dir / MODEL_FILE)


class ClipTokenizer:
  """texts -> (B, 77) int32 ids for the CLIP text encoder."""

  def __init__(self, *, sentencepiece: Tokenizer | None = None, hf=None,
               length: int = CLIP_LENGTH):
    if (sentencepiece is None) == (hf is None):
      raise ValueError("give exactly one of sentencepiece= or hf=")
    self.sp, self.hf, self.length = sentencepiece, hf, length
    if hf is not None:
      self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
      self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
      self.vocab_size = len(hf)
    else:
      self.bos_id, self.eos_id = sentencepiece.bos_id, sentencepiece.eos_id
      self.pad_id = sentencepiece.eos_id
      self.vocab_size = sentencepiece.vocab_size

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    texts = [str(t) for t in texts]
    if self.hf is not None:
      ids = self.hf(texts, padding="max_length", max_length=self.length, truncation=True)
      return np.asarray(ids["input_ids"], np.int32)
    out = np.full((len(texts), self.length), self.pad_id, np.int32)
    for i, t in enumerate(texts):
      body = self.sp.encode(t, bos=False)[:self.length - 2]
      row = [self.bos_id] + body + [self.eos_id]
      out[i, :len(row)] = row
    return out


def load_clip_hf(directory: str | Path) -> ClipTokenizer:
  d = Path(directory)
  has_files = (d / "tokenizer.json").is_file() or (
      (d / "vocab.json").is_file() and (d / "merges.txt").is_file())
  if not has_files:
    raise TokenizerError(f"CLIP tokenizer not found in {d}: {CLIP_HELP}")
  from transformers import CLIPTokenizer  # seconds to import: only this fallback needs it

  return ClipTokenizer(hf=CLIPTokenizer.from_pretrained(str(d), local_files_only=True))


def load_clip_tokenizer(cfg, workdir: str | Path) -> ClipTokenizer:
  """From cfg.data.clip_tokenizer_dir if set, else the SentencePiece model (tiny default)."""
  d = cfg.data
  if d.clip_tokenizer_dir:
    return load_clip_hf(d.clip_tokenizer_dir)
  sp = load_tokenizer(tokenizer_dir(d, workdir))
  text_vocab = cfg.clip_text.vocab_size if "clip_text" in cfg else sp.vocab_size
  if sp.vocab_size > text_vocab:
    raise TokenizerError(
        f"cfg.data.clip_tokenizer_dir is empty and the SentencePiece tokenizer ({sp.vocab_size} "
        f"ids) does not fit the CLIP text encoder's vocab_size {text_vocab}; {CLIP_HELP}")
  return ClipTokenizer(sentencepiece=sp)
