"""One exception type for problems with what the user gave us.

Bad config values, missing data and unusable checkpoints raise `UserError` (a
ValueError) with one readable line naming the fix; the command-line entry points
print that line and exit with status 2 instead of a traceback.
"""


class UserError(ValueError):
  """A problem with the user's input (config, data, checkpoint), not a bug."""
