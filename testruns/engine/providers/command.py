"""The `command` kind: a local program, run without a shell, prompt on stdin and answer on
stdout, with its output bounded like a vendor's answer."""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from dataclasses import dataclass

from testruns.engine.providers.completion import (
    VENDOR_MESSAGE_CHARS,
    Completion,
    Kind,
    ProviderError,
    rough_tokens,
)
from testruns.engine.providers.transport import max_response_bytes, size_label
from testruns.models import Provider

EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, try again later"


def call_command(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """Run the provider's program without a shell: prompt on stdin, answer on stdout, the
    system prompt in $PROMPT_SYSTEM.

    A timeout is not retryable: the same program on the same machine with the same input
    would most likely run as long again, so a retry only doubles the wait. A program that
    knows better exits with 75 (EX_TEMPFAIL), which is retryable. Its stdout is read up to
    max_response_bytes() and the program is stopped beyond that.
    """
    try:
        args = shlex.split(provider.command)
    except ValueError as exc:
        raise ProviderError(f"the command cannot be parsed: {exc}", kind=Kind.CONFIG) from None
    if not args:
        raise ProviderError("no command is configured", kind=Kind.CONFIG)
    limit = max_response_bytes()
    try:
        done = _run_bounded(args, prompt, timeout, {**os.environ, "PROMPT_SYSTEM": system}, limit)
    except OSError as exc:  # not found, not executable
        raise ProviderError(
            f"command could not start: {args[0]}: {exc.strerror}", kind=Kind.CONFIG
        ) from None
    if done.timed_out:
        raise ProviderError(f"command timed out after {timeout:.1f}s", kind=Kind.TIMEOUT)
    if done.too_large:
        raise ProviderError(
            f"the command's answer was larger than {size_label(limit)} "
            "(the limit VENDOR_MAX_RESPONSE_BYTES sets)",
            kind=Kind.BAD_RESPONSE,
        )
    if done.returncode:
        code = done.returncode
        how = f"status {code}" if code > 0 else f"signal {-code}"
        tail = done.stderr.strip()[-VENDOR_MESSAGE_CHARS:] or "(no output on stderr)"
        raise ProviderError(
            f"command exited with {how}: {tail}",
            kind=Kind.COMMAND_FAILED,
            retryable=code == EX_TEMPFAIL,
        )
    text = done.stdout.strip()
    return Completion(text, rough_tokens(system + prompt), rough_tokens(text))


@dataclass
class _Finished:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    too_large: bool = False


STDERR_KEPT_BYTES = 64 * 1024  # only the tail of stderr is shown; the rest is not kept


def _run_bounded(
    args: list[str], stdin: str, timeout: float, env: dict[str, str], limit: int
) -> _Finished:
    """subprocess.run(capture_output=True), minus its appetite: stdout is read up to `limit`
    bytes (the program is killed past it) and only the last STDERR_KEPT_BYTES of stderr are
    kept. One thread per pipe, so that a program writing a lot to one never blocks on it."""
    process = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        shell=False,
    )
    out, err = bytearray(), bytearray()
    too_large = threading.Event()

    def feed() -> None:
        try:
            process.stdin.write(stdin.encode("utf-8", "replace"))
        except OSError:  # the program exited without reading it all: its business
            pass
        finally:
            try:
                process.stdin.close()
            except OSError:
                pass

    def read_out() -> None:
        while chunk := process.stdout.read1(65536):
            if len(out) + len(chunk) > limit:
                too_large.set()
                process.kill()
                return
            out.extend(chunk)

    def read_err() -> None:
        while chunk := process.stderr.read1(65536):
            err.extend(chunk)
            del err[:-STDERR_KEPT_BYTES]

    threads = [threading.Thread(target=fn, daemon=True) for fn in (feed, read_out, read_err)]
    for thread in threads:
        thread.start()
    timed_out = False
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        process.kill()
        process.wait()
    for thread in threads:
        # A grandchild holding the pipes open must not hold this thread: the pipes are left
        # to it, and closed when it ends.
        thread.join(timeout=1)
    for pipe in (process.stdout, process.stderr):
        try:
            pipe.close()
        except OSError:
            pass
    return _Finished(
        process.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        timed_out=timed_out,
        too_large=too_large.is_set(),
    )
