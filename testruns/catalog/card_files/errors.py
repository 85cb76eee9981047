"""The one error an import raises for bad input, and how a problem names its place."""

from __future__ import annotations


class CardFileError(Exception):
    """Bad input; every message names the file and the place in it."""

    def __init__(self, errors: list[str]):
        self.errors = list(dict.fromkeys(errors))  # a shared test fails once, not per card
        super().__init__("\n".join(self.errors))


def fail(filename: str, where: str, message: str) -> CardFileError:
    """The error for one problem: `<file>: <place>: <message>`, or without a place."""
    return CardFileError([f"{filename}: {where}: {message}" if where else f"{filename}: {message}"])
