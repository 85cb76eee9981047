"""Differences between two texts as HTML: a word diff for model outputs, a line diff (with
the words that changed inside changed lines) for prompts. The texts are model output and
user input, so every piece of them is escaped; the only markup is our own <ins> and <del>.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

# A word or a punctuation mark with the whitespace after it: whitespace stays in the text
# (newlines included, so the diff gives the text back exactly), yet never forms tokens of its
# own, which would repeat so often that matching them grows quadratic.
_TOKENS = re.compile(r"\s+|\w+\s*|[^\w\s]\s*", re.UNICODE)
_TRAILING_SPACE = re.compile(r"\s*$")
# SequenceMatcher's autojunk (on from 200 tokens) ignores tokens that make up over 1 % of the
# text: fast on degenerate output ("......" a thousand times), but common words then never
# match. Gaps it leaves shorter than this are matched again without it.
_REFINE_TOKENS = 200
# Past this many characters a side, the rest of the text is shown plainly after the diff, so
# one huge output cannot stall a page of rows.
MAX_DIFF_CHARS = 8_000


@dataclass(frozen=True)
class Diff:
    """An HTML rendering of `new` against `old`, and whether they differ at all."""

    html: SafeString
    changed: bool


def _tokens(text: str) -> list[str]:
    return _TOKENS.findall(text)


def _piece(tag: str, text: str) -> SafeString:
    if not text:
        return mark_safe("")
    if tag == "ins":
        return format_html("<ins>{}</ins>", text)
    if tag == "del":
        return format_html("<del>{}</del>", text)
    return escape(text)


def _join(pieces: list[SafeString]) -> SafeString:
    # Every piece came out of format_html, so joining them keeps them safe.
    return mark_safe("".join(pieces))


def _opcodes(a: list[str], b: list[str]) -> list[tuple[str, int, int, int, int]]:
    """Opcodes turning `a` into `b`, matching words whatever whitespace follows them."""
    a, b = [token.rstrip() or token for token in a], [token.rstrip() or token for token in b]
    found = []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b).get_opcodes():
        refine = len(b) >= _REFINE_TOKENS and op != "equal"
        if refine and i2 - i1 < _REFINE_TOKENS and j2 - j1 < _REFINE_TOKENS:
            inner = SequenceMatcher(None, a[i1:i2], b[j1:j2], autojunk=False).get_opcodes()
            found += [(o, i1 + p1, i1 + p2, j1 + q1, j1 + q2) for o, p1, p2, q1, q2 in inner]
        else:
            found.append((op, i1, i2, j1, j2))
    return found


def _equal_pieces(a: list[str], b: list[str]) -> list[SafeString]:
    """The same words; where the whitespace after one changed, that whitespace is marked."""
    if a == b:
        return [_piece("", "".join(b))]
    pieces: list[SafeString] = []
    for before, after in zip(a, b, strict=True):
        if before == after:
            pieces.append(_piece("", after))
            continue
        word = after.rstrip() or after
        pieces.append(_piece("", word))
        if before[len(word) :]:
            pieces.append(format_html('<del class="space">{}</del>', before[len(word) :]))
        if after[len(word) :]:
            pieces.append(format_html('<ins class="space">{}</ins>', after[len(word) :]))
    return pieces


def _word_pieces(old: str, new: str) -> list[SafeString]:
    a, b = _tokens(old), _tokens(new)
    ops = _opcodes(a, b)
    pieces: list[SafeString] = []
    carried = ("", "")  # whitespace moved from the end of an equal run into the change after
    for k, (op, i1, i2, j1, j2) in enumerate(ops):
        if op == "equal":
            same_a, same_b = a[i1:i2], b[j1:j2]
            if k + 1 < len(ops) and same_a[-1] != same_b[-1]:
                # "brief." -> "brief and kind.": the space after "brief" is part of the
                # insertion, so it reads "brief<ins> and kind</ins>.", not two changes.
                word = same_b[-1].rstrip() or same_b[-1]
                carried = (same_a[-1][len(word) :], same_b[-1][len(word) :])
                pieces += _equal_pieces(same_a[:-1], same_b[:-1])
                pieces.append(_piece("", word))
            else:
                pieces += _equal_pieces(same_a, same_b)
            continue
        before, after = carried[0] + "".join(a[i1:i2]), carried[1] + "".join(b[j1:j2])
        carried = ("", "")
        # "you " -> "them ": the space after the word did not change, so it stays outside.
        space = _TRAILING_SPACE.search(after).group()
        kept = space if before.endswith(space) else ""
        pieces.append(_piece("del", before[: len(before) - len(kept)]))
        pieces.append(_piece("ins", after[: len(after) - len(kept)]))
        pieces.append(_piece("", kept))
    return pieces


def word_diff(old: str, new: str) -> Diff:
    """`new` with the words `old` lacks in <ins> and the words it dropped in <del>."""
    old, new = old or "", new or ""
    if old == new:
        return Diff(escape(new), False)
    head_old, head_new = old[:MAX_DIFF_CHARS], new[:MAX_DIFF_CHARS]
    pieces = _word_pieces(head_old, head_new)
    rest = new[MAX_DIFF_CHARS:]
    if rest:
        pieces.append(format_html('<span class="diff-rest">{}</span>', rest))
    return Diff(_join(pieces), True)


def line_diff(old: str, new: str) -> Diff:
    """`new` line by line against `old`: unchanged lines plain, added lines in <ins>, removed
    ones in <del>, and a block of changed lines as a word diff of that block, so a one-word
    edit in a long prompt shows as that word. Newlines are kept: show it in a <pre>."""
    old, new = old or "", new or ""
    if old == new:
        return Diff(escape(new), False)
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    pieces: list[SafeString] = []
    for op, i1, i2, j1, j2 in _opcodes(a, b):
        before, after = "".join(a[i1:i2]), "".join(b[j1:j2])
        if op == "equal":
            pieces.append(_piece("", after))
        elif op == "replace" and len(before) + len(after) <= 2 * MAX_DIFF_CHARS:
            pieces.extend(_word_pieces(before, after))
        else:
            pieces.append(_piece("del", before))
            pieces.append(_piece("ins", after))
    return Diff(_join(pieces), True)
