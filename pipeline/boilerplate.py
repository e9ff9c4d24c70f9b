"""Non-content wrappers stripped at read time: Project Gutenberg's header and license, and the user's patterns.

A Project Gutenberg file wraps the book between a `*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***`
line (before it: the title page of the file, its release date, credits) and a `*** END OF THE PROJECT
GUTENBERG EBOOK <TITLE> ***` line (after it: the license, "Project Gutenberg is a nonprofit ..."). Older
files say "THIS PROJECT GUTENBERG EBOOK" or "ETEXT", and may end the book with a line "End of the Project
Gutenberg EBook of ...". Only these standard markers are used: broader heuristics (e.g. gutenberg-cleaner's
"Produced by" markers) also cut real text. Questions about a license would teach nothing.
"""

from __future__ import annotations

import re

_START = re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b[^\n]*\n?", re.I | re.M)
_END = re.compile(r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E(?:BOOK|TEXT)\b", re.I | re.M)
# "End of the Project Gutenberg EBook of X", "End of Project Gutenberg's X": the last line of the book itself
_END_LINE = re.compile(r"^[ \t]*End of (?:the |this )?Project Gutenberg(?:'s)?\b[^\n]*$", re.I | re.M)
_TAIL_CHARS = 2000  # where an "End of ..." line may sit: just before the END marker


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """(the book without its Project Gutenberg header and footer, whether anything was stripped)."""
    start = _START.search(text)
    end = _END.search(text, start.end() if start else 0)
    if not start and not end:
        return text, False
    body = text[start.end() if start else 0: end.start() if end else len(text)]
    tail = _END_LINE.search(body, max(0, len(body) - _TAIL_CHARS))
    if tail:
        body = body[:tail.start()]
    return body.strip("\n") + "\n", True


def strip_boilerplate(text: str, gutenberg: bool, patterns: list[str]) -> tuple[str, list[str]]:
    """(text without its wrappers, the kinds stripped: "gutenberg", "pattern:<n>")."""
    kinds = []
    if gutenberg:
        text, stripped = strip_gutenberg(text)
        if stripped:
            kinds.append("gutenberg")
    for n, pattern in enumerate(patterns):
        text, count = re.subn(pattern, "", text, flags=re.M | re.S)
        if count:
            kinds.append(f"pattern:{n}")
    return text, kinds
