"""The firmware upload form through a real broker: parts it cannot name are refused, not a 5xx."""

from __future__ import annotations

import pytest

from tests.support import TOKEN, Env

BOUNDARY = "b0undary"


def _form(disposition: str | None) -> bytes:
    head = f"Content-Disposition: {disposition}\r\n" if disposition is not None else ""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="product_key"\r\n\r\npk\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="version"\r\n\r\n2.0.0\r\n'
        f"--{BOUNDARY}\r\n{head}\r\nvalue\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n\r\nfirmware\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()


@pytest.mark.parametrize("disposition", ['form-data; name=";;"', "form-data", "attachment; ;", None])
async def test_a_part_without_a_usable_name_is_a_422(env: Env, disposition: str | None) -> None:
    """In an otherwise valid upload, a part whose Content-Disposition is missing, unparsable or names
    nothing answers 422 naming the body, and nothing is stored."""
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    async with env.http.post(f"{env.admin}/firmware", data=_form(disposition), headers=headers) as r:
        assert r.status == 422, await r.text()
        answer = await r.json()
        assert answer["error"] == "invalid" and answer["message"].startswith("body:"), answer
    assert await env.api("GET", "/firmware", expect=200) == []
