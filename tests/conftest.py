from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[int]]:
    """Count calls of a ``torch.<name>`` function (a counter, not a change of behaviour)."""

    def install(name: str) -> list[int]:
        original = getattr(torch, name)
        counter = [0]

        def counting(*args: object, **kwargs: object) -> object:
            counter[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
        return counter

    return install


def _hypothesis_profiles() -> None:
    import os

    from hypothesis import settings

    # CI replays the same examples every run (a red CI means a regression, not a new draw);
    # local runs keep exploring.
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()
