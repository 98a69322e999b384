"""The text of ``fedlora methods``: each method's description from its module docstring, the ``method.*`` types in
words, and line breaking that never splits a name or a formula.

A description is the docstring's opening: the paper, then the update rule, up to the first paragraph about
fedlora's own reading (those details live in the source); for a key that shares its module (pFedLoRU, mFedLoRU)
the paragraph that starts with the method's own name is added. Pointers to repository documents (``*.md``),
which an installed package does not have, are removed.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from typing import Any, Literal

FORMULA_GROUP = 24
_DOC_POINTERS = (
    re.compile(r"\s*\((?:see )?[\w/-]+\.md\b[^()]*\)"),  # a parenthesis that is a pointer: (methods.md §4)
    re.compile(r"[,;]\s*[\w/-]+\.md\b[^();]*"),  # a clause that starts with one: ; methods.md §4
    re.compile(r"\s+(?:see|in)\s+[\w/-]+\.md\b(?:\s*§\s*[\d.]+(?:[–-][\d.]+)?)?"),  # in methods.md §9
)


def description(name: str, params: type) -> str:
    """The paragraphs of the method's module docstring that give its paper and update rule, without pointers to
    repository documents; paragraphs are separated by blank lines, formula lines keep their indentation."""
    doc = inspect.cleandoc(importlib.import_module(params.__module__).__doc__ or "")
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", doc)]
    opening = []
    for paragraph in paragraphs:
        if opening and _is_reading(paragraph):
            break
        opening.append(paragraph)
    own = [p for p in paragraphs[len(opening) :] if _starts_with_name(p, name)]
    return "\n\n".join(_clean(p) for p in opening + own)


def _is_reading(paragraph: str) -> bool:
    """A paragraph about fedlora's choices where the paper is silent, or a list of options."""
    first = paragraph.splitlines()[0]
    return "fedlora's" in first or first.startswith(("- ", "* ", "``method."))


def _starts_with_name(paragraph: str, name: str) -> bool:
    return re.sub(r"[^a-z0-9_]", "", paragraph.split(" ", 1)[0].lower()) == name.replace("_", "")


def _clean(paragraph: str) -> str:
    text = paragraph.replace("``", "")
    for pointer in _DOC_POINTERS:
        text = pointer.sub("", text)
    return text


def type_words(hint: Any) -> str:
    """A ``method.*`` type as a user writes it: ``int``, ``float``, ``bool``, the allowed values
    ``newton | als | adam``, ``float or list of float``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_words(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        return f"list of {type_words(args[0])}"
    return getattr(hint, "__name__", str(hint))


def toml_value(value: Any) -> str:
    """A default as it is written in a config: ``true``, ``0.25``, ``newton``, ``[0.5, 0.25]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return str(value)


def parameters(params: type) -> list[tuple[str, str, str]]:
    """(``method.<key>``, type in words, default) for each field of a method's parameter class."""
    hints = typing.get_type_hints(params)
    return [(f"method.{f.name}", type_words(hints[f.name]), toml_value(f.default)) for f in dataclasses.fields(params)]


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` (paragraphs separated by blank lines) in lines of at most ``width`` characters. Prose is filled at
    spaces; lines that start with spaces are formulas: kept as they are when they fit, else broken at their runs of
    two or more spaces and then at spaces outside brackets, so a formula's parts stay whole."""
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        if lines:
            lines.append("")
        lines.extend(_wrap_paragraph(paragraph, width, indent))
    return lines


def _wrap_paragraph(paragraph: str, width: int, indent: str) -> list[str]:
    lines: list[str] = []
    item: list[str] = []  # the prose lines of one run of sentences or of one "- " bullet

    def flush() -> None:
        if item:
            hang = indent + ("  " if item[0].startswith(("- ", "* ")) else "")
            lines.extend(fill_units(_prose_units(_joined(item)), width, indent, hang))
            item.clear()

    for line in paragraph.splitlines():
        if line.startswith("    "):
            flush()
            lines.extend(_formula(line.strip(), width, indent + "    "))
            continue
        if line.startswith(("- ", "* ")):
            flush()
        item.append(line.strip())
    flush()
    return lines


def _joined(lines: list[str]) -> str:
    """Lines of prose as one text; a line that ends with a hyphen continues its word (the docstring broke it)."""
    text = lines[0]
    for line in lines[1:]:
        text += line if text.endswith("-") and not text.endswith(" -") else " " + line
    return text


def _prose_units(text: str) -> list[str]:
    """The words of ``text``, a bracketed group of up to :data:`FORMULA_GROUP` characters kept whole (an inline
    formula such as ``Σ_{u: r_u > i}``); longer groups are prose and break at their spaces."""
    units = outside_brackets(text)
    return [word for unit in units for word in ([unit] if len(unit) <= FORMULA_GROUP else unit.split(" "))]


def _formula(line: str, width: int, indent: str) -> list[str]:
    """A formula line as it is when it fits, else broken at its runs of two or more spaces, then (a part still
    too long) at spaces outside brackets."""
    if len(indent + line) <= width:
        return [indent + line]
    parts = re.split(r"\s{2,}", line)
    units = [u for p in parts for u in (outside_brackets(p) if len(indent + p) > width else [p])]
    return fill_units(units, width, indent, separator="   ")


def outside_brackets(text: str) -> list[str]:
    """``text`` split at the spaces that are not inside (), [] or {}: ``min((Σ_u r_u)(d+k), d·k) base`` gives
    ``min((Σ_u r_u)(d+k), d·k)`` and ``base``."""
    units, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == " " and depth <= 0:
            units.append(text[start:i])
            start = i + 1
    units.append(text[start:])
    return [u for u in units if u]


def fill_units(
    units: list[str], width: int, indent: str = "", hang: str | None = None, separator: str = " "
) -> list[str]:
    """Unbreakable ``units`` joined by ``separator``, greedily, into lines of at most ``width`` characters; the
    first starts with ``indent``, the others with ``hang`` (default ``indent``). A unit longer than a line stands
    alone."""
    lines: list[str] = []
    for unit in units:
        if lines and len(lines[-1] + separator + unit) <= width:
            lines[-1] += separator + unit
        else:
            lines.append((indent if not lines else hang if hang is not None else indent) + unit)
    return lines
