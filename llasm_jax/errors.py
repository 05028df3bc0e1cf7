"""The exception of a bad input: a message that names the input and the fix.

The CLI prints a `UserError` as one line and exits with status 2; any other exception (an
internal JAX or library error, a bug) keeps its traceback. It subclasses ValueError, so callers
that catch ValueError, and tests that expect one, see it as before.
"""


class UserError(ValueError):
  """A bad input (config, path, checkpoint, data); the message names it and says what to do."""
