"""Prompts for sklearn's digits: templates per class, some paraphrases held out of training.

A template is a format string with {word} (zero ... nine) and/or {d} (0 ... 9). The
training prompts are every template at every class, class-major within a template, so
that example k of a prompt list (prompt k % P) cycles through the classes.
"""

from __future__ import annotations

from typing import Sequence

from rectflow_jax.configlib import ConfigError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten {word}", "the digit {d}", "the number {word}", "a handwritten digit {d}",
    "a picture of the number {word}", "an image of a {d}", "the numeral {word}", "a {word} written by hand",
    "a drawing of the digit {d}", "{word}",
)
# New phrasings of known words, and one unseen word ("scribbled"), for generalisation.
HELD_OUT_TEMPLATES = (
    "a drawing of a {word}", "the handwritten number {d}", "a picture of the digit {word}",
    "an image of the numeral {d}", "a scribbled {word}",
)


def check_templates(templates: Sequence[str], key: str) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ConfigError(f"{key} must hold at least one template")
    for template in templates:
        if not isinstance(template, str) or ("{word}" not in template and "{d}" not in template):
            raise ConfigError(f"{key} entry {template!r} names no digit: use {{word}} (zero..nine) or {{d}} (0..9)")
        try:
            template.format(word="", d="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"{key} entry {template!r} is not a template of {{word}} and {{d}} ({err})") from None
    return templates


def prompt(template: str, digit: int) -> str:
    return template.format(word=WORDS[digit], d=digit)


def prompt_table(templates: Sequence[str]) -> list[tuple[str, int]]:
    """(prompt, digit) for every template and class, template-major."""
    return [(prompt(template, digit), digit) for template in templates for digit in range(len(WORDS))]
