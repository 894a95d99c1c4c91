"""The documentation stays true to the code."""

from pathlib import Path

from plugins.ota.core.machine import mermaid_diagram

REPO = Path(__file__).resolve().parents[1]


def test_design_doc_diagram_is_generated_from_the_table() -> None:
    """docs/design.md carries exactly the state diagram generated from `machine.TRANSITIONS`."""
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    assert "```mermaid\n" + mermaid_diagram() + "```" in text
