"""``energy-monitor report``: build the document once, render it, write the files.

One run builds one document (:func:`monitor.report.build.build_report`) and renders
every format it writes from it, so ``--format all`` gives ``report.json``,
``report.csv``, ``report.html`` (and the page in the other languages) under one
content digest, with a manifest of the files' own SHA-256 sums.  Files are
replaced atomically: a reader never sees half a report.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from monitor.config import Config
from monitor.core.periods import month
from monitor.report.build import build_report, check_started
from monitor.report.render import FORMATS, LANGS, renderer, to_csv, to_html, to_json
from monitor.store.db import StoreError
from monitor.store.ledger import Store

ALL = "all"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_all(report: Mapping[str, Any], lang: str = "en") -> dict[str, str]:
    """Every file of ``--format all``: name -> text.  ``report.html`` is in ``lang``;
    each other language's page is ``report.<lang>.html``."""
    files = {"report.json": to_json(report), "report.csv": to_csv(report),
             "report.html": to_html(report, lang)}
    for other in LANGS:
        if other != lang:
            files[f"report.{other}.html"] = to_html(report, other)
    return files


def manifest(report: Mapping[str, Any], files: Mapping[str, str], lang: str) -> dict[str, Any]:
    """The manifest of one ``--format all`` run: the report's content digest (the
    same in every file) and each file's own SHA-256 and size."""
    return {
        "report": report["report"],
        "period": report["period"]["label"],
        "site": report["site"]["id"],
        "generated_at": report["generated_at"],
        "sha256": report["sha256"],
        "lang": lang,
        "files": [{"name": name, "bytes": len(text.encode("utf-8")),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
                  for name, text in files.items()],
    }


def write_all(report: Mapping[str, Any], out_dir: Path, lang: str = "en") -> dict[str, Any]:
    """Write every format of ``report`` into ``out_dir`` (created if missing), then
    ``manifest.json`` and ``SHA256SUMS`` (``sha256sum -c SHA256SUMS`` checks the
    files, the manifest included).  Returns the manifest.  Raises :class:`OSError`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = render_all(report, lang)
    doc = manifest(report, files, lang)
    files[MANIFEST] = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    for name, text in files.items():
        write_atomic(out_dir / name, text)
    sums = "".join(f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}  {name}\n"
                   for name, text in files.items())
    write_atomic(out_dir / SUMS, sums)
    return doc


def run(config: Config, period: str, fmt: str = "json", out_path: Path | str | None = None,
        *, lang: str = "en", now: float | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """``energy-monitor report``: build, render, write to ``out_path`` or stdout.

    ``fmt`` is ``json``, ``csv``, ``html`` or ``all`` (every format into the
    directory ``out_path``).  Raises :class:`ValueError` for a usage error before
    anything is opened: a malformed ``period``, a month that has not begun at
    ``now``, an unknown ``fmt`` or ``lang``, or ``all`` without ``out_path``.
    Returns 0, or 1 when the store cannot be read or the output cannot be
    written (the reason on ``stderr``).
    """
    now = time.time() if now is None else now
    check_started(month(period, config.site.tz), now)
    if fmt != ALL:
        render = renderer(fmt, lang)
    elif lang not in LANGS:
        raise ValueError(f"language must be one of {', '.join(LANGS)}, not {lang!r}")
    elif out_path is None:
        raise ValueError("--format all writes several files: give --out DIR (a directory)")
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        store = Store(Path(config.storage.path), readonly=True)
    except StoreError as exc:
        print(f"cannot open the store: {exc}", file=err)
        return 1
    try:
        report = build_report(store, config, period, now)
    except Exception as exc:  # noqa: BLE001 - any read failure is a run-time failure, exit 1
        print(f"cannot build the report: {exc}", file=err)
        return 1
    finally:
        store.close()
    label = report["period"]["label"]
    if fmt == ALL:
        assert out_path is not None
        try:
            doc = write_all(report, Path(out_path), lang)
        except OSError as exc:
            print(f"cannot write into {out_path}: {exc}", file=err)
            return 1
        names = ", ".join(f["name"] for f in doc["files"])
        print(f"report {label} written to {out_path}: {names}, {SUMS} "
              f"(sha256 {report['sha256']})", file=err)
        return 0
    text = render(report)
    if out_path is None:
        out.write(text)
        out.flush()
        return 0
    try:
        write_atomic(Path(out_path), text)
    except OSError as exc:
        print(f"cannot write {out_path}: {exc}", file=err)
        return 1
    print(f"report {label} written to {out_path} (sha256 {report['sha256']})", file=err)
    return 0


__all__ = ["ALL", "FORMATS", "LANGS", "manifest", "render_all", "run", "write_all",
           "write_atomic"]
