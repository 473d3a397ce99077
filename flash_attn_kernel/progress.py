"""Build progress: one bar per build group (its variants), the file being compiled, check results."""

from __future__ import annotations

import re

# NINJA_STATUS="[%f/%t] " makes every ninja line start with finished/total edges.
_STATUS = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")
# "Building CXX object CMakeFiles/kernel_x.dir/work/main/csrc/cpu/flash_cpu.cpp.o"
_OBJECT = re.compile(r"Building (\w+) object CMakeFiles/(\w+)\.dir(/\S+?)\.o$")
_LINK = re.compile(r"Linking \w+ (?:shared module|static library) (\S+)$")


def make_console():
    """A rich console; when output is not a terminal, wide enough that tables do not fold."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


class BuildProgress:
    """Shows compile progress with rich; also the logger toolchain fetches report through."""

    def __init__(self, console=None):
        self.console = console or make_console()
        self._progress = None
        self._task = None
        self._targets: dict[str, str] = {}

    def __enter__(self) -> "BuildProgress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[current]}"), console=self.console, transient=False,
        )
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def log(self, message: str) -> None:
        """A line above the bars (or plain when no bar is shown)."""
        self.console.print(message, markup=False, highlight=False)

    def start_group(self, group: str, targets: dict[str, str]) -> None:
        """A new bar for one CMake group; `targets` maps extension targets to variant names."""
        self._targets = targets
        self.log(f"building {group}: {', '.join(targets.values())}")
        if self._progress is not None:
            self._task = self._progress.add_task(group, total=None, current="configuring")

    def finish_group(self) -> None:
        """Mark the current bar complete (ninja prints nothing when everything is up to date)."""
        if self._progress is not None and self._task is not None:
            total = self._progress.tasks[-1].total or 1
            self._progress.update(self._task, completed=total, total=total, current="done")

    def ninja_line(self, line: str) -> None:
        """Advance the bar from one line of ninja output."""
        m = _STATUS.match(line.strip())
        if m is None or self._progress is None or self._task is None:
            return
        done, total, what = int(m.group(1)), int(m.group(2)), m.group(3)
        obj = _OBJECT.search(what)
        link = _LINK.search(what)
        if obj:
            # Kernel objects are shared by the group; binding objects belong to one variant.
            owner = self._targets.get(obj.group(2), "kernels")
            current = f"{obj.group(3).rsplit('/', 1)[-1]} [{owner}]"
        elif link:
            current = f"linking {link.group(1).rsplit('/', 1)[-1]}"
        else:
            current = ""
        self._progress.update(self._task, completed=done, total=total, current=current)

    def report(self, report) -> None:
        """One line per checked variant: which checks passed, the manylinux level reached."""
        state = {True: "ok", False: "FAIL", None: "skip"}
        marks = " ".join(f"{r.name}:{state[r.passed]}" for r in report.results)
        level = f" ({report.manylinux})" if report.manylinux else ""
        self.log(f"{report.variant}: {marks}{level}")
        for r in report.results:
            if r.passed is False:
                self.log(f"  {r.summary()}")
