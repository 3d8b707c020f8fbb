"""The one error type users see: a message that says what is wrong and what to do."""


class CmdfedError(Exception):
    """An expected failure (bad input, missing file, unreachable service).

    The CLI prints ``str(error)`` as one line and exits non-zero; anything else is a
    bug and shows a traceback only with ``--debug``.
    """
