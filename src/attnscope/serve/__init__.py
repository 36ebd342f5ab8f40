"""``attnscope serve``: a local web app that captures a model's attention on typed text.

``Explorer`` holds the model (``engine``), ``create_app`` is the Starlette app around it
(``app``), ``serve`` runs it with uvicorn. Starlette and uvicorn are the ``serve`` extra and are
imported only here, when a server is made.

>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, False)
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

from ..errors import AttnScopeError
from .app import create_app
from .engine import Explorer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access(host: str, token: str | None) -> str | None:
    """The token the server will require: the one given, a fresh one for any address other
    than the loopback one, else None (no token on localhost unless asked for)."""
    if token is not None:
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise AttnScopeError(
                "--token must be a non-empty string without spaces (or leave it out: a fresh "
                "one is made off localhost)"
            )
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def serve(
    model: str | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_tokens: int | None = None,
) -> None:
    """Load ``model`` (default: the packaged all-MiniLM-L6-v2) and serve the explorer until
    interrupted; prints the URL to open (with its access token, when it needs one)."""
    try:
        import uvicorn
    except ImportError:
        raise AttnScopeError(
            "attnscope serve needs Starlette and uvicorn: pip install 'attnscope[serve]'"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AttnScopeError(f"--port must be 0 to 65535, got {port!r}")
    if max_tokens is not None and max_tokens < 1:
        raise AttnScopeError(f"--max-tokens must be at least 1, got {max_tokens}")
    needed = access(host, token)
    explorer = Explorer(model, max_tokens=max_tokens)
    local = None if needed else {"localhost", "127.0.0.1", "::1", host.strip("[]")}
    app = create_app(explorer, token=needed, hosts=local)
    print(f"attnscope serve: {explorer.model_path} ({explorer.max_tokens} tokens at most)")
    shown = f"[{host}]" if ":" in host else host

    class Announcing(uvicorn.Server):
        """Prints the URL once the socket listens, so that it can be opened at once."""

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            bound = port
            if self.servers and self.servers[0].sockets:  # port 0: the one the OS chose
                bound = self.servers[0].sockets[0].getsockname()[1]
            url = f"http://{shown}:{bound}/" + (f"?token={needed}" if needed else "")
            print(f"open {url}", flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    Announcing(config).run()


__all__ = ["Explorer", "create_app", "is_loopback", "serve"]
