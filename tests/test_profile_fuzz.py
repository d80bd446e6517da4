"""Damaged profiles and curves, at random: every mutation loads as a valid object or raises RateQError.

A fixed seed mutates real files (made by the library from a tiny random model's calibration) in four ways:
header bytes (the length prefix and the JSON header, byte by byte), metadata values (replaced, removed, or a
field inside their JSON changed), tensors (shape, dtype and values changed, rewritten with safetensors), and
the header's own shape / dtype / offset entries edited without touching the data. A file that loads must also
be usable: summaries, JSON export and (for curves) solving either work or raise RateQError.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

import rateq
from rateq.errors import RateQError
from rateq.io import read_safetensors
from rateq.profile import load_profile_curves, plan_summary, plan_to_json

SEED = 20240601
ROUNDS = 300

JUNK = ["", "null", "true", "0", "-1", "1e309", "NaN", "Infinity", "[]", "{}", "[1, 2]", '"text"', "{not json",
        '{"a": 1}', "[" * 50 + "]" * 50, "\u00e9\u00e8", '[{"kind": 7}]', '{"name": 1}', "3.5", "16"]
ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3.5, 16, 10 ** 30, -(10 ** 30), "x", "", [], {}, [1], {"a": 1},
              float("nan"), float("inf"), 1e-300]
DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool]


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny):
    """(profile bytes, curves bytes) of a real calibration of a tiny random llama (2 quantizers, 3 widths)."""
    model = tiny("llama", kv_heads=2)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    curves = rateq.calibrate(model, None, ids, bits=(2, 3, 4), metric="mse",
                             quantizers=["minmax-g32-fp16", "minmax-g16-fp16"])
    plan = rateq.solve(curves, 3.5)
    folder = tmp_path_factory.mktemp("fuzz-originals")
    profile, cpath = folder / "p.safetensors", folder / "p.curves.safetensors"
    rateq.save_profile(plan, profile, curves=curves)
    curves.save(cpath)
    return profile.read_bytes(), cpath.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # the length prefix
        buf[rng.randrange(8)] = rng.randrange(256)
    elif kind == 1:  # bytes inside the JSON header
        for _ in range(rng.randint(1, 4)):
            buf[8 + rng.randrange(n)] = rng.randrange(256)
    elif kind == 2:  # truncated anywhere
        del buf[rng.randrange(len(buf)):]
    elif kind == 3:  # junk appended or inserted
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 4:  # a byte of the tensor data
        if len(buf) > 8 + n:
            buf[8 + n + rng.randrange(len(buf) - 8 - n)] = rng.randrange(256)
    else:  # random bytes of the same length
        buf = bytearray(rng.randrange(256) for _ in range(len(buf)))
    return bytes(buf)


def _mutate_json_value(rng: random.Random, text: str) -> str:
    """Change one field somewhere inside a metadata value's JSON, or replace it outright."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, (dict, list)) or rng.random() < 0.3:
        return rng.choice(JUNK)

    def containers(v, out):
        if isinstance(v, (dict, list)):
            out.append(v)
            for child in (v.values() if isinstance(v, dict) else v):
                containers(child, out)
        return out

    target = rng.choice(containers(value, []))
    if isinstance(target, dict) and target:
        key = rng.choice(list(target))
        action = rng.randrange(3)
        if action == 0:
            del target[key]
        elif action == 1:
            target[key] = rng.choice(ODD_VALUES)
        else:
            target["unexpected_" + key] = rng.choice(ODD_VALUES)
    elif isinstance(target, list) and target:
        i = rng.randrange(len(target))
        if rng.random() < 0.5:
            target[i] = rng.choice(ODD_VALUES)
        else:
            del target[i]
    else:
        return rng.choice(JUNK)
    return json.dumps(value)


def _mutate_metadata(rng: random.Random, data: bytes) -> bytes:
    header, body = _split(data)
    meta = header.setdefault("__metadata__", {})
    key = rng.choice(sorted(meta))
    action = rng.randrange(4)
    if action == 0:
        del meta[key]
    elif action == 1:
        meta[key] = rng.choice(JUNK)
    elif action == 2:
        meta[key] = _mutate_json_value(rng, meta[key])
    else:
        meta[rng.choice(["format", "version"])] = rng.choice(["", "1", "2", "rateq.profile", "rateq.curves", "x"])
    return _join(header, body)


def _retensor(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    kind = rng.randrange(7)
    if kind == 0 and t.dim() >= 1 and t.shape[0] > 1:  # a row dropped
        return t[:-1].clone()
    if kind == 1:  # an extra row
        return torch.cat([t, t[:1]]) if t.dim() >= 1 and t.shape[0] else t.reshape(1, *t.shape)
    if kind == 2 and t.dim() >= 2:  # transposed
        return t.transpose(0, 1).contiguous()
    if kind == 3:  # flattened or given a dimension more
        return t.flatten() if rng.random() < 0.5 else t.unsqueeze(rng.randrange(t.dim() + 1))
    if kind == 4:  # another dtype
        dtype = rng.choice(DTYPES)
        return t.to(dtype) if not t.is_floating_point() or dtype.is_floating_point or dtype == torch.bool \
            else t.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)
    if kind == 5:  # odd values in place
        out = t.clone()
        if out.numel():
            flat = out.view(-1)
            value = rng.choice([0, -1, 1, 7, 9, 15, 17, 255, -(2 ** 31), 2 ** 40, float("nan"), float("inf"),
                                -float("inf"), 1e30, -0.5])
            try:
                flat[rng.randrange(flat.numel())] = value
            except (RuntimeError, OverflowError):
                pass
        return out
    return torch.zeros(0, dtype=t.dtype)  # emptied


def _mutate_tensors(rng: random.Random, path, data: bytes) -> bytes:
    """Change a tensor's shape, dtype or values and write the file again with safetensors (metadata kept)."""
    path.write_bytes(data)
    tensors, meta = read_safetensors(path, "file")
    action = rng.randrange(5)
    name = rng.choice(sorted(tensors))
    if action == 0:
        del tensors[name]
    elif action == 1:
        tensors[name + rng.choice(["", "_"])] = torch.zeros(2, dtype=torch.int64)
    else:
        tensors[name] = _retensor(rng, tensors[name])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path.read_bytes()


def _mutate_header_entries(rng: random.Random, data: bytes) -> bytes:
    """Edit a tensor's header entry (shape, dtype, offsets) without rewriting its data."""
    header, body = _split(data)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    field = rng.choice(["shape", "dtype", "data_offsets", "extra", "whole"])
    if field == "shape":
        entry["shape"] = rng.choice([[], [0], [1], list(reversed(entry["shape"])), entry["shape"] + [1], [-1],
                                     [2 ** 62], ["3"], [1.5], None])
    elif field == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I32", "BOOL", "F8_E4M3", "C64", "X", 5])
    elif field == "data_offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 8], [a + 1, b], [0, 0], [-8, b], [a], None])
    elif field == "extra":
        entry["extra"] = 1
    else:
        header[name] = rng.choice(ODD_VALUES)
    return _join(header, body)


def _mutations(rng: random.Random, original: bytes, scratch):
    for i in range(ROUNDS):
        kind = i % 4
        if kind == 0:
            data = _mutate_bytes(rng, original)
        elif kind == 1:
            data = _mutate_metadata(rng, original)
        elif kind == 2:
            data = _mutate_tensors(rng, scratch, original)
        else:
            data = _mutate_header_entries(rng, original)
        yield i, kind, data


def _use_plan(plan) -> None:
    """A loaded plan must be usable by every reader of plans (or refuse with a RateQError)."""
    summary = plan_summary(plan)
    assert summary["effective_bits"] == summary["effective_bits"]  # not NaN
    rateq.plan_from_json(json.loads(json.dumps(plan_to_json(plan), default=str)))
    plan.describe()


def _use_curves(curves) -> None:
    budget = float(curves.cost().min() + curves.cost().max()) / 2
    for method in ("greedy", "exact"):
        try:
            rateq.solve(curves, budget, method=method)
        except RateQError:
            pass


@pytest.mark.parametrize("what", ["profile", "curves"])
def test_every_mutation_loads_or_is_refused_with_a_rateq_error(tmp_path, originals, what):
    rng = random.Random(f"{SEED}-{what}")
    original = originals[0] if what == "profile" else originals[1]
    path, scratch = tmp_path / f"m.{what}.safetensors", tmp_path / "scratch.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    for i, kind, data in _mutations(rng, original, scratch):
        path.write_bytes(data)
        try:
            if what == "profile":
                plan = rateq.load_profile(path)
                _use_plan(plan)
                stored = load_profile_curves(path)
                if stored is not None:
                    _use_curves(stored)
            else:
                _use_curves(rateq.Curves.load(path))
            outcomes["loaded"] += 1
        except RateQError as exc:
            assert str(exc) and "\n" not in str(exc), (i, kind, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 — the point of the test
            pytest.fail(f"mutation {i} (kind {kind}) of the {what} raised {type(exc).__name__}: {exc}")
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert outcomes["refused"] > ROUNDS // 3 and outcomes["loaded"] > 0, outcomes


def test_the_originals_load(tmp_path, originals):
    (tmp_path / "p.safetensors").write_bytes(originals[0])
    (tmp_path / "c.safetensors").write_bytes(originals[1])
    plan = rateq.load_profile(tmp_path / "p.safetensors")
    curves = rateq.Curves.load(tmp_path / "c.safetensors")
    assert load_profile_curves(tmp_path / "p.safetensors").shape == curves.shape == (3, 2, 2, 2, 3)
    assert plan.effective_bits <= 3.5
