"""dkn.export: figures to PNG/SVG/HTML, tables to CSV/JSON, the zip with its manifest."""

import io
import json
import re
import zipfile

import numpy as np
import plotly.graph_objects as go
import pytest

from dkn import __version__, export


def fig() -> go.Figure:
    return go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))


TABLE = [{"layer": 1, "neuron": 5, "score": np.float32(0.5), "death": float("inf")}]


def test_tables_csv_and_json():
    assert export.table_csv(TABLE).decode().splitlines()[0] == "layer,neuron,score,death"
    rows = json.loads(export.table_json(TABLE))
    assert rows == [{"layer": 1, "neuron": 5, "score": 0.5, "death": None}]


def test_html_is_self_contained():
    html = export.figure_html(fig()).decode()
    assert "<html>" in html[:100] and len(html) > 1_000_000  # plotly.js inlined: opens offline
    assert not re.search(r"<script[^>]+src=", html)


def test_missing_browser_gives_clear_error(monkeypatch):
    monkeypatch.setattr(export, "find_browser", lambda: None)
    with pytest.raises(export.ExportError, match="make browser"):
        export.figure_png(fig())
    data = export.export_zip({"f": fig()}, {"t": TABLE}, export.manifest(prompt="p"))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert "figures/f.html" in zf.namelist() and "figures/f.png" not in zf.namelist()
        assert "chromium" in json.loads(zf.read("manifest.json"))["notes"][0]


def test_find_browser_honours_browser_path(monkeypatch, tmp_path):
    exe = tmp_path / "my-chrome"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(exe))
    assert export.find_browser() == str(exe)


def test_manifest_fields():
    m = export.manifest(
        model={"name": "default", "label": "x", "fingerprint": "abc"},
        prompt="P",
        answer="A",
        method="ig",
        parameters={"steps": 20},
    )
    for key in ("model", "fingerprint", "prompt", "answer", "method", "parameters", "version", "date"):
        assert key in m
    assert m["version"] == __version__ and m["fingerprint"] == "abc"


@pytest.mark.skipif(not export.browser_available(), reason="no Chromium: run `make browser`")
def test_png_svg_and_zip_with_a_real_browser():
    png, svg = export.figure_images([fig()], "png")[0], export.figure_svg(fig())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size[0] > 100
    assert b"<svg" in svg[:200]
    data = export.export_zip({"bars": fig()}, {"t": TABLE}, export.manifest(prompt="p"), images=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert {
            "figures/bars.png",
            "figures/bars.svg",
            "figures/bars.html",
            "tables/t.csv",
            "tables/t.json",
            "manifest.json",
        } <= names
        assert set(json.loads(zf.read("manifest.json"))["files"]) == names


def test_one_json_sanitiser_everywhere():
    """cli, export, the experiments' conditions and the runner all use dkn.jsonsafe.jsonable."""
    import dataclasses
    import json
    from pathlib import Path

    import numpy as np

    from dkn import cli, jsonsafe
    from dkn.experiments import conditions, runner

    @dataclasses.dataclass
    class Params:
        steps: int = 3
        models: tuple = ("a", "b")

    assert conditions.jsonable is jsonsafe.jsonable and runner.jsonable is jsonsafe.jsonable
    assert export.jsonable is jsonsafe.jsonable
    value = {
        1: (np.float32(0.5), float("nan"), np.inf),
        "a": np.arange(3),
        "p": Params(),
        "path": Path("/x"),
        "flag": np.bool_(True),
        "n": np.int64(7),
        "s": {2, 1},
    }
    clean = jsonsafe.jsonable(value)
    assert clean == {
        "1": [0.5, None, None],
        "a": [0, 1, 2],
        "p": {"steps": 3, "models": ["a", "b"]},
        "path": "/x",
        "flag": True,
        "n": 7,
        "s": [1, 2],
    }
    assert type(clean["n"]) is int and type(clean["flag"]) is bool
    assert json.loads(cli._dumps(value)) == clean
    with pytest.raises(TypeError):
        jsonsafe.jsonable(object())
    assert jsonsafe.dumps({"o": object()}).startswith('{"o": "<object')  # the CLI's default=str
