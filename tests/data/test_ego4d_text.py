"""Ego4D narration normalisation: tags stripped, the verb lemmatised offline."""

import pytest

from data_prep.ego4d_text import lemmatise_verb, normalise_action, normalise_narration


@pytest.mark.parametrize("narration, expected", [
    ("#C C picks up a knife", "pick up a knife"),
    ("#C C washes the plate", "wash the plate"),
    ("#C C opens the drawer", "open the drawer"),
    ("#C C stirs the soup", "stir the soup"),
    ("#c c cuts carrot with knife", "cut carrot with knife"),
    ("#C C puts the lid on the pot", "put the lid on the pot"),
    ("#O man X holds the ladder", "hold the ladder"),
    ("#O woman Y passes the bowl to C", "pass the bowl to C"),
    ("#O person A touches the phone", "touch the phone"),
    ("#O X goes to the sink", "go to the sink"),
    ("#C C carries the basket", "carry the basket"),
    ("#C C mixes the flour", "mix the flour"),
    ("#C C does the dishes", "do the dishes"),
    ("#C C has a look at the map", "have a look at the map"),
    ("#C C rinses the cup.", "rinse the cup"),
    ("#C C presses the button", "press the button"),
    ("#C  C   wipes the   table #unsure", "wipe the table"),
    ("C cuts the onion", "cut the onion"),
    ("#C C picks up the lid and puts it on the pot", "pick up the lid and put it on the pot"),
    ("#C C moves the cups and plates", "move the cups and plates"),
    ("#C C cut the carrot", "cut the carrot"),
    ("#C C fries the egg", "fry the egg"),
    ("#C C buzzes the door", "buzz the door"),
    ("#C C uses the scissors", "use the scissors"),
    ("#C C ties the bag", "tie the bag"),
])
def test_ego4d_narrations(narration, expected):
  assert normalise_narration(narration) == expected


def test_lemmatiser_leaves_base_forms_alone():
  for word in ("cut", "press", "put", "open", "wash", "focus"):
    assert lemmatise_verb(word) == word
  assert lemmatise_verb("Focuses") == "focus"


def test_epic_labels_are_verbatim_and_unknown_dataset_is_an_error():
  assert normalise_action("  open cupboard ", "epickitchens") == "open cupboard"
  assert normalise_action("#C C opens cupboard", "epickitchens") == "#C C opens cupboard"
  assert normalise_action("#C C opens cupboard", "ego4d") == "open cupboard"
  with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
    normalise_action("x", "kinetics")


def test_release_rule_lemmatises_the_first_word_only():
  """run_llava_in_loop.py: action[2:].strip() twice, first word lower-cased and lemmatised."""
  assert normalise_action("#C C cuts the carrot", "ego4d_release") == "cut the carrot"
  assert normalise_action("#C C picks up the lid and puts it down", "ego4d_release") == \
      "pick up the lid and puts it down"        # the project's rule: "and put it down"
  assert normalise_action("#C C Opens #unsure", "ego4d_release") == "open #unsure"
  assert normalise_action("#C C washes", "ego4d_release") == "wash"
  assert normalise_action("#C C", "ego4d_release") == ""
  assert normalise_action("#C C picks up the lid and puts it down", "ego4d") == \
      "pick up the lid and put it down"
