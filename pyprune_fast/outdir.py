"""A run's output directory, written as one transaction on top of `io`'s staged writes.

`OutDir(path)` checks the directory before any work. With `whole=True` the run's whole output is
staged in a temporary sibling directory and switched in by `commit()` with one rename, replacing an
earlier run's output as a whole (a directory holding anything else is refused); otherwise the
directory is created and files are renamed into it one by one (`io.Staged`), and with `also` a
directory holding anything but an earlier output and those names is refused as well. `remove_created()`
takes away the staging and the directories the run created. Refusals, and writes that fail inside
`writes()`, are `UsageError`s: the directory is the user's."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Collection, Iterator

from .errors import UsageError
from .io import commit_dir, discard, new_temp, new_temp_dir


def earlier_output(path: str, command: list[str]) -> set[str]:
    """The entries of the directory that an earlier run of `command` wrote there.

    Args:
        path: the directory.
        command: the first words of the command line its report.json records (`["pyprune-fast", "prune"]`).

    Returns:
        The top-level names of the "files" its report.json lists, with report.json itself; none
        without such a report.
    """
    try:
        with open(os.path.join(path, "report.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return set()
    recorded = report.get("command") if isinstance(report, dict) else None
    files = report.get("files") if isinstance(report, dict) else None
    if not (isinstance(recorded, list) and recorded[: len(command)] == command and isinstance(files, list)):
        return set()
    return {"report.json"} | {f.replace(os.sep, "/").split("/")[0] for f in files if isinstance(f, str)}


class OutDir:
    """The output directory of a run (see the module docstring).

    Args:
        path: the directory.
        whole: stage the whole output and switch it in with one rename (`commit`); the directory must
            be new, empty, or hold an earlier output of `command`.
        command: the command whose earlier output `whole` may replace (`earlier_output`).
        also: without `whole`, check the directory as `whole` does, allowing these names besides an
            earlier output (what the run writes there whose writer checks it: offloaded checkpoints);
            None: no check.

    Raises:
        UsageError: `path` is a file, is (or holds) the working directory, holds other files (with
            `whole` or `also`), or cannot be written.
    """

    def __init__(
        self,
        path: str,
        whole: bool = False,
        command: tuple[str, ...] = ("pyprune-fast", "prune"),
        also: Collection[str] | None = None,
    ) -> None:
        self.path, self.staging, self.created = path, None, []
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"output directory {path!r} exists and is not a directory")
        if (whole or also is not None) and os.path.isdir(path):
            absolute = os.path.abspath(path)
            name = " ".join(command)
            if whole and os.path.commonpath([absolute, os.getcwd()]) == absolute:
                raise UsageError(
                    f"output directory {path!r} is the working directory or holds it; {name} replaces its output "
                    "directory as a whole: choose a new or empty directory"
                )
            foreign = sorted(set(os.listdir(path)) - earlier_output(path, list(command)) - set(also or ()))
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                how = "replaces its output directory as a whole" if whole else "writes its reports there"
                raise UsageError(
                    f"output directory {path!r} holds files that are not the output of an earlier {name} ({shown}); "
                    f"{name} {how}: choose a new or empty directory"
                )
        head = os.path.abspath(path)
        if whole:
            head = os.path.dirname(head)  # the directory itself is made by the final rename
        while not os.path.exists(head):
            self.created.append(head)
            head = os.path.dirname(head)
        try:
            if whole:
                self.staging = new_temp_dir(os.path.realpath(path))  # a symlinked directory: its target
            else:
                os.makedirs(path, exist_ok=True)
                discard(new_temp(os.path.join(path, "probe")))
        except OSError as exc:
            self.remove_created()
            raise UsageError(f"output directory {path!r} cannot be written: {exc.strerror or exc}") from exc

    def file(self, name: str) -> str:
        """Where the output file `name` is written now.

        Args:
            name: a path relative to the output directory.

        Returns:
            Its path in the staging directory (with `whole`), else in the output directory.
        """
        return os.path.join(self.staging or self.path, name)

    def locate(self, path: str) -> str:
        """Where `path` is written now.

        Args:
            path: any path.

        Returns:
            Its place inside the staging directory when it lies under the output directory, else `path`.
        """
        absolute, out = os.path.abspath(path), os.path.abspath(self.path)
        if self.staging is None or os.path.commonpath([absolute, out]) != out:
            return path
        return os.path.join(self.staging, os.path.relpath(absolute, out))

    @contextlib.contextmanager
    def writes(self) -> Iterator[None]:
        """A block that writes the output: an OSError inside it (a full disk, permissions taken away)
        becomes a UsageError naming the output directory; every other error passes unchanged."""
        try:
            yield
        except OSError as exc:
            raise UsageError(f"output directory {self.path!r} cannot be written: {exc}") from exc

    def commit(self) -> None:
        """With `whole`: the staged output becomes the output directory in one rename (an earlier output
        is moved aside first and removed once the new one is in place, or put back if the rename
        fails). Without: nothing to do."""
        if self.staging is None:
            return
        try:
            mode = os.stat(os.path.realpath(self.path)).st_mode & 0o7777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o777 & ~umask
        os.chmod(self.staging, mode)  # mkdtemp made it 0o700
        commit_dir(self.staging, os.path.realpath(self.path))
        self.staging = None

    def remove_created(self) -> None:
        """Removes the staging directory and the directories this run created (those still empty)."""
        if self.staging is not None:
            discard(self.staging)
            self.staging = None
        for directory in self.created:
            try:
                os.rmdir(directory)
            except OSError:
                return
