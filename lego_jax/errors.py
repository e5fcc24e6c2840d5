"""The errors every module raises for a mistake in the user's input or a fault in their data.

It lives below everything (nothing here imports lego_jax) so that data, models, training and
inference code can raise them without reaching up to the command line; `lego_jax.cli` turns each
into one line on stderr and exit code 2 (DataError: exit code 1).
"""


class UserError(Exception):
  """A mistake in the user's input: reported as one line, exit code 2."""


class DataError(Exception):
  """A fault in the user's data files (a release file that contradicts itself): reported as one
  line naming the file, exit code 1."""
