"""The one error attnscope raises on purpose; its message always says what to do."""


class AttnScopeError(RuntimeError):
    """Raised for bad input or an impossible capture; the message says how to fix it."""
