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


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _compared(row: dict):
    """The budget a row is matched at: its `compared_at` (rows of `evaluate`), or its effective bits for rows
    that do not say (a hand-made list: rows compare at equal storage)."""
    return row["compared_at"] if "compared_at" in row else round(row["effective_bits"], 6)


def kivi_excess_removed(rows: list[dict]) -> dict[str, float]:
    """For each row matched at a budget that a `kivi` row is matched at too: the share of KIVI's excess
    perplexity (over full precision) that the row removes, 1 − (ppl − fp) / (ppl_kivi − fp). Rows at another
    storage than the compared budgets get none."""
    fp = next((r["ppl"] for r in rows if r["family"] == "fp"), None)
    if fp is None:
        return {}
    kivi = {_compared(r): r["ppl"] for r in rows if r["name"].startswith("kivi@") and _compared(r) is not None}
    out = {}
    for r in rows:
        at = _compared(r)
        ref = kivi.get(at) if at is not None else None
        if ref is not None and ref > fp and r["family"] != "fp":
            out[r["name"]] = 1.0 - (r["ppl"] - fp) / (ref - fp)
    return out


def policy_text(policy: dict | None) -> str:
    if not policy:
        return "–"
    return f"R {policy.get('residual')}, block {policy.get('block')}, sinks {policy.get('sinks')}"


def _policies(rows: list[dict]) -> set[str]:
    return {policy_text(r.get("policy")) for r in rows if r.get("family") != "fp" and r.get("policy")}


def _table(rows: list[dict], removed: dict, *, matched_column: bool, kivi_column: bool,
           policy_column: bool) -> list[str]:
    head = ["method", "what"] + (["matched at"] if matched_column else []) + [
        "nominal bits", "effective bits", "PPL", "ΔPPL", "KL (nats)", "flips", "key flips"]
    head += (["KIVI excess removed"] if kivi_column else []) + (["policy"] if policy_column else [])
    align = ["---", "---"] + ["---:"] * (len(head) - 2 - policy_column) + (["---"] if policy_column else [])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        flips, kflips = r.get("flip_rate"), r.get("key_flip_rate")
        cells = [r["name"], r.get("label", "")]
        if matched_column:
            at = r.get("compared_at")
            cells.append("–" if r.get("family") == "fp" else _num(at, "g"))
        cells += [_num(r["nominal_bits"], ".3f"), _num(r["effective_bits"], ".3f"), _num(r["ppl"], ".2f"),
                  _num(r.get("delta_ppl"), "+.2f"), _num(r.get("kl"), ".4f"),
                  _pct(flips), _pct(kflips)]
        if kivi_column:
            cells.append(_num(None if r["name"] not in removed else 100 * removed[r["name"]], ".0f")
                         + ("%" if r["name"] in removed else ""))
        if policy_column:
            cells.append(policy_text(r.get("policy")))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def to_markdown(result: Evaluation | list[dict], *, title: str | None = None) -> str:
    """Markdown tables of the rows: nominal and effective bits, PPL, ΔPPL, KL, flip rates, KIVI excess removed.

    With compared budgets, the first table holds full precision and the rows matched at a budget (column
    "matched at", grouped by budget); rows at any other storage follow in a second table headed "Not matched",
    without a KIVI comparison. A "policy" column appears when the rows ran under different cache policies."""
    rows = list(result)
    budgets = list(result.settings.get("budgets") or []) if isinstance(result, Evaluation) else []
    budgets = budgets or sorted({r["compared_at"] for r in rows if r.get("compared_at") is not None})
    removed = kivi_excess_removed(rows)
    policy_column = len(_policies(rows)) > 1
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if not budgets:  # no comparison at matched storage: one table, rows at their own storage
        lines += _table(rows, removed, matched_column=False, kivi_column=True, policy_column=policy_column)
        return "\n".join(lines) + "\n"
    fp = [r for r in rows if r.get("family") == "fp"]
    order = {b: i for i, b in enumerate(budgets)}
    matched = [r for r in rows if r.get("family") != "fp" and r.get("compared_at") is not None]
    matched.sort(key=lambda r: order.get(r["compared_at"], len(order)))  # stable: input order within a budget
    other = [r for r in rows if r.get("family") != "fp" and r.get("compared_at") is None]
    lines += _table(fp + matched, removed, matched_column=True, kivi_column=True, policy_column=policy_column)
    if other:
        shown = ", ".join(f"{b:g}" for b in budgets)
        lines += ["", f"Not matched: at other storage than the compared budgets ({shown} effective bits), so "
                      "not comparable at matched bits (no KIVI comparison):", ""]
        lines += _table(other, removed, matched_column=False, kivi_column=False, policy_column=policy_column)
    return "\n".join(lines) + "\n"


def describe_settings(settings: dict, rows: list[dict] | None = None) -> str:
    """One paragraph: model, data, windows, the cache policies the rows ran under, what flips count."""
    pol = settings.get("policy", {})
    policies = sorted(_policies(rows or []))
    if len(policies) > 1:
        how = ("cache policies per row (see the policy column: profiles keep their own, each key block is a "
               "multiple of the row's key groups)")
    elif policies:
        how = f"cache policy {policies[0]}"
    else:
        how = f"cache policy {policy_text(pol)}"
    budgets = settings.get("budgets") or []
    compared = (f" Compared at {', '.join(f'{b:g}' for b in budgets)} effective bits per element." if budgets
                else "")
    seed = settings.get("seed")
    drawn = "consecutive" if seed is None else f"drawn with seed {seed}"
    layers = settings.get("flip_layers")
    layers = "every layer" if layers in (None, "all") else f"layers {layers}"
    return (f"Model `{settings.get('model')}`, data `{settings.get('data')}`: {settings.get('windows')} × "
            f"{settings.get('seq_len')} tokens ({drawn}, from character {settings.get('char_start')}), "
            f"teacher-forced one-pass simulation, {how}.{compared} Flips: share of (query, query head) pairs of "
            f"{layers} whose most-attended key differs from the full-precision model's (`flips`) or from the "
            f"same query on exact keys (`key flips`).")


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
    md = [f"# {title}", "", describe_settings(result.settings, rows), "", to_markdown(result), ""]
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
