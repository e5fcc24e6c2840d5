"""LEGO's instruction text: the LLaVA question and the LLaMA-2 chat template around it.

The human turn of every instruction record is `human_turn(action)`; the VLLM stage wraps it with
`chat_prompt` (BOS is added by the tokenizer, not written here).
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
          "content that the user provides, and assist the user with a variety of tasks using "
          "natural language.")
QUESTION = "How does the person properly {action} that is displayed in the video frame?"


def human_turn(action: str) -> str:
  """'<image>\\nHow does the person properly {action} that is displayed in the video frame?'"""
  return f"{IMAGE_PLACEHOLDER}\n{QUESTION.format(action=action)}"


def chat_prompt(human: str) -> str:
  """The LLaMA-2 chat prompt up to and including '[/INST]' (the answer follows after a space)."""
  return f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{human} [/INST]"
