"""docs/usage.md's code blocks run as written, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re


def test_usage_examples_run():
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "docs/usage.md lost its examples"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/usage.md", "exec"), scope)  # noqa: S102 - our own docs
    assert scope["logits"].shape == (2, 32, 256)
    assert scope["h"].shape == (2, 8, 4, 64)


def test_every_block_after_the_first_that_says_so_runs_on_its_own():
    """A block introduced with 'runs on its own' needs nothing from the blocks before it (the split-form block did)."""
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    standalone = re.findall(r"runs on its\s+own:\s*```python\n(.*?)```", text, flags=re.S)
    assert standalone, "docs/usage.md lost its standalone split-form example"
    for block in standalone:
        scope: dict = {}
        exec(compile(block, "docs/usage.md", "exec"), scope)  # noqa: S102 - our own docs
    assert scope["h"].shape == (2, 8, 4, 64)
