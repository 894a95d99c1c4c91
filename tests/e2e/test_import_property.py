"""A property of `POST /devices/import` over real HTTP: whatever it accepts is exactly what was sent, and
whatever it refuses changes nothing. Every row is accounted for: created, existing or refused."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.ota.core.credentials import SECRET_MIN_LEN, secret_problem
from tests.e2e.test_fuzz import WAIT_S, BrokerThread
from tests.support import TOKEN, Tls, broker_config


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    """One broker for the module and a client of its management API; with the path of its database."""
    data_dir = tmp_path_factory.mktemp("import") / "data"
    tls = Tls.make(tmp_path_factory.mktemp("import-tls"))
    broker = BrokerThread(broker_config(data_dir, tls)).start()
    try:
        host, port = broker.admin_address
        with httpx.Client(
            base_url=f"http://{host}:{port}/api/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=WAIT_S,
        ) as client:
            yield client, data_dir / "ota.db"
    finally:
        broker.stop()


def devices(db: Path) -> dict[tuple[str, str], tuple[str, int]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        rows = c.execute("SELECT product_key, device_name, device_secret, enabled FROM devices").fetchall()
    return {(pk, dn): (secret, enabled) for pk, dn, secret, enabled in rows}


names = st.sampled_from(["pk", "pk2", "a", "dev-1", "x.y", "p:q@r"]) | st.from_regex(
    r"[A-Za-z0-9_.:@\-]{1,8}", fullmatch=True
)
bad_names = st.sampled_from(["", "a/b", "a b", "x" * 65, "ü", "a\x00b", "\n"])
good_secrets = st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=SECRET_MIN_LEN, max_size=40)
bad_secrets = st.text(max_size=SECRET_MIN_LEN - 1).filter(bool) | st.sampled_from(["x" * 129, " " + "s" * 20])
cells = st.one_of(
    st.tuples(names, names),
    st.tuples(names, names, good_secrets),
    st.tuples(names, names, bad_secrets),
    st.tuples(bad_names | names, bad_names | names),
    st.lists(st.text(max_size=6), min_size=0, max_size=5).map(tuple),
)


def csv_text(rows: list[tuple[str, ...]], header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180: a cell holding a bare CR is then quoted
    if header:
        writer.writerow(["product_key", "device_name", "device_secret"])
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.timeout(300)
def test_an_import_creates_exactly_what_it_accepts(api: tuple[httpx.Client, Path]) -> None:
    """For any CSV of good, bad and malformed rows: the devices created are exactly the rows answered as
    created, with the secret sent (or a generated one); no other device changes; every row is counted."""
    client, db = api

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=st.lists(cells, max_size=30), header=st.booleans())
    def run(rows: list[tuple[str, ...]], header: bool) -> None:
        before = devices(db)
        r = client.post(
            "/devices/import", content=csv_text(rows, header), headers={"Content-Type": "text/csv"}
        )
        assert r.status_code == 200, r.text[:300]
        doc = r.json()
        after = devices(db)
        created = {(c["product_key"], c["device_name"]): c["device_secret"] for c in doc["created"]}
        assert set(after) == set(before) | set(created) and not set(created) & set(before)
        assert {k: v for k, v in after.items() if k in before} == before  # refused or existing: unchanged
        for key, secret in created.items():
            assert after[key] == (secret, 1)
        sent: dict[tuple[str, str], str] = {}  # the first row of each device not refused for its secret
        for row in rows:
            if len(row) in (2, 3) and not (len(row) == 3 and row[2] and secret_problem(row[2])):
                sent.setdefault((row[0], row[1]), row[2] if len(row) == 3 else "")
        for key, secret in created.items():
            if sent.get(key):
                assert secret == sent[key]  # exactly the secret sent
            else:
                assert len(secret) == 32  # generated
        blank = sum(1 for row in rows if not any(c.strip() for c in row))
        assert doc["rows"] == len(rows) - blank
        assert len(created) + doc["existing"] + len(doc["errors"]) == doc["rows"]

    run()
