"""The documentation keeps up with the code: every registered method and every config key is documented, and no
page points outside the repository (a user's clone has only what is in it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora import config, methods

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out += leaf_keys(hints[f.name], key) if dataclasses.is_dataclass(hints[f.name]) else [key]
    return out


@pytest.mark.parametrize("page", ["README.md", "docs/configuration.md", "docs/methods.md", "docs/architecture.md"])
def test_every_registered_method_is_named(page):
    text = (ROOT / page).read_text()
    missing = [m for m in methods.available() if f"`{m}`" not in text]
    assert not missing, f"{page} does not name the registered methods {missing}"


def test_the_privacy_table_gives_every_method_its_secure_aggregation_and_reason():
    """docs/reliability.md's table of which methods work under secure aggregation and central DP: every registered
    method in exactly one row, its "yes"/"no" as its capabilities say, and the reason of each "no" verbatim."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = re.findall(r"^\| ([a-z_, ]+) \| (yes|no) \| (yes[^|]*|no) \| ([^|]*)\|$", text, flags=re.MULTILINE)
    listed = {m.strip(): (secure, why.strip()) for names, secure, _, why in rows for m in names.split(",")}
    assert sorted(listed) == sorted(methods.available())
    assert sum(len(names.split(",")) for names, *_ in rows) == len(listed)  # no method in two rows
    for m, (secure, why) in listed.items():
        caps = methods.capabilities(m)
        assert (secure == "yes") == caps.secure_aggregation, m
        assert why == caps.not_a_sum, m


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in leaf_keys(config.ExperimentConfig) if k != "method" and f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md does not document {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page):
    pattern = re.compile(r"\.\./shared|conventions\.md|shared (project |methods )?notes|[Ii]ssue [0-9]+")
    hits = [f"{page.name}:{n}: {line.strip()[:90]}" for n, line in enumerate(page.read_text().splitlines(), 1)]
    hits = [h for h in hits if pattern.search(h.split(": ", 1)[1])]
    assert not hits, "pages must stand alone:\n" + "\n".join(hits)


def test_the_readme_shows_every_command_and_the_python_api():
    """ "What you can do" shows eval, predict, trackers and the Python API, and names only commands that exist."""
    import fedlora
    from fedlora.cli import app

    section = (ROOT / "README.md").read_text().split("## What you can do", 1)[1].split("\n## ", 1)[0]
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    shown = set(re.findall(r"^fedlora ([a-z]+)", section, re.M))
    assert shown <= commands, f"README names commands that do not exist: {shown - commands}"
    assert commands <= shown, f"README's What you can do leaves out {commands - shown}"
    for needle in ("output.trackers", "fedlora.run(", "fedlora.compare(", "fedlora.evaluate(", "fedlora.predict("):
        assert needle in section, needle
    assert all(hasattr(fedlora, name) for name in fedlora.__all__)
