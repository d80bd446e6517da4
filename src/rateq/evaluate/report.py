"""Evaluation reports: a markdown table, a JSON file and PNG plots (PPL vs effective bits; a plan's layer × head
bit maps for K and V; distortion curves of a few heads when curves are at hand)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .core import Evaluation

_FAMILY_ORDER = ("fp", "rateq", "plan", "waterfill", "wnorm", "uniform", "split", "rotation", "hybrid", "rank")


def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt)


def kivi_excess_removed(rows: list[dict]) -> dict[str, float]:
    """For each row with a `kivi` row at the same effective bits: the share of KIVI's excess perplexity (over
    full precision) that the row removes, 1 − (ppl − fp) / (ppl_kivi − fp)."""
    fp = next((r["ppl"] for r in rows if r["family"] == "fp"), None)
    if fp is None:
        return {}
    kivi = {round(r["effective_bits"], 6): r["ppl"] for r in rows if r["name"].startswith("kivi@")}
    out = {}
    for r in rows:
        ref = kivi.get(round(r["effective_bits"], 6))
        if ref is not None and ref > fp and r["family"] != "fp":
            out[r["name"]] = 1.0 - (r["ppl"] - fp) / (ref - fp)
    return out


def to_markdown(result: Evaluation | list[dict], *, title: str | None = None) -> str:
    """A markdown table of the rows: nominal and effective bits, PPL, ΔPPL, KL, flip rates, KIVI excess removed."""
    rows = list(result)
    removed = kivi_excess_removed(rows)
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| method | what | nominal bits | effective bits | PPL | ΔPPL | KL (nats) | flips | key flips | "
                 "KIVI excess removed |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        flips = r.get("flip_rate")
        kflips = r.get("key_flip_rate")
        lines.append(
            f"| {r['name']} | {r.get('label', '')} | {_num(r['nominal_bits'], '.3f')} | "
            f"{_num(r['effective_bits'], '.3f')} | {_num(r['ppl'], '.2f')} | {_num(r.get('delta_ppl'), '+.2f')} | "
            f"{_num(r.get('kl'), '.4f')} | {_num(None if flips is None else 100 * flips, '.2f')}% | "
            f"{_num(None if kflips is None else 100 * kflips, '.2f')}% | "
            f"{_num(None if r['name'] not in removed else 100 * removed[r['name']], '.0f')}"
            f"{'%' if r['name'] in removed else ''} |"
        )
    return "\n".join(lines) + "\n"


def _settings_md(settings: dict) -> str:
    pol = settings.get("policy", {})
    return (f"Model `{settings.get('model')}`, data `{settings.get('data')}`: {settings.get('windows')} windows × "
            f"{settings.get('seq_len')} tokens (seed {settings.get('seed')}, from character "
            f"{settings.get('char_start')}), teacher-forced one-pass simulation with residual "
            f"{pol.get('residual')}, key block {pol.get('block')}, sinks {pol.get('sinks')}. Flips: share of "
            f"(query, query head) pairs of layers {settings.get('flip_layers')} whose most-attended key differs "
            f"from the full-precision model's (`flips`) or from the same query on exact keys (`key flips`).")


def plot_ppl_vs_bits(rows: list[dict], path: Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp = next((r["ppl"] for r in rows if r["family"] == "fp"), None)

    def series(r):  # one series per family; each rotation is its own series (the basis ablation)
        return r["name"].split("@")[0] if r["family"] == "rotation" else r["family"]

    def order(key):
        fam = "rotation" if key.startswith("rot-") else key
        return (_FAMILY_ORDER.index(fam) if fam in _FAMILY_ORDER else 99, key)

    keys = sorted({series(r) for r in rows if r["family"] != "fp"}, key=order)
    markers = "os^Dv<>pP*hX"
    for i, key in enumerate(keys):
        pts = sorted((r["effective_bits"], r["ppl"]) for r in rows if r["family"] != "fp" and series(r) == key)
        # All points as markers; the line joins the best row of the series at each storage.
        best: dict[float, float] = {}
        for x, y in pts:
            best[x] = min(y, best.get(x, y))
        xs = sorted(best)
        line, = ax.plot(xs, [best[x] for x in xs], marker=markers[i % len(markers)], label=key,
                        color=plt.cm.tab20(i % 20),
                        linestyle="-" if len(xs) > 1 else "none")
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bit_map(plan, path: Path, *, title: str = "") -> Path:
    """Layer × KV-head code bits of K and V side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, v = plan.k_bits.numpy(), plan.v_bits.numpy()
    lo, hi = int(min(k.min(), v.min())), int(max(k.max(), v.max()))
    L, H = k.shape
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 + 0.5 * H * 2), 1.8 + 0.18 * L), sharey=True)
    for ax, data, role in zip(axes, (k, v), ("K", "V")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        qids = (plan.k_quantizer if role == "K" else plan.v_quantizer).flatten().tolist()
        mix = "\n".join(f"{plan.quantizers[q].id} ×{qids.count(q)}" for q in sorted(set(qids)))
        ax.set_title(f"{role}: mean {data.mean():.2f} bits\n{mix}", fontsize=8)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(H))
        if L * H <= 400:  # small maps: print the bits in the cells
            for i in range(L):
                for j in range(H):
                    ax.text(j, i, str(int(data[i, j])), ha="center", va="center", fontsize=6, color="w")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="code bits")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(curves, path: Path, *, units: list[tuple[int, int, int]] | None = None) -> Path:
    """Distortion vs code bits of a few units (default: the most and least sensitive K and V heads at 2 bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(6, 4))
    for (l, h, r) in units:
        for q, spec in enumerate(curves.quantizers):
            y = d[l, h, r, q].clamp_min(1e-30).numpy()
            ax.plot(bits, y, marker="o", label=f"L{l} H{h} {'KV'[r]} {spec.id}")
    ax.set_yscale("log")
    ax.set_xlabel("code bits")
    ax.set_ylabel(f"distortion ({curves.metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: Evaluation, out_dir, *, curves=None, title: str = "rateq evaluation") -> dict[str, Path]:
    """Write `report.md`, `results.json`, `ppl_vs_bits.png`, one `bits_<plan>.png` per solved plan (rateq,
    waterfill, wnorm and loaded profiles) and `curves.png` when `curves` are given. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(result)
    paths: dict[str, Path] = {}
    paths["ppl_vs_bits"] = plot_ppl_vs_bits(rows, out / "ppl_vs_bits.png", title=title)
    maps = []
    for m in result.methods:
        if m.plan is None or m.family not in ("rateq", "plan", "waterfill", "wnorm"):
            continue
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in m.name)
        p = plot_bit_map(m.plan, out / f"bits_{safe}.png", title=m.name)
        paths[f"bits_{safe}"] = p
        maps.append((m.name, p.name))
    if curves is not None:
        paths["curves"] = plot_curves(curves, out / "curves.png")
    removed = kivi_excess_removed(rows)
    doc = {"settings": result.settings, "rows": rows, "kivi_excess_removed": removed}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["json"] = out / "results.json"
    md = [f"# {title}", "", _settings_md(result.settings), "", to_markdown(rows), ""]
    md += ["Effective bits count code bits plus scales and zero-points per element; rank reduction counts its fp16 "
           "coefficients, its basis being a per-model constant (see notes).", ""]
    notes = [(r["name"], r["notes"]) for r in rows if r.get("notes")]
    if notes:
        md += ["Notes:", ""] + [f"- `{n}`: {t}" for n, t in notes] + [""]
    md += ["![perplexity vs effective bits](ppl_vs_bits.png)", ""]
    for name, fname in maps:
        md += [f"Bit map of `{name}` (layer × KV head, K left, V right):", "", f"![{name}]({fname})", ""]
    if curves is not None:
        md += ["Distortion curves of the most and least sensitive heads:", "", "![curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    paths["markdown"] = out / "report.md"
    return paths
