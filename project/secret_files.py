"""Secrets generated on first use and kept in files only their owner can read (mode 600):
the embedded servers' passwords and make run's SECRET_KEY. Replaced atomically, so a crash
never leaves half a secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_secret(nbytes: int = 24) -> str:
    """URL-safe, so it goes into DATABASE_URL / REDIS_URL without quoting."""
    return secrets.token_urlsafe(nbytes)


def read_secret(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # var/ is world-traversable for the postgres account
    return value or None


def write_secret(path: Path, value: str) -> None:
    """Mode 600 from the first byte, and replaced atomically so a crash leaves no half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.replace(partial, path)


def load_or_create_secret(path: Path, nbytes: int = 24) -> str:
    value = read_secret(path)
    if value is None:
        value = new_secret(nbytes)
        write_secret(path, value)
    return value
