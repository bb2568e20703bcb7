"""The base of the errors that bad user input raises (no imports from the package).

>>> from falqon_jax.errors import UserInputError
>>> issubclass(UserInputError, ValueError)
True
"""


class UserInputError(ValueError):
  """Bad input from the user (an argument, file or option) that they can fix.

  The message is one line naming the problem and the fix; the ``falqon-jax`` CLI prints
  it as that line, without a traceback. It subclasses ``ValueError`` so that
  ``except ValueError`` in user code keeps catching it. Subclasses:
  :class:`~falqon_jax.config.ConfigError`, :class:`~falqon_jax.data.DataError`,
  :class:`~falqon_jax.checkpoint.CheckpointError`,
  :class:`~falqon_jax.checkpoint.ResumeMismatchError`.
  """
