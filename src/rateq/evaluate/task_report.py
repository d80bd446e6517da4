"""Reports of task evaluations (`rateq.evaluate.tasks.run_tasks`): markdown tables, a JSON file, and one
accuracy heatmap per method and retrieval task, drawn by `rateq.plots.plot_passkey_heatmap`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..plots import plot_passkey_heatmap
from .report import has_learned, learned_cell, policy_text
from .tasks import TaskEvaluation, kept_prompts

_RETRIEVAL = (("passkey", "passkey"), ("needle", "multi-key needle"))


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _bits(row: dict) -> str:
    return "16" if row.get("family") == "fp" else f"{row['effective_bits']:.3g}"


def per_context(cells: list[dict], reference: list[dict]) -> dict[int, dict]:
    """Per context: `accuracy` (mean over its depths) and `kept` (share of the prompts of that context full
    precision answers that these cells answer too; None where full precision answers none), with `solved` /
    `reference_solved` (prompts)."""
    out: dict[int, dict] = {}
    for context in sorted({int(c["context"]) for c in cells}):
        mine = [c for c in cells if int(c["context"]) == context]
        kept, solved = kept_prompts(mine, [c for c in reference if int(c["context"]) == context])
        out[context] = {"accuracy": sum(float(c["accuracy"]) for c in mine) / len(mine),
                        "kept": kept / solved if solved else None, "solved": kept, "reference_solved": solved}
    return out


def summary_table(result: TaskEvaluation | list[dict]) -> str:
    """One markdown row per method: effective bits, learned parameters (when a row has any), and per task run its
    headline figures (retrieval accuracy and kept, agreement and the earliest first divergence, decode-mode
    perplexity)."""
    rows = list(result)
    tasks = [t for t, _ in _RETRIEVAL if any(t in r for r in rows)]
    learned = has_learned(rows)
    head = ["method", "what", "effective bits", "nominal bits"] + (["learned"] if learned else [])
    for t, label in _RETRIEVAL:
        if t in tasks:
            head += [f"{label} accuracy", f"{label} kept"]
    agree = any("agreement" in r for r in rows)
    ppl = any("decode_ppl" in r for r in rows)
    if agree:
        n = next(r["agreement"]["n_tokens"] for r in rows if "agreement" in r)
        head += [f"agreement ({n} tokens)", "first divergence"]
    if ppl:
        ctx = next(r["decode_ppl"]["seq_len"] for r in rows if "decode_ppl" in r)
        head += [f"decode PPL ({ctx})"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]
    for r in rows:
        cells = [r["name"], r.get("label", ""), _bits(r),
                 "16" if r.get("family") == "fp" else f"{r['nominal_bits']:.3g}"]
        if learned:
            cells.append(learned_cell(r))
        for t in tasks:
            got = r.get(t) or {}
            kept = "reference" if r.get("family") == "fp" and got else _pct(got.get("kept"))
            cells += [_pct(got.get("accuracy")), kept]
        if agree:
            a = r.get("agreement") or {}
            first = a.get("first_divergence") or []
            shown = ", ".join("none" if f is None else str(f) for f in first) if first else "–"
            cells += [_pct(a.get("agreement")), shown]
        if ppl:
            p = (r.get("decode_ppl") or {}).get("ppl")
            cells.append("–" if p is None else f"{p:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def context_table(result: TaskEvaluation | list[dict], task: str = "passkey") -> str:
    """Accuracy / kept per context of one retrieval task, one row per method (empty when the task did not run)."""
    rows = [r for r in result if task in r]
    if not rows:
        return ""
    reference = rows[0][task]["cells"]
    contexts = sorted({int(c["context"]) for c in reference})
    head = ["method", "effective bits"] + [f"{c:,}" for c in contexts]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        by = per_context(r[task]["cells"], reference)
        shown = []
        for c in contexts:
            got = by[c]
            kept = "" if r.get("family") == "fp" or got["kept"] is None else \
                f" (kept {got['solved']}/{got['reference_solved']})"
            shown.append(f"{_pct(got['accuracy'])}{kept}")
        lines.append("| " + " | ".join([r["name"], _bits(r)] + shown) + " |")
    return "\n".join(lines) + "\n"


def describe(settings: dict) -> str:
    """One paragraph: model, text, what each task ran."""
    tasks = settings.get("tasks") or []
    parts = []
    if any(t in tasks for t in ("passkey", "needle")):
        contexts = ", ".join(f"{c:,}" for c in settings["contexts"])
        depths = ", ".join(f"{100 * d:g}%" for d in settings["depths"])
        parts.append(f"retrieval at contexts {contexts} tokens × depths {depths}, {settings['trials']} prompt(s) per "
                     f"cell from seed {settings['seed']}, greedy, at most {settings['max_new_tokens']} answer tokens "
                     f"(prompt and answer fit in the context)"
                     + (f"; the needle task hides {settings['keys']} facts and asks one" if "needle" in tasks else ""))
    if "agreement" in tasks:
        parts.append(f"agreement: {settings['agree_tokens']} greedy tokens after {settings['trials']} prompt(s) of "
                     f"{settings['agree_context']:,} tokens")
    if "decode-ppl" in tasks:
        parts.append(f"decode PPL: {settings['trials']} window(s) of {settings['ppl_context']:,} tokens, the first half "
                     f"prefilled, the second decoded token by token")
    what = "; ".join(parts)
    return (f"Model `{settings.get('model')}`, text `{settings.get('data')}` (agreement and decode windows from "
            f"character {settings.get('char_start')}); every row through its cache: full precision a DynamicCache, "
            f"the others a RateQCache under their policy. {what[:1].upper() + what[1:]}. `kept`: the share of the "
            "prompts full precision answers that the row answers too (with one prompt per cell, its cells).")


def to_markdown(result: TaskEvaluation, *, title: str | None = None) -> str:
    """The summary table, then accuracy per context for each retrieval task run."""
    lines = [f"### {title}", ""] if title else []
    lines += [summary_table(result)]
    policies = [f"`{r['name']}` {policy_text(r['policy'])}" for r in result if r.get("policy")]
    if policies:
        lines += ["", "Cache policies (R: full-precision residual window; keys quantized a whole block at a time): "
                      + "; ".join(policies) + "."]
    for task, label in _RETRIEVAL:
        table = context_table(result, task)
        if table:
            lines += ["", f"{label.capitalize()} accuracy per context (kept: full precision's answered prompts "
                          "also answered):",
                      "", table]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def write_report(result: TaskEvaluation, out_dir, *, title: str = "rateq tasks") -> dict[str, Path]:
    """Write `report.md`, `results.json` and `<task>_<method>.png` (a depth × context accuracy heatmap per
    method and retrieval task). Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rows = list(result)
    maps = []
    for task, label in _RETRIEVAL:
        ran = [r for r in rows if task in r]
        if not ran:
            continue
        reference = ran[0][task]["cells"]
        for r in ran:
            name = f"{task}_{_safe(r['name'])}"
            paths[name] = plot_passkey_heatmap(r[task]["cells"], out / f"{name}.png", title=f"{r['name']} ({label})",
                                               reference=None if r.get("family") == "fp" else reference)
            maps.append((r["name"], label, paths[name].name))
    doc = {**result.to_dict(),
           "per_context": {task: {r["name"]: {str(c): v for c, v in
                                              per_context(r[task]["cells"], rows[0][task]["cells"]).items()}
                                  for r in rows if task in r}
                           for task, _ in _RETRIEVAL if task in rows[0]}}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["json"] = out / "results.json"
    md = [f"# {title}", "", describe(result.settings), "", to_markdown(result), ""]
    if maps:
        md += ["Accuracy per cell (× : full precision solves the cell, this row does not; · : full precision misses "
               "it too):", ""]
        md += [f"![{name}, {label}]({fname})" for name, label, fname in maps] + [""]
    (out / "report.md").write_text("\n".join(md))
    paths["markdown"] = out / "report.md"
    return paths
