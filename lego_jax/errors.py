"""The error every module raises for a mistake in the user's input.

It lives below everything (nothing here imports lego_jax) so that data, models, training and
inference code can raise it without reaching up to the command line; `lego_jax.cli` turns it
into one line on stderr and exit code 2.
"""


class UserError(Exception):
  """A mistake in the user's input: reported as one line, exit code 2."""
