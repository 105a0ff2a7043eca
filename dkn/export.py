"""Exporting figures and tables: PNG / SVG (Plotly's Kaleido, which drives a Chromium-type browser),
self-contained HTML, CSV and JSON, and one zip of everything with a manifest.

Kaleido 1.x finds its browser through choreographer: the `BROWSER_PATH` environment variable, else
`chromium`, `google-chrome`, ... on PATH and a few typical install paths.  We look in the same places
(plus Debian's /usr/bin/chromium, which `make browser` installs) and hand the path to Kaleido
explicitly; without a browser, `ExportError` says how to get one.  MathJax is switched off (it would be
fetched from a CDN: the machine may be offline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import io
import json
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from dkn import __version__
from dkn.errors import DknError
from dkn.jsonsafe import jsonable

IMAGE_FORMATS = ("png", "svg")
TABLE_FORMATS = ("csv", "json")
DEBIAN_CHROMIUM = "/usr/bin/chromium"
_BROWSER_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "microsoft-edge",
    "brave-browser",
)
MISSING_BROWSER = (
    "PNG and SVG export needs a Chromium-type browser (Plotly's Kaleido drives it) and none was "
    "found. Install Debian's chromium with `make browser` (or `sudo apt-get install chromium`), "
    "or point BROWSER_PATH at a Chrome/Chromium executable. HTML, CSV and JSON exports work "
    "without it."
)


class ExportError(DknError, RuntimeError):
    """An export could not be made; the message says what to do."""


def find_browser() -> str | None:
    """The browser Kaleido will use: $BROWSER_PATH if it is executable, else Debian's chromium,
    else the first Chromium-type browser on PATH, else choreographer's own search."""
    env = os.environ.get("BROWSER_PATH")
    if env and os.access(env, os.X_OK):
        return env
    if os.access(DEBIAN_CHROMIUM, os.X_OK):
        return DEBIAN_CHROMIUM
    for name in _BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # any failure of the optional search means "not found"
        return None


def browser_available() -> bool:
    return find_browser() is not None


def _browser_or_raise() -> str:
    path = find_browser()
    if path is None:
        env = os.environ.get("BROWSER_PATH")
        hint = f" (BROWSER_PATH={env!r} is not an executable file.)" if env else ""
        raise ExportError(MISSING_BROWSER + hint)
    return path


def _size(fig: go.Figure, width: int | None, height: int | None) -> tuple[int, int]:
    return int(width or fig.layout.width or 1000), int(height or fig.layout.height or 500)


def figure_images(
    figs: Sequence[go.Figure],
    fmt: str = "png",
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
    timeout_s: float = 120.0,
) -> list[bytes]:
    """Render several figures with one browser session (start-up costs about a second)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}: use one of {', '.join(IMAGE_FORMATS)}")
    if not figs:
        return []
    path = _browser_or_raise()
    jobs = [
        (
            fig.to_plotly_json(),
            dict(
                format=fmt,
                width=_size(fig, width, height)[0],
                height=_size(fig, width, height)[1],
                scale=scale if fmt == "png" else 1,
            ),
        )
        for fig in figs
    ]

    async def render() -> list[bytes]:
        import kaleido

        async with kaleido.Kaleido(n=1, path=path, mathjax=False, timeout=timeout_s) as k:
            return [await k.calc_fig(fig, opts=opts) for fig, opts in jobs]

    # a fresh event loop on a worker thread: the caller (e.g. Streamlit's script thread) may have its own loop
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(asyncio.run, render()).result(timeout=timeout_s + 30)
        except ExportError:
            raise
        except Exception as err:
            if type(err).__name__ == "ChromeNotFoundError":
                raise ExportError(MISSING_BROWSER + f" (tried {path})") from err
            raise ExportError(
                f"could not render the figure as {fmt.upper()} with {path}: {err}. "
                "Check that the browser starts (`chromium --headless --version`), or export HTML "
                "instead."
            ) from err


def figure_image(fig: go.Figure, fmt: str = "png", **kwargs) -> bytes:
    """PNG or SVG bytes of one figure."""
    return figure_images([fig], fmt, **kwargs)[0]


def figure_png(fig: go.Figure, **kwargs) -> bytes:
    return figure_image(fig, "png", **kwargs)


def figure_svg(fig: go.Figure, **kwargs) -> bytes:
    return figure_image(fig, "svg", **kwargs)


def figure_html(fig: go.Figure) -> bytes:
    """A self-contained HTML page (plotly.js inlined: opens offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")


# ------------------------------------------------------------------ tables
Table = Any  # a pandas DataFrame, or a list of dicts


def _records(table: Table) -> list[dict]:
    if hasattr(table, "to_dict"):
        return table.to_dict(orient="records")
    return [dict(r) for r in table]


def table_json(table: Table) -> bytes:
    return json.dumps(jsonable(_records(table)), indent=2, ensure_ascii=False).encode("utf-8")


def table_csv(table: Table) -> bytes:
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(_records(table))
    return frame.to_csv(index=False).encode("utf-8")


# ------------------------------------------------------------------ manifest and zip
def manifest(
    *,
    model: Mapping[str, Any] | None = None,
    prompt: str = "",
    answer: str = "",
    paraphrases: Sequence[str] = (),
    method: str = "",
    parameters: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict:
    """What made an export: model name and fingerprint, fact, method and parameters, library version, date."""
    model = dict(model or {})
    return jsonable(
        {
            "model": model.get("name", ""),
            "model_label": model.get("label", ""),
            "fingerprint": model.get("fingerprint", ""),
            "prompt": prompt,
            "answer": answer,
            "paraphrases": list(paraphrases),
            "method": method,
            "parameters": dict(parameters or {}),
            "library": "dkn",
            "version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
    )


def export_zip(
    figures: Mapping[str, go.Figure],
    tables: Mapping[str, Table],
    manifest: Mapping[str, Any],
    *,
    images: bool | None = None,
) -> bytes:
    """One zip: figures/<name>.html (+ .png and .svg when a browser is available, or when images=True,
    which raises ExportError without one), tables/<name>.csv and .json, and manifest.json listing
    everything (plus a note when images were left out)."""
    if images is None:
        images = browser_available()
    files: dict[str, bytes] = {}
    for name, fig in figures.items():
        files[f"figures/{name}.html"] = figure_html(fig)
    notes = []
    if images and figures:
        names = list(figures)
        for fmt in IMAGE_FORMATS:
            for name, data in zip(names, figure_images([figures[n] for n in names], fmt)):
                files[f"figures/{name}.{fmt}"] = data
    elif figures:
        notes.append(MISSING_BROWSER)
    for name, table in tables.items():
        files[f"tables/{name}.csv"] = table_csv(table)
        files[f"tables/{name}.json"] = table_json(table)
    full = dict(jsonable(dict(manifest)), files=sorted(files) + ["manifest.json"])
    if notes:
        full["notes"] = notes
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(full, indent=2, ensure_ascii=False))
        for name in sorted(files):
            zf.writestr(name, files[name])
    return buffer.getvalue()


__all__ = [
    "ExportError",
    "find_browser",
    "browser_available",
    "figure_image",
    "figure_images",
    "figure_png",
    "figure_svg",
    "figure_html",
    "table_csv",
    "table_json",
    "manifest",
    "export_zip",
    "MISSING_BROWSER",
]
