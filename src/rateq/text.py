"""Text for calibration and evaluation: bundled aliases, local files, and `datasets` specs.

Bundled (compressed package data):
- `austen-emma` (Emma), `austen-pp` (Pride and Prejudice, the evaluation default): public domain, from Debian's
  r-cran-janeaustenr;
- `jargon` (the Jargon File 4.4.7, from Debian's jargon-text): public domain, a second evaluation domain;
- `kjv`: seven books of the King James Bible (Genesis, Psalms, Proverbs, Isaiah 40–55, Matthew, Acts, Romans),
  public domain, from Debian's bible-kjv-text;
- `python-docs`: the Python 3.11 tutorial and eight HOWTOs (reStructuredText), and `python-code`: 21 modules of
  the Python 3.11 standard library — both under the PSF License (`data/PYTHON-LICENSE.txt`);
- `mix`, the calibration default: Emma, `kjv`, `python-docs` and `python-code`, windows drawn from each in turn —
  four kinds of text (a novel, scripture, technical prose, code), none of them the evaluation texts.

Keep calibration and evaluation text apart.
"""

from __future__ import annotations

import functools
import json
import lzma
from importlib import resources
from pathlib import Path

import torch

from .errors import RateQError

DEFAULT_CALIBRATION_TEXT = "mix"
DEFAULT_EVAL_TEXT = "austen-pp"

BUNDLED_TEXT = {
    "austen-emma": "austen_emma.txt.xz",
    "austen-pp": "austen_prideprejudice.txt.xz",
    "jargon": "jargon.txt.xz",
    "kjv": "kjv.txt.xz",
    "python-docs": "python_docs.txt.xz",
    "python-code": "python_code.txt.xz",
}
# Texts made of several bundled texts: calibration windows are drawn from each part in turn.
MIXED_TEXT = {"mix": ("austen-emma", "kjv", "python-docs", "python-code")}
DATASET_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
}


def load_text(spec: str) -> str:
    """Return the whole text named by `spec` as one string.

    `spec` is a bundled alias (`austen-emma`, `austen-pp`, `jargon`, `kjv`, `python-docs`, `python-code`, or
    `mix`: its parts one after another), a local `.txt` / `.jsonl` file (the `text` field of each JSON line), a
    dataset alias (`wikitext2`), or `hf:NAME[/CONFIG]:SPLIT[:FIELD]` loaded with `datasets.load_dataset`
    (needs the hub or a local datasets cache).
    """
    if spec in MIXED_TEXT:
        return "\n\n".join(load_text(part) for part in MIXED_TEXT[spec])
    if spec in BUNDLED_TEXT:
        data = resources.files("rateq").joinpath("data", BUNDLED_TEXT[spec]).read_bytes()
        return lzma.decompress(data).decode("utf-8")
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        text = _read_text_file(path, spec)
        if path.suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError, IndexError, RecursionError):
                    raise RateQError(f"{spec}:{n}: each line must be a JSON object with a 'text' field") from None
            text = "\n\n".join(rows)
            if not text.strip():
                raise RateQError(f"text file {spec} holds no text (no line with a non-empty 'text' field)")
        return text
    if spec in DATASET_ALIASES:
        return _load_dataset_text(*DATASET_ALIASES[spec])
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise RateQError(f"dataset spec {spec!r} must look like hf:NAME[/CONFIG]:SPLIT[:FIELD]")
        name, _, config = parts[0].partition("/")
        return _load_dataset_text(name, config or None, parts[1], parts[2] if len(parts) == 3 else "text")
    raise RateQError(
        f"unknown text {spec!r}: use {', '.join([*BUNDLED_TEXT, *MIXED_TEXT])}, a .txt/.jsonl file, "
        f"{', '.join(DATASET_ALIASES)}, or hf:NAME[/CONFIG]:SPLIT[:FIELD]"
    )


def _read_text_file(path: Path, spec: str) -> str:
    """A local file's text: it must exist, be readable, be UTF-8 text and hold more than whitespace."""
    if path.is_dir():
        raise RateQError(f"text file {spec} is a folder; give a .txt or .jsonl file")
    if not path.is_file():
        raise RateQError(f"text file {spec} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RateQError(f"cannot read text file {spec} ({exc.strerror or exc})") from None
    if b"\x00" in data:
        raise RateQError(f"text file {spec} is binary (it holds NUL bytes); give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RateQError(f"text file {spec} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); "
                         "convert it to UTF-8") from None
    if not text.strip():
        raise RateQError(f"text file {spec} is empty; give a file with text in it")
    return text


def _load_dataset_text(name: str, config: str | None, split: str, field: str) -> str:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable / not cached"
        raise RateQError(
            f"cannot load dataset {name}/{config}:{split} ({type(exc).__name__}); it needs the hub or a local "
            f"datasets cache. Offline, pass a local .txt or .jsonl file instead"
        ) from None
    if field not in ds.column_names:
        raise RateQError(f"dataset {name} has no field {field!r}; fields: {', '.join(ds.column_names)}")
    return "\n\n".join(t for t in ds[field] if t)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of `text` as a 1-D LongTensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"]
    return ids[0]


def token_windows(ids: torch.Tensor, n: int, seq_len: int, *, seed: int | None = 0, start: int = 0,
                  skip: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` tokens from `ids[start:]` as an `(n, seq_len)` LongTensor.

    `seed=None` takes consecutive windows from `start`; otherwise `n` distinct non-overlapping windows are drawn
    with a seeded generator, so the same seed always gives the same windows. `skip` passes over the first `skip`
    windows of that draw: `skip=n` gives `n` more windows that share no token with those of `skip=0`.
    """
    if n < 1 or seq_len < 1:
        raise RateQError("the number of sequences and their length must be positive")
    ids = ids[start:]
    slots = ids.numel() // seq_len
    if slots < n + skip:
        raise RateQError(
            f"not enough text: {n + skip} x {seq_len} tokens requested but only {ids.numel()} tokens "
            f"({slots} windows) are available; use fewer or shorter sequences, or more text"
        )
    if seed is None:
        picks = torch.arange(skip, skip + n)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        picks = torch.randperm(slots, generator=gen)[skip:skip + n].sort().values
    return torch.stack([ids[int(p) * seq_len:(int(p) + 1) * seq_len] for p in picks])


def share(n: int, parts: int) -> list[int]:
    """`n` split over `parts` as evenly as can be, the first parts taking one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def text_windows(tokenizer, spec: str, n: int, seq_len: int, *, seed: int | None = 0,
                 char_start: int = 0, skip: int = 0) -> torch.Tensor:
    """Load `spec`, skip `char_start` characters, tokenize, and cut `(n, seq_len)` windows (see token_windows).

    A mixed text (`mix`) gives its parts `n` windows in turn (`share`), each part's drawn from that part alone,
    in the order of the parts; `skip` is shared out alike."""
    if spec in MIXED_TEXT:
        parts = MIXED_TEXT[spec]
        if n < 1:
            raise RateQError("the number of sequences and their length must be positive")
        picked = []
        for part, k, s in zip(parts, share(n, len(parts)), share(skip, len(parts))):
            if k:
                try:
                    picked.append(text_windows(tokenizer, part, k, seq_len, seed=seed, char_start=char_start, skip=s))
                except RateQError as exc:
                    raise RateQError(f"{spec} draws {k} of its {n} windows from {part}: {exc}") from None
        return torch.cat(picked)
    if char_start < 0:
        raise RateQError(f"the character offset must be 0 or more, got {char_start}")
    try:
        ids = _bundled_tokens(tokenizer, spec, char_start) if spec in BUNDLED_TEXT else None
    except TypeError:  # a tokenizer that cannot be a cache key (unhashable)
        ids = None
    if ids is None:
        ids = _tokens(tokenizer, spec, char_start)
    return token_windows(ids, n, seq_len, seed=seed, skip=skip)


def _tokens(tokenizer, spec: str, char_start: int) -> torch.Tensor:
    text = load_text(spec)
    if char_start >= len(text):
        raise RateQError(f"text {spec!r} has {len(text)} characters; cannot start at {char_start}")
    return tokenize(tokenizer, text[char_start:])


@functools.lru_cache(maxsize=8)
def _bundled_tokens(tokenizer, spec: str, char_start: int) -> torch.Tensor:
    """`_tokens` of a bundled text, kept: the text never changes, and a command checks the windows it will cut
    before the weights load, then calibration cuts them (and held-out ones) again."""
    return _tokens(tokenizer, spec, char_start)
