"""Errors the pipeline reports to users: what failed, where, and how to fix it."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on; the CLI prints it without a traceback."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [self.message]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)
