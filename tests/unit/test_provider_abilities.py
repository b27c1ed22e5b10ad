"""Optional provider abilities are small protocols (``InterruptibleProvider``),
checked with ``isinstance`` rather than looked up by name."""

from __future__ import annotations

import pytest

from gpuscout.providers.base import InterruptibleProvider
from gpuscout.providers.fake import FakeProvider


class Deaf:
    """A provider-like object that cannot deliver notices."""

    name = "deaf"


def test_an_interruptible_provider_is_one_that_delivers_notices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProvider()
    assert isinstance(fake, InterruptibleProvider)
    assert not isinstance(Deaf(), InterruptibleProvider)
    # Looked at on the instance each time, not cached per class.
    monkeypatch.delattr(FakeProvider, "notify_interruption")
    assert not isinstance(fake, InterruptibleProvider)
    monkeypatch.undo()
    assert isinstance(fake, InterruptibleProvider)
