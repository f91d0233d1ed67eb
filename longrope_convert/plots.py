"""PNG plots of evaluation results. Each PNG also carries the plotted numbers as JSON in a text chunk
(key "longrope-series"), so that tools and tests can read the data back instead of the pixels."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

from .card import json_number

SERIES_KEY = "longrope-series"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path, series: dict[str, Any]) -> None:
    figure.savefig(path, format="png", dpi=110, metadata={SERIES_KEY: json.dumps(series)})
    _figure().close(figure)


def perplexity_plot(perplexities: dict[str, dict[int, float | str]], path: Path, title: str) -> None:
    """Perplexity against context length, one line per method. A value that is not finite (inf, nan;
    as floats or as results.json's strings) is marked by an x at the top of the plot, labelled."""
    plt = _figure()
    figure, axes = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    finite_anywhere = False
    for method, by_length in perplexities.items():
        lengths = sorted(by_length, key=int)
        values = [float(by_length[n]) for n in lengths]
        finite = [(int(n), v) for n, v in zip(lengths, values) if math.isfinite(v)]
        finite_anywhere |= bool(finite)
        (line,) = axes.plot([n for n, _ in finite], [v for _, v in finite], marker="o", label=method)
        for n, value in zip(lengths, values):
            if not math.isfinite(value):  # x in data, y in axes coordinates: the top edge whatever the scale
                axes.plot([int(n)], [0.96], marker="x", color=line.get_color(), transform=axes.get_xaxis_transform())
                axes.annotate(str(value), (int(n), 0.96), xycoords=axes.get_xaxis_transform(), fontsize=7,
                              textcoords="offset points", xytext=(4, -3), color=line.get_color())
    axes.set_xscale("log", base=2)
    if finite_anywhere:  # a log axis needs some positive data
        axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title(title)
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    _save(figure, path, {method: {str(n): json_number(float(v)) for n, v in by_length.items()}
                         for method, by_length in perplexities.items()})


def accuracy_heatmap(accuracy: dict[str, dict[int, dict[float, float]]], path: Path, title: str) -> None:
    """Accuracy of a needle task, one panel per method: rows are needle depths, columns the method's
    context lengths."""
    plt = _figure()
    methods = list(accuracy)
    figure, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods) + 1, 3.2), squeeze=False,
                                layout="constrained")
    for axis, method in zip(axes[0], methods):
        lengths = sorted(accuracy[method], key=int)
        depths = sorted(accuracy[method][lengths[0]], key=float)
        grid = [[accuracy[method][n][d] for n in lengths] for d in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                axis.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(lengths)), [f"{int(n) // 1024}k" if int(n) % 1024 == 0 else str(n) for n in lengths])
        axis.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        axis.set_title(method, fontsize=9)
        axis.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    figure.suptitle(title, fontsize=10)
    _save(figure, path, {method: {str(n): {str(d): a for d, a in by_depth.items()} for n, by_depth in by_length.items()}
                         for method, by_length in accuracy.items()})


def factors_plot(factors: dict[str, list[float]], path: Path, title: str) -> None:
    """lambda_i per frequency dimension i, one line per factor set."""
    plt = _figure()
    figure, axes = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for name, values in factors.items():
        axes.plot(range(len(values)), values, marker=".", label=name)
    axes.set_xlabel("dimension i (frequency theta_i = base^(-2i/d))")
    axes.set_ylabel("lambda_i")
    axes.set_title(title)
    axes.legend()
    axes.grid(True, alpha=0.3)
    _save(figure, path, factors)


def read_series(path: Path) -> dict[str, Any]:
    """The JSON series stored in a PNG written here, after checking the whole file: signature, every
    chunk's CRC, and the closing IEND chunk."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    offset, series, ended = 8, None, False
    while offset + 12 <= len(data) and not ended:
        (size,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + size]
        (crc,) = struct.unpack(">I", data[offset + 8 + size : offset + 12 + size] or b"\0\0\0\0")
        if len(body) != size or zlib.crc32(kind + body) != crc:
            raise ValueError(f"{path}: corrupt PNG chunk {kind!r}")
        if kind == b"tEXt" and body.startswith(SERIES_KEY.encode() + b"\0"):  # JSON is ASCII: always tEXt
            series = json.loads(body[len(SERIES_KEY) + 1 :].decode("latin-1"))
        ended = kind == b"IEND"
        offset += 12 + size
    if not ended:
        raise ValueError(f"{path}: truncated PNG (no IEND chunk)")
    if series is None:
        raise ValueError(f"{path}: no {SERIES_KEY} data")
    return series
