"""The API's one table from the OTA error root's leaves to HTTP statuses."""

from __future__ import annotations

from plugins.ota.core.errors import Conflict, InvalidInput, NotFound, OtaError
from plugins.ota.http.errors import STATUS_OF, status_of


def _subclasses(cls: type[OtaError]) -> list[type[OtaError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_every_error_class_has_a_client_status() -> None:
    """Each class under OtaError (defined anywhere) is in STATUS_OF with a 4xx of its own, so no error the
    app layer raises falls back to the root's 400 by oversight."""
    leaves = [c for c in _subclasses(OtaError) if c.__module__.startswith("plugins.")]  # not tests' own
    assert {NotFound, Conflict, InvalidInput} <= set(leaves)
    for cls in leaves:
        assert cls in STATUS_OF, f"{cls.__name__} has no status in plugins.ota.http.errors.STATUS_OF"
        assert 400 < STATUS_OF[cls] < 500, cls


def test_a_subclass_answers_with_its_parents_status() -> None:
    """An error class missing from the table answers with its nearest listed ancestor's status."""

    class Gone(NotFound):
        pass

    assert status_of(Gone("x")) == 404
    assert status_of(InvalidInput("f", "bad")) == 422
    assert status_of(OtaError("x")) == 400
