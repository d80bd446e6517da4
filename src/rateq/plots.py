"""Every plot rateq draws: a plan's layer × KV-head bit map, perplexity vs effective bits of an evaluation's
rows, distortion curves of a few heads, and retrieval accuracy per (context, depth) cell.

Figures are built on matplotlib's object API (`Figure` with its own Agg canvas): nothing here imports pyplot
or switches matplotlib's global backend, so plotting is safe inside any application (a notebook, a GUI, a
server) and leaves no figure behind. Every file is written atomically (a temporary file, then a rename), in
the format its suffix names; a suffix matplotlib cannot write is one RateQError listing those it can.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RateQError
from .io import atomic_write

# Series order of the PPL plot's legend: the reference, rateq's own plans, then the baselines.
FAMILY_ORDER = ("fp", "rateq", "plan", "waterfill", "wnorm", "uniform", "split", "rotation", "hybrid", "rank")
DPI = 120


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # the figure's own canvas: no pyplot, no global backend
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = (path.suffix[1:] or "png").lower()
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise RateQError(f"cannot write a {path.suffix} image; use one of {', '.join('.' + k for k in sorted(formats))}")
    with atomic_write(path, "image") as tmp:
        fig.savefig(tmp, dpi=DPI, format=fmt)
    return path


def _quantizer_mix(plan, role: str) -> str:
    """One line per quantizer the role's units use: `id ×count`."""
    qids = plan.quantizer_ids(role).flatten().tolist()
    return "\n".join(f"{plan.quantizers[q].id} ×{qids.count(q)}" for q in sorted(set(qids)))


def plot_plan(plan, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Save a layer × KV-head heatmap of a plan's K and V code bits, side by side (PNG, or any format
    matplotlib writes, from the suffix). Each side is titled with its mean bits and its quantizer mix; small
    maps print the bits in the cells; the figure is titled `title` (default: the model's name) with the budget,
    effective and nominal bits."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    L, H = plan.num_layers, plan.num_kv_heads
    fig = _figure((max(7.0, 2.0 + 0.9 * H), max(3.0, 1.4 + 0.22 * L)))
    axes = fig.subplots(1, 2, sharey=True)
    vmax = max(8, int(max(plan.k_bits.max(), plan.v_bits.max())))
    for ax, role in zip(axes, ("k", "v")):
        bits = plan.bits(role).numpy()
        im = ax.imshow(bits, cmap="viridis", vmin=1, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"{role.upper()}: mean {plan.mean_bits(role):.2f} bits\n{_quantizer_mix(plan, role)}", fontsize=8)
        ax.set_xlabel("KV head")
        ax.set_xticks(np.arange(H))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        if L <= 64 and H <= 32:  # small maps: the bits in the cells
            for (l, h), b in np.ndenumerate(bits):
                ax.text(h, l, str(b), ha="center", va="center", fontsize=7, color="white" if b < vmax / 2 else "black")
    axes[0].set_ylabel("layer")
    budget = "" if plan.budget_bits is None else f"budget {plan.budget_bits:g}, "
    fig.suptitle(f"{title or plan.model.name}: {budget}{plan.effective_bits:.3f} effective bits "
                 f"({plan.nominal_bits:.3f} nominal)", fontsize=11)
    fig.colorbar(im, ax=axes, label="code bits", shrink=0.8)
    return _save(fig, path)


def plot_ppl_vs_bits(rows: list[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Perplexity vs effective bits of evaluation rows: one series per family (each rotation its own), every
    row a marker, a line through each series' best row at each storage, full precision as a dashed line."""
    import matplotlib

    fig = _figure((7, 4.5))
    ax = fig.subplots()
    fp = next((r["ppl"] for r in rows if r["family"] == "fp"), None)

    def series(r):  # one series per family; each rotation is its own series (the basis ablation)
        return r["name"].split("@")[0] if r["family"] == "rotation" else r["family"]

    def order(key):
        fam = "rotation" if key.startswith("rot-") else key
        return (FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else 99, key)

    keys = sorted({series(r) for r in rows if r["family"] != "fp"}, key=order)
    markers = "os^Dv<>pP*hX"
    colors = matplotlib.colormaps["tab20"]
    for i, key in enumerate(keys):
        pts = sorted((r["effective_bits"], r["ppl"]) for r in rows if r["family"] != "fp" and series(r) == key)
        # All points as markers; the line joins the best row of the series at each storage.
        best: dict[float, float] = {}
        for x, y in pts:
            best[x] = min(y, best.get(x, y))
        xs = sorted(best)
        line, = ax.plot(xs, [best[x] for x in xs], marker=markers[i % len(markers)], label=key,
                        color=colors(i % 20), linestyle="-" if len(xs) > 1 else "none")
        ax.scatter([x for x, _ in pts], [y for _, y in pts], marker=markers[i % len(markers)], s=14,
                   color=line.get_color(), alpha=0.5)
    if fp is not None:
        ax.axhline(fp, color="k", linestyle="--", linewidth=1, label=f"full precision ({fp:.2f})")
    ax.set_xlabel("effective bits per cached element (metadata included)")
    ax.set_ylabel("perplexity")
    ppls = [r["ppl"] for r in rows]
    if ppls and max(ppls) / max(min(ppls), 1e-9) > 4:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_curves(curves, path: str | os.PathLike, *, units: list[tuple[int, int, int]] | None = None) -> Path:
    """Distortion vs code bits of a few units `(layer, head, role 0 = K / 1 = V)`, every quantizer of the
    curves (default units: the most and least sensitive K and V heads at 2 bits)."""
    d = curves.distortion  # (L, H, 2, Q, NB)
    bits = list(curves.bits)
    if units is None:
        at = bits.index(2) if 2 in bits else 0
        units = []
        for r in (0, 1):
            flat = d[:, :, r, 0, at].flatten()
            order = flat.argsort()
            H = d.shape[1]
            for idx in (int(order[-1]), int(order[0])):
                units.append((idx // H, idx % H, r))
    fig = _figure((6, 4))
    ax = fig.subplots()
    for (l, h, r) in units:
        for q, spec in enumerate(curves.quantizers):
            y = d[l, h, r, q].clamp_min(1e-30).numpy()
            ax.plot(bits, y, marker="o", label=f"L{l} H{h} {'KV'[r]} {spec.id}")
    ax.set_yscale("log")
    ax.set_xlabel("code bits")
    ax.set_ylabel(f"distortion ({curves.metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_passkey_heatmap(cells: list[dict], path: str | os.PathLike, *, title: str = "",
                         reference: list[dict] | None = None) -> Path:
    """A depth × context heatmap of retrieval accuracy (passkey or needle cells of `rateq.evaluate.tasks`: each
    with `context`, `depth` and `accuracy`), the accuracy printed in every cell. With `reference` (full
    precision's cells), a cell full precision solves and this one does not is marked with a cross, one full
    precision misses too with a dot."""
    import numpy as np

    if not cells:
        raise RateQError("no cells to plot")
    contexts = sorted({int(c["context"]) for c in cells})
    depths = sorted({float(c["depth"]) for c in cells})
    acc = np.full((len(depths), len(contexts)), np.nan)
    for c in cells:
        acc[depths.index(float(c["depth"])), contexts.index(int(c["context"]))] = float(c["accuracy"])
    solved = {(int(c["context"]), float(c["depth"])): float(c["accuracy"]) == 1.0 for c in reference or []}
    fig = _figure((max(4.5, 1.6 + 0.9 * len(contexts)), max(3.0, 1.4 + 0.45 * len(depths))))
    ax = fig.subplots()
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for (i, j), a in np.ndenumerate(acc):
        if np.isnan(a):
            continue
        mark = ""
        if reference is not None:
            ref = solved.get((contexts[j], depths[i]))
            mark = " ×" if ref and a < 1.0 else (" ·" if ref is False else "")
        ax.text(j, i, f"{a:.2g}{mark}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(np.arange(len(contexts)), [f"{c:,}" for c in contexts])
    ax.set_yticks(np.arange(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    mean = float(np.nanmean(acc))
    ax.set_title(f"{title + ': ' if title else ''}accuracy {100 * mean:.0f}%", fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy", shrink=0.8)
    return _save(fig, path)


__all__ = ["plot_curves", "plot_passkey_heatmap", "plot_plan", "plot_ppl_vs_bits"]
