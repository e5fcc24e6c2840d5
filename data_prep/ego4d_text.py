"""Ego4D narration -> action prompt: "#C C cuts the carrot" -> "cut the carrot".

Ego4D narrations are third-person present tense with a subject tag: "#C C" (the camera wearer),
"#O man X" (someone else). LEGO prompts the models with the bare imperative, so the tags are
stripped and the verb lemmatised. Lemmatisation is offline and deterministic: an irregular-verb
table first, then English suffix rules. Only the leading verb and verbs coordinated with "and"
("picks up the lid and puts it ...") are touched; nouns such as "glasses" never are.
EPIC-KITCHENS labels are already imperative and are used verbatim.

dataset "ego4d_release" is the release's narrower rule (vllm/llava/eval/run_llava_in_loop.py):
drop two characters and strip, twice ("#C C "), lower-case and lemmatise the first word only,
keep the rest verbatim ("#unsure", later verbs, punctuation). The release lemmatises with NLTK's
WordNet (a corpus download); here the same offline lemmatiser stands in for it (docs/fidelity.md).
"""

from __future__ import annotations

import re

# Third-person forms the suffix rules get wrong.
IRREGULAR: dict[str, str] = {
    "is": "be", "are": "be", "was": "be", "has": "have", "does": "do", "goes": "go",
    "dies": "die", "lies": "lie", "ties": "tie", "unties": "untie", "vies": "vie",
    "focuses": "focus", "biases": "bias", "canvases": "canvas", "gasses": "gas",
    "echoes": "echo", "vetoes": "veto", "torpedoes": "torpedo", "tiptoes": "tiptoe",
    "hoes": "hoe", "toes": "toe", "shoes": "shoe", "canoes": "canoe", "queues": "queue",
    "buses": "bus", "quizzes": "quiz", "whizzes": "whiz",
}

# Base forms of verbs common in Ego4D narrations; a word after "and" is lemmatised only when its
# lemma is here, so coordinated nouns ("cups and plates") stay as they are.
COMMON_VERBS = frozenset("""
adjust apply arrange attach bend bite blow break bring brush carry catch change chop clean close
collect cook cover cut dip drag drink drop dry eat empty fill fix flip fold get give grab grate
grind hang hammer hit hold insert knead lay lean lift look lower measure mix mop move open paint
peel place plug pour press pull push put raise reach remove rinse roll rotate rub scoop scrape
scrub serve set shake shift shut slice slide smooth spray spread sprinkle squeeze stack stand
step stir straighten stretch take tap tear throw tie tighten touch turn twist unfold unscrew untie
use walk wash wear whisk wipe wrap write screw sweep sew sand saw drill measure weigh check watch
see read type play operate climb sit dust fry boil bake heat knit cross crack water plant trim
""".split())

_TAG_PREFIX = re.compile(
    r"""^\s*(?:
        \#\s*c\s+c\b            # "#C C ..."  the camera wearer
      | \#\s*c\b                # "#C ..."
      | \#\s*o\s+(?:(?:a|an|the)\s+)?
           (?:(?:man|woman|person|lady|boy|girl|child|kid|someone|people|friend|guy)\s+)?
           (?:[a-z]\b)?          # "#O man X ...", "#O woman Y ...", "#O X ..."
      | c\b                     # "C ..."
    )""", re.IGNORECASE | re.VERBOSE)
_UNSURE = re.compile(r"#\s*unsure\b", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def lemmatise_verb(word: str) -> str:
  """Third-person singular present -> base form ("washes" -> "wash", "carries" -> "carry")."""
  lower = word.lower()
  if lower in IRREGULAR:
    return IRREGULAR[lower]
  if len(lower) <= 2 or not lower.endswith("s") or lower.endswith(("ss", "us", "is")):
    return lower  # already a base form ("press", "cut", "put")
  if lower.endswith("ies") and len(lower) > 4:
    return lower[:-3] + "y"                      # carries -> carry
  if lower.endswith(("sses", "shes", "ches", "xes", "zzes")):
    return lower[:-2]                            # passes, washes, touches, mixes, buzzes
  return lower[:-1]                              # picks, cuts, wipes, closes, uses


def normalise_narration(text: str) -> str:
  """'#C C picks up a knife' -> 'pick up a knife'; also handles '#O man X holds ...'."""
  text = _UNSURE.sub(" ", text)
  text = _SPACES.sub(" ", text).strip()
  stripped = _TAG_PREFIX.sub("", text, count=1).strip()
  if stripped:
    text = stripped
  text = text.rstrip(" .")
  words = text.split(" ")
  if not words or not words[0]:
    return ""
  words[0] = lemmatise_verb(words[0])
  for i in range(1, len(words)):
    if words[i - 1].lower() == "and" and lemmatise_verb(words[i]) in COMMON_VERBS:
      words[i] = lemmatise_verb(words[i])
  return " ".join(words)


def normalise_narration_release(text: str) -> str:
  """The release's rule: '#C C picks up a knife and cuts' -> 'pick up a knife and cuts'."""
  action = text[2:].strip()    # "#C"
  action = action[2:].strip()  # "C"
  verb, _, remain = action.partition(" ")
  verb = lemmatise_verb(verb.lower()) if verb else ""
  return f"{verb} {remain}" if remain else verb


def normalise_action(text: str, dataset: str) -> str:
  """The action prompt of one annotation: Ego4D narrations normalised, other labels verbatim."""
  if dataset == "ego4d":
    return normalise_narration(text)
  if dataset == "ego4d_release":
    return normalise_narration_release(text)
  if dataset in ("epickitchens", "verbatim"):
    return text.strip()
  raise ValueError(f"unknown dataset {dataset!r} (expected 'ego4d' or 'epickitchens')")
