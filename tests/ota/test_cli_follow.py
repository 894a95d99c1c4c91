"""`job show --follow`'s view at any terminal width: every device keeps its bar, and a long reason wraps
onto more lines instead of pushing the bar away or being cut."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from plugins.ota.cli import BAR_WIDTH, _follow_view

REASON = "download failed: certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)"
JOB = {
    "id": 7,
    "type": "static",
    "firmware_id": 1,
    "state": "running",
    "counts": {"failed": 1, "in_progress": 1},
}
TASKS = [
    {"device": "pk/a-rather-long-device-name-01", "state": "failed", "progress": 40, "desc": REASON},
    {"device": "pk/dev2", "state": "in_progress", "progress": 70, "desc": "flashing"},
    {"device": "pk/dev3", "state": "skipped", "progress": 0, "desc": "already_on_target"},
]


@pytest.mark.parametrize("width", [60, 80, 110, 160])
def test_every_device_keeps_its_bar_and_its_whole_reason(width: int) -> None:
    out = Console(width=width, record=True, color_system=None, force_terminal=False)
    out.print(_follow_view(JOB, TASKS))
    text = out.export_text()
    lines = text.splitlines()
    for device in ("pk/a-rather-long-device-name-01", "pk/dev2"):
        [row] = [line for line in lines if device[:20] in line]
        progress = 40 if "long" in device else 70
        assert row.count("━") >= BAR_WIDTH * progress // 100 - 1, (width, row)  # the bar, whole
        if width >= 80:
            assert f"{progress}%" in row and ("failed" in row or "in_progress" in row), (width, row)
    assert "pk/dev3" not in text  # skipped: not a transfer to follow
    joined = re.sub(r"\s+", "", text)
    assert re.sub(r"\s+", "", REASON) in joined, text
    assert all(len(line) <= width for line in lines)
