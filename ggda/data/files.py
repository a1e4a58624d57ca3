"""Reading a user's table (CSV, TSV, Parquet) with errors that name the file and the line.

- :func:`resolve_path`: ``dataset.file`` as given, else under ``paths.data_dir``.
- :func:`read_table`: a DataFrame from CSV/TSV (optionally compressed) or Parquet; empty,
  header-only, unparseable and truncated files fail with the file and line.
- :class:`RowLocator`: the file line (CSV/TSV) or row number (Parquet) of a data row, for
  errors about one cell.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import logging
import lzma
from pathlib import Path

import pandas as pd

from ggda.data.loading import DataFileError
from ggda.errors import ConfigError

log = logging.getLogger(__name__)

COMPRESSION = (".gz", ".bz2", ".xz", ".zip", ".zst")
PARQUET = (".parquet", ".pq")
TSV = (".tsv", ".tab")


def resolve_path(key: str, file: str | None, data_dir: str | None, what: str) -> Path:
    """The path of a data file or folder: ``file`` as given, else under ``data_dir``.

    ``file`` is tried first as given (absolute or relative to the working directory).

    Args:
        key: the config key (``dataset.file`` / ``dataset.root``).
        file: its value.
        data_dir: ``paths.data_dir`` (searched second).
        what: what the file should be, for the errors.

    Raises:
        ConfigError: the key is not set.
        DataFileError: neither path exists; the message lists both.
    """
    if file is None or str(file).strip() in ("", "???"):
        raise ConfigError(key, file, f"the path of {what}", f"Set it, e.g. `{key}=data/mine`.")
    p = Path(str(file)).expanduser()
    tried = [p.resolve()]
    if p.exists():
        return p
    if data_dir is not None and not p.is_absolute():
        q = Path(data_dir).expanduser() / p
        tried.append(q.resolve())
        if q.exists():
            return q
    raise DataFileError(
        f"{key}={file}: not found (looked for {', '.join(map(str, tried))}). Give the path "
        f"of {what}, absolute or relative to the directory you run from (or to "
        "paths.data_dir)."
    )


def table_format(path: Path, sep: str | None = None) -> tuple[str, str | None]:
    """("parquet" | "csv", separator) from the file name (compression suffixes ignored)."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    if last in PARQUET:
        return "parquet", None
    if sep is not None:
        return "csv", sep
    return "csv", "\t" if last in TSV else ","


def _open_text(path: Path):
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


class RowLocator:
    """Where data row ``i`` (0-based, blank lines skipped, as pandas reads it) sits in the file.

    For CSV/TSV the file is scanned once with :mod:`csv` (only when an error needs it): the
    first line of every record and its number of fields. Parquet rows are numbered 1...
    """

    def __init__(self, path: Path, fmt: str, sep: str | None) -> None:
        self.path, self.fmt, self.sep = path, fmt, sep
        self._lines: list[int] | None = None
        self._fields: list[int] | None = None
        self.header_fields = 0

    def _scan(self) -> None:
        if self._lines is not None:
            return
        lines, fields = [], []
        try:
            with _open_text(self.path) as f:
                reader = csv.reader(f, delimiter=self.sep or ",")
                prev = 0
                for rec in reader:
                    start, prev = prev + 1, reader.line_num
                    if not rec:
                        continue
                    lines.append(start)
                    fields.append(len(rec))
        except (OSError, csv.Error, UnicodeDecodeError):
            lines, fields = [], []  # fall back to the plain "row N" numbering
        if lines:
            self.header_fields = fields[0]
            lines, fields = lines[1:], fields[1:]
        self._lines, self._fields = lines, fields

    def where(self, i: int) -> str:
        """``"line 17"`` (CSV/TSV) or ``"row 16"`` (Parquet; 1-based data rows)."""
        if self.fmt == "csv":
            self._scan()
            if self._lines and i < len(self._lines):
                return f"line {self._lines[i]}"
            return f"line {i + 2}"
        return f"row {i + 1}"

    def short_rows(self) -> list[tuple[int, int]]:
        """(line, fields) of every record with fewer fields than the header (CSV/TSV)."""
        if self.fmt != "csv":
            return []
        self._scan()
        assert self._lines is not None and self._fields is not None
        pairs = zip(self._lines, self._fields, strict=True)
        return [(ln, k) for ln, k in pairs if k < self.header_fields]


def read_table(path: Path, sep: str | None = None) -> tuple[pd.DataFrame, RowLocator]:
    """A DataFrame of the file with stripped column names, and a locator of its rows.

    Raises:
        DataFileError: unreadable, empty, header-only, unparseable or truncated (a record
            with fewer fields than the header), naming the file and line.
    """
    fmt, sep = table_format(path, sep)
    loc = RowLocator(path, fmt, sep)
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise DataFileError(
                f"{path}: reading Parquet needs the package pyarrow (`pip install pyarrow`; "
                "it is a dependency of ggda, so `pip install -e .` installs it)"
            ) from e
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
            raise DataFileError(
                f"{path}: cannot be read as Parquet ({type(e).__name__}: {e}). Is it a "
                "complete Parquet file? Rename CSV files to .csv"
            ) from e
    else:
        kind = "TSV" if sep == "\t" else "CSV"
        try:
            # index_col=False: a row with one field too many must not silently turn the
            # first column into an index.
            df = pd.read_csv(path, sep=sep, index_col=False)
        except pd.errors.EmptyDataError as e:
            raise DataFileError(
                f"{path}: is empty (no header row). Expected {kind} with a header row of "
                "column names, then one row per example"
            ) from e
        except pd.errors.ParserError as e:
            raise DataFileError(
                f"{path}: cannot be parsed as {kind} ({e}). Repair or delete that line"
                + ("; for another separator set `dataset.sep`" if sep == "," else "")
            ) from e
        except UnicodeDecodeError as e:
            raise DataFileError(f"{path}: is not UTF-8 text ({e}); save it as UTF-8 {kind}") from e
        except OSError as e:
            raise DataFileError(f"{path}: cannot be read ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise DataFileError(
            f"{path}: has a header row ({', '.join(df.columns[:6])}"
            f"{', ...' if df.shape[1] > 6 else ''}) but no data rows"
        )
    if fmt == "csv" and df.isna().any().any():
        short = loc.short_rows()
        if short:
            line, k = short[0]
            more = f" (and {len(short) - 1} more short lines)" if len(short) > 1 else ""
            raise DataFileError(
                f"{path}: line {line} has {k} fields but the header has {loc.header_fields}"
                f"{more}: the file looks truncated or the line is malformed. Repair or delete "
                "that line (or get the complete file again)"
            )
    return df, loc
