"""Log-log line charts as PNG files: matplotlib when it is installed (the "plot" extra), else a
small built-in rasteriser (zlib + struct, a 3x5 pixel font), so a plot is always written.

    Series(label, xs, ys, style)   style: "line" (with dots), "points" (squares), "cross"
    write_plot(path, series, title, xlabel, ylabel) -> "matplotlib" | "builtin"
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    style: str = "line"  # line | points | cross
    color: int = -1  # index into COLORS; -1 = the series' position


def write_plot(path: str | Path, series: list[Series], title: str, xlabel: str,
               ylabel: str) -> str:
    """Write a log-log chart of `series` to `path`; returns which renderer drew it."""
    series = [s for s in series if any(x > 0 and y > 0 for x, y in zip(s.xs, s.ys, strict=True))]
    try:
        import matplotlib
    except ImportError:
        _BuiltinChart(series, title, xlabel, ylabel).save(Path(path))
        return "builtin"
    matplotlib.use("Agg")
    _matplotlib_chart(Path(path), series, title, xlabel, ylabel)
    return "matplotlib"


def _color(s: Series, i: int) -> tuple[int, int, int]:
    return COLORS[(s.color if s.color >= 0 else i) % len(COLORS)]


def _matplotlib_chart(path: Path, series: list[Series], title: str, xlabel: str,
                      ylabel: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    for i, s in enumerate(series):
        color = tuple(c / 255 for c in _color(s, i))
        fmt = {"line": "-o", "points": "s", "cross": "x"}[s.style]
        ax.plot(s.xs, s.ys, fmt, color=color, label=s.label, markersize=5 if s.style != "line"
                else 3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- built-in renderer

# 3x5 glyphs: five rows of three bits each, written as octal digits (7 = ###, 5 = #.#, 2 = .#.)
_FONT = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ=-.:/_^(),% ",
    ("75557 26227 71747 71317 55711 74717 74757 71122 75757 75717 25755 65656 34443 65556 "
     "74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 "
     "34216 72222 55557 55552 55775 55255 55222 71247 07070 00700 00002 02020 11244 00007 "
     "25000 12221 42224 00024 51245 00000").split(), strict=True))


def _text_width(text: str, scale: int) -> int:
    return len(text) * 4 * scale


class _BuiltinChart:
    W, H = 1000, 500
    LEFT, RIGHT, TOP, BOTTOM = 70, 270, 56, 50  # the legend sits right of the axes

    def __init__(self, series: list[Series], title: str, xlabel: str, ylabel: str):
        self.px = bytearray(b"\xff" * (self.W * self.H * 3))
        self.series, self.title, self.xlabel, self.ylabel = series, title, xlabel, ylabel
        xs = [x for s in series for x in s.xs if x > 0] or [1.0, 2.0]
        ys = [y for s in series for y, x in zip(s.ys, s.xs, strict=True) if y > 0 and x > 0]
        ys = ys or [1.0, 10.0]
        self.x0, self.x1 = math.log2(min(xs)) - 0.5, math.log2(max(xs)) + 0.5
        self.y0, self.y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)) + 0.3)

    def to_px(self, x: float, y: float) -> tuple[int, int]:
        w = self.W - self.LEFT - self.RIGHT
        h = self.H - self.TOP - self.BOTTOM
        px = self.LEFT + (math.log2(x) - self.x0) / (self.x1 - self.x0) * w
        py = self.TOP + h - (math.log10(y) - self.y0) / (self.y1 - self.y0) * h
        return round(px), round(py)

    def save(self, path: Path) -> None:
        self.axes()
        for i, s in enumerate(self.series):
            self.draw_series(s, _color(s, i))
        self.legend()
        path.write_bytes(_png(self.W, self.H, bytes(self.px)))

    def put(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.W and 0 <= y < self.H:
            i = (y * self.W + x) * 3
            self.px[i:i + 3] = bytes(c)

    def rect(self, x: int, y: int, w: int, h: int, c: tuple[int, int, int]) -> None:
        for yy in range(y, y + h):
            for xx in range(x, x + w):
                self.put(xx, yy, c)

    def line(self, a: tuple[int, int], b: tuple[int, int], c: tuple[int, int, int],
             width: int = 1) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for k in range(n + 1):
            x = a[0] + (b[0] - a[0]) * k // n
            y = a[1] + (b[1] - a[1]) * k // n
            self.rect(x - width // 2, y - width // 2, width, width, c)

    def text(self, x: int, y: int, text: str, c=(0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(text.upper()):
            rows = _FONT.get(ch, _FONT[" "])
            for r, bits in enumerate(rows):
                for col in range(3):
                    if int(bits) >> (2 - col) & 1:
                        self.rect(x + (4 * k + col) * scale, y + r * scale, scale, scale, c)

    def axes(self) -> None:
        grey, black = (220, 220, 220), (0, 0, 0)
        left, right = self.LEFT, self.W - self.RIGHT
        top, bottom = self.TOP, self.H - self.BOTTOM
        for e in range(int(self.y0), int(self.y1) + 1):
            _, py = self.to_px(1.0, 10.0 ** e)
            self.line((left, py), (right, py), grey)
            label = _si(10.0 ** e)
            self.text(left - 6 - _text_width(label, 2), py - 5, label)
        for e in range(math.ceil(self.x0), math.floor(self.x1) + 1, self._x_step()):
            px, _ = self.to_px(2.0 ** e, 1.0)
            self.line((px, top), (px, bottom), grey)
            label = _si(2.0 ** e, base=1024)
            self.text(px - _text_width(label, 2) // 2, bottom + 8, label)
        self.line((left, bottom), (right, bottom), black)
        self.line((left, top), (left, bottom), black)
        self.text(left, 8, self.title, scale=2)
        self.text((left + right - _text_width(self.xlabel, 2)) // 2, self.H - 20, self.xlabel)
        self.text(4, top - 26, self.ylabel, scale=2)

    def _x_step(self) -> int:
        return max(1, math.ceil((self.x1 - self.x0) / 12))

    def draw_series(self, s: Series, c: tuple[int, int, int]) -> None:
        pts = [self.to_px(x, y) for x, y in sorted(zip(s.xs, s.ys, strict=True)) if x > 0 and y > 0]
        if s.style == "line":
            for a, b in zip(pts, pts[1:], strict=False):
                self.line(a, b, c, width=2)
        for x, y in pts:
            if s.style == "cross":
                self.line((x - 4, y - 4), (x + 4, y + 4), c, width=2)
                self.line((x - 4, y + 4), (x + 4, y - 4), c, width=2)
            else:
                size = 7 if s.style == "points" else 5
                self.rect(x - size // 2, y - size // 2, size, size, c)

    def legend(self) -> None:
        x, y = self.W - self.RIGHT + 12, self.TOP
        for i, s in enumerate(self.series):
            c = _color(s, i)
            if s.style == "line":
                self.rect(x, y + 4, 16, 3, c)
            elif s.style == "cross":
                self.line((x + 4, y + 1), (x + 12, y + 9), c, width=2)
                self.line((x + 4, y + 9), (x + 12, y + 1), c, width=2)
            else:
                self.rect(x + 5, y + 2, 7, 7, c)
            self.text(x + 22, y + 1, s.label[:28], scale=2)
            y += 14


def _si(v: float, base: int = 1000) -> str:
    """1000 -> 1K, 1e9 -> 1G (base 1000); 1024 -> 1K, 1048576 -> 1M (base 1024)."""
    for unit in ("", "K", "M", "G", "T", "P"):
        if v < base:
            return f"{v:g}{unit}"
        v /= base
    return f"{v:g}E"


def _png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter 0 on every row), IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))
