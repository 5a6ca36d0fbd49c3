"""PNG plots beside the benchmark tables, drawn from the tables themselves (bench/results/*.md).

    python -m bench.plots [--results bench/results]

- `peers_http.png`: output tok/s, TTFT p50 and ITL p50 against concurrency, this project and
  vLLM over HTTP (`peers_http.md`, or `peers.md`'s HTTP table), from `make bench-peers`;
- `moe_kernels.png`: ms per MoE layer against tokens, torch / native / vLLM, float32 and
  bfloat16 (`moe_kernels_*.md`), from `make bench`;
- `layouts.png`: decode tok/s of each layout (`suite.md`), from `make bench`.

`make bench` and `make bench-peers` run it last; a table that is missing is skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of the file: (header cells, rows of cells)."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def _table(path: Path, first: str, has: str) -> tuple[list[str], list[list[str]]] | None:
    if not path.exists():
        return None
    return next(((h, r) for h, r in tables(path) if h and h[0] == first and has in h and r), None)


def _num(cell: str) -> float:
    return float(cell.rstrip("x%").replace(",", ""))


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6))
    return plt, fig, list(axes) if panels > 1 else [axes]


def peers_http(results: Path) -> Path | None:
    found = _table(results / "peers_http.md", "streams", "vLLM tok/s") or \
        _table(results / "peers.md", "streams", "vLLM tok/s")
    if found is None:
        return None
    header, rows = found
    col = {name: header.index(name) for name in header}
    x = [_num(r[0]) for r in rows]
    plt, fig, axes = _figure(3)
    for ax, (title, ours, theirs) in zip(axes, [("output tok/s", "ours tok/s", "vLLM tok/s"),
                                                ("TTFT p50 (ms)", "ours TTFT p50 (ms)", "vLLM TTFT p50 (ms)"),
                                                ("ITL p50 (ms)", "ours ITL p50 (ms)", "vLLM ITL p50 (ms)")],
                                         strict=True):
        ax.plot(x, [_num(r[col[ours]]) for r in rows], "o-", label="this project")
        ax.plot(x, [_num(r[col[theirs]]) for r in rows], "s--", label="vLLM (CPU)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(int(v)) for v in x])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Over HTTP, same machine, same model and client")
    return _save(plt, fig, results / "peers_http.png")


def moe_kernels(results: Path) -> Path | None:
    found = [(dtype, _table(results / f"moe_kernels_{dtype}.md", "tokens", "native ms"))
             for dtype in ("float32", "bfloat16")]
    found = [(dtype, t) for dtype, t in found if t is not None]
    if not found:
        return None
    plt, fig, axes = _figure(len(found))
    for ax, (dtype, (header, rows)) in zip(axes, found, strict=True):
        x = [_num(r[0]) for r in rows]
        for name, style in (("torch ms", "o-"), ("native ms", "s-"), ("vLLM ms", "^--")):
            if name in header:
                ax.plot(x, [_num(r[header.index(name)]) for r in rows], style, label=name.removesuffix(" ms"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(plt.FormatStrFormatter("%g"))
        ax.set_xlabel("tokens in the layer")
        ax.set_ylabel("ms per MoE layer")
        ax.set_title(dtype)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("One MoE layer of bench-214m (E=8, D=512, F=1792, top-2)")
    return _save(plt, fig, results / "moe_kernels.png")


def layouts(results: Path) -> Path | None:
    found = _table(results / "suite.md", "layout", "tok/s")
    if found is None:
        return None
    header, rows = found
    plt, fig, (ax,) = _figure(1)
    labels = [f"{r[0]}, {r[1]}" if header[1] == "exchange" and r[1] != "-" else r[0] for r in rows]
    ax.barh(labels[::-1], [_num(r[header.index("tok/s")]) for r in rows][::-1])
    ax.set_xlabel("decode tok/s")
    ax.set_title("Layouts of one instance (bench.layouts)")
    ax.grid(alpha=0.3, axis="x")
    return _save(plt, fig, results / "layouts.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for draw in (peers_http, moe_kernels, layouts):
        path = draw(args.results)
        print(f"{draw.__name__}: {path if path is not None else 'no table, skipped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
