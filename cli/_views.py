"""What the commands show of plans and curves: the plan summary, the layer × head bit map and the frontier table.
Every cell is a `Text` (plain text with a style), never parsed as markup."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ._common import Output

# Cell colours by code bits: the fewer bits, the hotter.
_BIT_STYLE = {1: "bold red", 2: "red", 3: "yellow", 4: "green", 5: "cyan", 6: "blue", 7: "blue", 8: "magenta",
              16: "white"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def print_summary(sink: Output, plan, *, title: str | None = None) -> None:
    """The short summary every command that makes or reads a plan prints."""
    from rateq.plan import learned_text
    from rateq.profile import plan_summary

    s = plan_summary(plan)
    budget = "none (hand-made)" if s["budget_bits"] is None else f"{s['budget_bits']:g}"
    if title:
        sink.line(title)
    sink.line(f"model {plan.model.name} ({plan.model.architecture}, {plan.num_layers} layers × "
              f"{plan.num_kv_heads} KV heads, head_dim {plan.model.head_dim})")
    sink.line(f"budget {budget} effective bits per element → plan {s['effective_bits']:.4f} effective, "
              f"{s['nominal_bits']:.4f} nominal; K {s['k_bits']:.2f} / V {s['v_bits']:.2f} mean code bits")
    solver = s["solver"]
    if solver:
        facts = [f"method {solver.get('method')}"]
        if "predicted_distortion" in solver:
            facts.append(f"predicted {solver.get('metric', 'distortion')} {solver['predicted_distortion']:.6g}")
        if solver.get("gap") is not None:
            facts.append(f"gap {solver['gap']:.3g}")
        if "seconds" in solver:
            facts.append(f"{solver['seconds'] * 1e3:.1f} ms")
        if solver.get("engine"):
            facts.append(f"engine {solver['engine']}")
        sink.line("solver: " + ", ".join(facts))
    if len(s["quantizers"]) > 1 or plan.quantizers[0].id != "minmax-g32-fp16":
        sink.line("quantizers: " + "; ".join(f"{q} (K {n['k']}, V {n['v']} heads)" for q, n in s["quantizers"].items()))
    if s["learned_bytes"]:
        learned = learned_text(s["learned_bytes"], s["learned_share"])
        sink.line(f"learned parameters (codebooks, static scales): {learned}; a fixed cost per model, not per token")


def bit_map(plan) -> Table:
    """Layer × head table of `K/V` code bits, with per-layer means; letters mark quantizers when several."""
    many = len(plan.quantizers) > 1
    table = Table(title="code bits per KV head (K/V)", show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("K mean", justify="right")
    table.add_column("V mean", justify="right")
    for h in range(plan.num_kv_heads):
        table.add_column(f"h{h}", justify="center")

    def cell(role, l, h) -> tuple[str, str]:
        b = int(plan.bits(role)[l, h])
        tag = _LETTERS[int(plan.quantizer_ids(role)[l, h]) % 26] if many else ""
        return f"{b}{tag}", _BIT_STYLE.get(b, "white")

    for l in range(plan.num_layers):
        table.add_row(str(l), f"{plan.k_bits[l].double().mean():.2f}", f"{plan.v_bits[l].double().mean():.2f}",
                      *[Text.assemble(cell("k", l, h), "/", cell("v", l, h)) for h in range(plan.num_kv_heads)])
    if many:
        table.caption = Text("  ".join(f"{_LETTERS[i % 26]} = {q.id}" for i, q in enumerate(plan.quantizers)),
                             style="table.caption")
    return table


def frontier_table(rows: list[dict], metric: str) -> Table:
    """The predicted rate-distortion frontier: one row per budget, infeasible ones with the feasible range."""
    table = Table(title=Text(f"rate-distortion frontier (predicted {metric})", style="table.title"), show_edge=False)
    for name in ("budget", "predicted", "effective", "nominal", "K bits", "V bits"):
        table.add_column(name, justify="right")
    for r in rows:
        if not r["feasible"]:
            lo, hi = r["range"]
            table.add_row(f"{r['budget']:g}", Text(f"outside {lo:.3f}..{hi:.3f}", style="dim"), "", "", "", "")
            continue
        table.add_row(f"{r['budget']:g}", f"{r['distortion']:.6g}", f"{r['effective_bits']:.3f}",
                      f"{r['nominal_bits']:.3f}", f"{r['k_bits']:.2f}", f"{r['v_bits']:.2f}")
    return table
