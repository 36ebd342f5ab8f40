"""A headless page's console errors, page errors and dialogs (dismissed), and every request
outside the allowed URL prefixes (recorded and aborted): what the browser tests assert on."""

from __future__ import annotations


def watch(
    page: object, router: object, allowed: tuple[str, ...]
) -> tuple[list[str], list[str], list[str]]:
    """Start watching ``page`` (requests routed through ``router``: the page or its context);
    returns the lists (errors, dialogs, outside) that fill as it runs."""
    errors: list[str] = []
    dialogs: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: errors.append(str(e)))  # type: ignore[attr-defined]

    def dialog(d: object) -> None:
        dialogs.append(d.message)  # type: ignore[attr-defined]
        d.dismiss()  # type: ignore[attr-defined]

    page.on("dialog", dialog)  # type: ignore[attr-defined]

    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        if url.startswith(allowed):
            r.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            r.abort()  # type: ignore[attr-defined]

    router.route("**/*", route)  # type: ignore[attr-defined]
    return errors, dialogs, outside
