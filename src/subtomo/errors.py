"""The one exception type for bad user input.

Every reader and validator raises :class:`InputError` with the file, block, column and row
it concerns, so the command line can print one actionable line instead of a traceback.
"""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad input: names where it is (file, block, column, row) and what was expected.

    Rows are reported 1-based, as a person counts lines of a table.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike | None = None,
        block: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.block = block
        self.column = column
        self.row = row
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.block is not None:
            where.append(f"block data_{self.block}")
        if self.column is not None:
            where.append(f"column {self.column}")
        if self.row is not None:
            where.append(f"row {self.row}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason
