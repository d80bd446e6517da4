"""Evaluation reports: a markdown table, a JSON file and PNG plots (PPL vs effective bits; a plan's layer × head
bit maps for K and V; distortion curves of a few heads when curves are at hand), drawn by `rateq.plots`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..plan import learned_text
from ..plots import plot_curves, plot_plan, plot_ppl_vs_bits
from .core import Evaluation


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


def learned_cell(row: dict) -> str:
    """A row's learned parameters, `1.0 MiB (0.39%)` of the model's fp16 weights; `–` for rows without."""
    n = row.get("learned_bytes")
    return learned_text(n, row.get("learned_share"), short=True) if n else "–"


def has_learned(rows: list[dict]) -> bool:
    return any(r.get("learned_bytes") for r in rows)


def _table(rows: list[dict], removed: dict, *, matched_column: bool, kivi_column: bool,
           policy_column: bool, learned_column: bool) -> list[str]:
    head = ["method", "what"] + (["matched at"] if matched_column else []) + [
        "nominal bits", "effective bits"] + (["learned"] if learned_column else []) + [
        "PPL", "ΔPPL", "KL (nats)", "flips", "key flips"]
    head += (["KIVI excess removed"] if kivi_column else []) + (["policy"] if policy_column else [])
    align = ["---", "---"] + ["---:"] * (len(head) - 2 - policy_column) + (["---"] if policy_column else [])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        flips, kflips = r.get("flip_rate"), r.get("key_flip_rate")
        cells = [r["name"], r.get("label", "")]
        if matched_column:
            at = r.get("compared_at")
            cells.append("–" if r.get("family") == "fp" else _num(at, "g"))
        cells += [_num(r["nominal_bits"], ".3f"), _num(r["effective_bits"], ".3f")]
        if learned_column:
            cells.append(learned_cell(r))
        cells += [_num(r["ppl"], ".2f"), _num(r.get("delta_ppl"), "+.2f"), _num(r.get("kl"), ".4f"),
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
    without a KIVI comparison. A "policy" column appears when the rows ran under different cache policies, and a
    "learned" column (bytes of learned parameters and their share of the model's fp16 weights) when a row has
    learned parameters."""
    rows = list(result)
    budgets = list(result.settings.get("budgets") or []) if isinstance(result, Evaluation) else []
    budgets = budgets or sorted({r["compared_at"] for r in rows if r.get("compared_at") is not None})
    removed = kivi_excess_removed(rows)
    columns = dict(policy_column=len(_policies(rows)) > 1, learned_column=has_learned(rows))
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if not budgets:  # no comparison at matched storage: one table, rows at their own storage
        lines += _table(rows, removed, matched_column=False, kivi_column=True, **columns)
        return "\n".join(lines) + "\n"
    fp = [r for r in rows if r.get("family") == "fp"]
    order = {b: i for i, b in enumerate(budgets)}
    matched = [r for r in rows if r.get("family") != "fp" and r.get("compared_at") is not None]
    matched.sort(key=lambda r: order.get(r["compared_at"], len(order)))  # stable: input order within a budget
    other = [r for r in rows if r.get("family") != "fp" and r.get("compared_at") is None]
    lines += _table(fp + matched, removed, matched_column=True, kivi_column=True, **columns)
    if other:
        shown = ", ".join(f"{b:g}" for b in budgets)
        lines += ["", f"Not matched: at other storage than the compared budgets ({shown} effective bits), so "
                      "not comparable at matched bits (no KIVI comparison):", ""]
        lines += _table(other, removed, matched_column=False, kivi_column=False, **columns)
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
        p = plot_plan(m.plan, out / f"bits_{safe}.png", title=m.name)
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
    if has_learned(rows):
        md += ["`learned`: the learned parameters (codebooks in fp16, static scales) a row's plan holds once per "
               "model, outside its effective bits, with their share of the model's fp16 weights.", ""]
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
