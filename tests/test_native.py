"""Native kernels' build and load (`rateq.native`): built once per source, machine and flags into the cache, loaded
once per state; no compiler, a failed build, a missing symbol or `RATEQ_KERNELS=torch` give None and say why."""

from __future__ import annotations

import ctypes

import pytest

from rateq import native

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")

SOURCE = "int rq_answer(int x) { return x + 41; }\n"


def declare(lib):
    lib.rq_answer.argtypes, lib.rq_answer.restype = [ctypes.c_int], ctypes.c_int


@needs_compiler
def test_a_source_is_built_once_and_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RATEQ_KERNELS", raising=False)
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    flags = ["-O2", "-shared", "-fPIC"]
    state: dict = {}
    path = native.build(src, flags, state)
    assert path is not None and path.parent == tmp_path / "cache" / "kernels" and path.name.startswith("answer-")
    stamp = path.stat().st_mtime_ns
    assert native.build(src, flags, state) == path and path.stat().st_mtime_ns == stamp  # from the cache
    assert native.build(src, [*flags, "-O1"], state) != path  # other flags: another build
    lib = native.load(state, lambda: native.build(src, flags, state), declare)
    assert lib is not None and lib.rq_answer(1) == 42
    assert native.load(state, lambda: None, declare) is lib  # loaded once per state
    assert native.build_error(state) is None


@needs_compiler
def test_failures_give_none_and_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path))
    monkeypatch.delenv("RATEQ_KERNELS", raising=False)
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    state: dict = {}
    assert native.load(state, lambda: native.build(broken, ["-shared", "-fPIC"], state), declare) is None
    assert native.build_error(state)
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    state = {}

    def lacks(lib):
        lib.rq_missing.restype = ctypes.c_int

    assert native.load(state, lambda: native.build(src, ["-shared", "-fPIC"], state), lacks) is None
    assert "rq_missing" in native.build_error(state)
    assert native.build(src, ["-shared", "-fPIC"], {}, cc=str(tmp_path / "no-such-cc")) is None


def test_no_compiler_or_the_torch_setting_give_none(monkeypatch, tmp_path):
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path))
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    monkeypatch.setattr(native, "compiler", lambda: None)
    state: dict = {}
    assert native.build(src, ["-shared", "-fPIC"], state) is None
    assert native.load(state, lambda: native.build(src, ["-shared", "-fPIC"], state), declare) is None
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert native.disabled()
    assert native.load({}, lambda: pytest.fail("built while disabled"), declare) is None
