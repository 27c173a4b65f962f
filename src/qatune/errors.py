"""The one exception type qatune raises for user-facing problems (bad input, bad checkpoint, bad config)."""


class QatuneError(Exception):
    """A problem the user can fix; the CLI prints its message without a traceback."""
