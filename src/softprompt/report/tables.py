"""A report table (one CSV and one HTML table) and how its numbers print."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Table:
    name: str  # the CSV file stem
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):  # accuracies and distances to 0.1; small numbers (cosines, p-values) to 3 significant digits
        return f"{value:.{digits}f}" if abs(value) >= 10 or value == 0 else f"{value:.3g}"
    return str(value)


def to_csv(table: Table) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows([["" if v is None else v for v in row] for row in table.rows])
    return buffer.getvalue().encode()
