"""Error types users see. The CLI prints their message (no traceback) and exits non-zero."""


class CxrlabError(ValueError):
    """Base of every error whose message tells the user what is wrong and what to do."""
