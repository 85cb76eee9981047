"""A promptfoo project's files, from a folder on disk (the CLI) or a zip (the CLI, the API, the
admin page): what `file://` references read, each path taken relative to the folder of the
config that names it and never outside the project.

A zip is checked whole before anything is read: at most MAX_FILES entries and
MAX_TOTAL_BYTES unpacked, each file at most MAX_BYTES, no absolute paths, no `..`, no links,
no encryption; every problem is reported at once. A folder is read lazily, each path resolved
(links included) and refused when it lands outside the folder.
"""

from __future__ import annotations

import fnmatch
import io
import posixpath
import stat
import zipfile
from pathlib import Path, PurePosixPath

from testruns.catalog.card_files.errors import CardFileError
from testruns.catalog.card_files.parsing import MAX_BYTES

MAX_FILES = 2000
MAX_TOTAL_BYTES = 50 * 2**20
CONFIG_NAMES = ("promptfooconfig.yaml", "promptfooconfig.yml", "promptfooconfig.json")


class ProjectFiles:
    """Files by their path inside the project (POSIX, no leading slash)."""

    def __init__(
        self, name: str, *, folder: Path | None = None, files: dict[str, bytes] | None = None
    ):
        self.name = name  # the project's own name: the folder's or the zip's
        self._folder = folder.resolve() if folder else None
        self._files = files
        self.only: list[str] | None = None  # the configs to import, when not all of them

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path) -> ProjectFiles:
        return cls(folder.resolve().name, folder=folder)

    @classmethod
    def for_config(cls, config: Path) -> ProjectFiles:
        """The folder of one config file given on its own: only it is imported."""
        project = cls.from_folder(config.parent)
        project.only = [config.name]
        return project

    @classmethod
    def from_zip(cls, content: bytes, filename: str) -> ProjectFiles:
        """The zip's files, or CardFileError listing every reason it is refused."""
        label = PurePosixPath(filename).name
        if len(content) > MAX_TOTAL_BYTES:
            raise CardFileError([f"{label}: larger than the limit of {MAX_TOTAL_BYTES >> 20} MB"])
        try:
            archive = zipfile.ZipFile(io.BytesIO(content))
            infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CardFileError([f"{label}: not a zip file ({exc})"]) from None
        errors: list[str] = []
        files = [info for info in infos if not info.is_dir()]
        if len(files) > MAX_FILES:
            errors.append(f"{label}: {len(files)} files is more than the limit of {MAX_FILES}")
        total = sum(info.file_size for info in files)
        if total > MAX_TOTAL_BYTES:
            errors.append(
                f"{label}: {total >> 20} MB unpacked is more than the limit of "
                f"{MAX_TOTAL_BYTES >> 20} MB"
            )
        for info in files:
            problem = _entry_problem(info)
            if problem:
                errors.append(f"{label}: {info.filename}: {problem}")
        if errors:
            raise CardFileError(errors)
        data: dict[str, bytes] = {}
        for info in files:
            try:
                with archive.open(info) as member:
                    # One byte past the limit: a size in the header that lies is caught too.
                    body = member.read(MAX_BYTES + 1)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
                errors.append(f"{label}: {info.filename}: cannot be read ({exc})")
                continue
            if len(body) > MAX_BYTES:
                errors.append(f"{label}: {info.filename}: larger than {MAX_BYTES >> 20} MB")
            data[_normal(info.filename)] = body
        if errors:
            raise CardFileError(errors)
        files_by_path, top = _without_common_folder(data)
        return cls(top or PurePosixPath(label).stem, files=files_by_path)

    # -- reading ------------------------------------------------------------------------------

    def paths(self) -> list[str]:
        """Every file's path, sorted; a folder is walked without following links out."""
        if self._files is not None:
            return sorted(self._files)
        found = []
        for path in sorted(self._folder.rglob("*")):
            if len(found) > MAX_FILES:
                break
            if path.is_file() and self._inside(path):
                found.append(path.relative_to(self._folder).as_posix())
        return found

    def configs(self) -> list[str]:
        if self.only is not None:
            return list(self.only)
        return [p for p in self.paths() if PurePosixPath(p).name in CONFIG_NAMES]

    def read(self, path: str) -> bytes:
        """The file's bytes; OSError (with a reason fit to show) when it cannot be read."""
        if self._files is not None:
            if path not in self._files:
                raise FileNotFoundError("no such file in the project")
            return self._files[path]
        target = self._folder / path
        if not self._inside(target):
            raise PermissionError("it is outside the project's folder")
        if not target.is_file():
            raise FileNotFoundError("no such file in the project")
        with target.open("rb") as file:
            body = file.read(MAX_BYTES + 1)
        if len(body) > MAX_BYTES:
            raise OSError(f"larger than {MAX_BYTES >> 20} MB")
        return body

    def resolve(self, base: str, reference: str) -> list[str]:
        """The project paths a `file://` reference names from the folder `base`: one path,
        or every match of a glob. ValueError when it leaves the project."""
        joined = posixpath.normpath(posixpath.join(base, reference))
        if joined.startswith("../") or joined == ".." or posixpath.isabs(reference):
            raise ValueError("it points outside the project")
        if any(char in reference for char in "*?["):
            return [path for path in self.paths() if fnmatch.fnmatchcase(path, joined)]
        return [joined]

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self._folder)
        except OSError:
            return False


def _entry_problem(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if info.flag_bits & 0x1:
        return "encrypted entries are not supported"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "links are not allowed in the zip"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "absolute paths are not allowed in the zip"
    if ".." in PurePosixPath(name).parts:
        return "paths with .. are not allowed in the zip"
    if info.file_size > MAX_BYTES:
        return f"larger than {MAX_BYTES >> 20} MB"
    return ""


def _normal(name: str) -> str:
    return posixpath.normpath(name).lstrip("/")


def _without_common_folder(files: dict[str, bytes]) -> tuple[dict[str, bytes], str]:
    """Zipping a folder usually puts everything under its name: that folder is the project
    (and names it)."""
    tops = {path.split("/", 1)[0] for path in files}
    if len(tops) == 1 and all("/" in path for path in files):
        top = tops.pop()
        return {path[len(top) + 1 :]: body for path, body in files.items()}, top
    return files, ""
