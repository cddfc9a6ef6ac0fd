"""Error types users see. The CLI prints their message (no traceback) and exits non-zero."""


class CxrlabError(ValueError):
    """Base of every error whose message tells the user what is wrong and what to do."""


class EvalError(CxrlabError):
    """Evaluation cannot proceed; the message says which input is wrong and what to do (raised while resolving
    what to evaluate in ``cxrlab.data.items`` and by ``cxrlab.analysis``)."""


class ExplainError(CxrlabError):
    """Explanation cannot proceed; the message says which input is wrong and what to do."""


class RunError(CxrlabError):
    """A run directory cannot be created or resumed; the message says which and what to do."""


class MineError(CxrlabError):
    """Similar-image mining cannot proceed; the message names the path or value and what to do."""
