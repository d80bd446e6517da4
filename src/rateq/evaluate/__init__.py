"""Evaluation: perplexity, KL to full precision and attention-routing flips of plans and baselines at matched
storage, in one teacher-forced pass per method; tables, JSON and plots.

    result = rateq.evaluate(model, "austen-pp", ["fp", "kivi", "wnorm", plan], tokenizer=tok, budgets=[2.5])
    rateq.write_report(result, "report/")
"""

from .baselines import DEFAULT_BASELINES, BaselineContext, build as build_baselines
from .core import Evaluation, evaluate
from .method import Method
from .report import to_markdown, write_report

__all__ = ["DEFAULT_BASELINES", "BaselineContext", "Evaluation", "Method", "build_baselines", "evaluate",
           "to_markdown", "write_report"]
