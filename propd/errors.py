"""The one exception type users see for bad input or an unusable setup."""


class PropdError(ValueError):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``propd: error: <message>`` and exits with code 2 for these; anything else is a bug.
    """
