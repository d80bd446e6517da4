"""The native decode kernels equal the torch path on every family they take: scores and outputs of a bucket read
straight from its packed codes, for GQA and MHA, several head dims, bit widths, batch rows, pre-RoPE keys
re-rotated by the model's own tables, learned codebooks, and token counts that end mid-tile; buckets they do not
take, and a machine without a compiler, fall back to the torch path."""

from __future__ import annotations

import pytest
import torch

from rateq import QuantSpec, parse_spec, rotary_of
from rateq.runtime import kernels
from rateq.runtime.store import RoleStore

needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason=f"no native kernels here ({kernels.build_error() or 'no C compiler'})")
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 sums in another order (and FMA contraction)

KEY_SPECS = ["minmax-g32-fp16", "minmax-g64-fp16-prerope", "minmax-g128-rhadamard-fp16-prerope",
             "minmax-g32-hadamard-fp16", "symmetric-g32-fp16", "minmax-g32-fp16-zcode", "minmax-g32-fp8",
             "minmax-g32-bf16-prerope", "lloydmax-g64-rhadamard-fp16", "lloydmax-g32-hadamard-fp16-prerope",
             "minmax-g16-channels-fp32"]
VALUE_SPECS = ["minmax-g32-fp16", "lloydmax-g64-rhadamard-fp16", "lloydmax-g32-rhadamard-bf16", "symmetric-g16-fp16",
               "minmax-g32-fp16-zcode", "minmax-g32-hadamard-fp8"]


def store(role, spec, bits, H, D, T, B=1, rotary=None, seed=0):
    """A role store of H heads all at (bits, spec), holding T random tokens (keys: T whole blocks)."""
    st = RoleStore(role, torch.full((H,), bits), torch.zeros(H, dtype=torch.long), [spec], D, 0, rotary)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g) * torch.linspace(0.2, 3.0, D)  # channels of unequal range
    st.append(x, 0)
    return st


def torch_path(st, fn, x):
    out = None
    for bucket in st.buckets:
        y = getattr(bucket, fn)(bucket.select(x))
        if out is None:
            out = x.new_zeros(*x.shape[:3], y.shape[-1])
        out[:, bucket.heads(x.device)] = y
    return out


@pytest.fixture(scope="module")
def rotary():
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(D):
        config = LlamaConfig(hidden_size=2 * D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=D, vocab_size=32)
        return rotary_of(LlamaForCausalLM(config))
    return make


@needs_kernels
@pytest.mark.parametrize("sid", KEY_SPECS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_scores_from_the_codes_equal_the_torch_path(sid, bits, rotary):
    spec = parse_spec(sid)
    D = 128 if spec.group_size == 128 else 64
    T = 4 * (spec.group_size if spec.axis_for("k") == "tokens" else 67)  # ends mid-tile for channel groups
    st = store("k", spec, bits, 3, D, T, B=2, rotary=rotary(D) if spec.prerope else None)
    bucket = st.buckets[0]
    assert kernels.runs(bucket, "cpu")
    for r in (1, 3):  # MHA and GQA
        q = torch.randn(2, 3, r, D, generator=torch.Generator().manual_seed(r))
        got = st.scores(q)
        torch.testing.assert_close(got, torch_path(st, "scores", q), **TOL)


@needs_kernels
@pytest.mark.parametrize("sid", VALUE_SPECS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_outputs_from_the_codes_equal_the_torch_path(sid, bits):
    spec = parse_spec(sid)
    st = store("v", spec, bits, 3, 64, 301, B=2)
    assert kernels.runs(st.buckets[0], "cpu")
    for r in (1, 4):
        p = torch.softmax(torch.randn(2, 3, r, 301, generator=torch.Generator().manual_seed(r)) * 3, -1)
        torch.testing.assert_close(st.mix(p), torch_path(st, "mix", p), **TOL)


@needs_kernels
@pytest.mark.parametrize("sid, bits", [("codebook-g1", 3), ("codebook-g2", 1), ("codebook-g2-prerope", 2),
                                       ("codebook-g2-rhadamard", 4), ("codebook-g4-prerope", 2),
                                       ("codebook-g4-hadamard-prerope", 1), ("codebook-g8", 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_learned_codebooks_read_from_the_codes_equal_the_torch_path(sid, bits, D, rotary, codebook_store):
    spec = parse_spec(sid)
    T = 4 * 67  # ends mid-tile
    for role in ("k", "v"):
        if role == "v" and spec.prerope:
            continue
        st = codebook_store(role, spec, bits, 3, D, T, B=2, rotary=rotary(D) if spec.prerope else None, heads=[0, 2])
        book = next(b for b in st.buckets if b.spec == spec)
        assert kernels.runs(book, "cpu") and book.head_list == [0, 2]
        for r in (1, 3):
            x = torch.randn(2, 3, r, D + T, generator=torch.Generator().manual_seed(r))
            if role == "k":
                q = x[..., :D].contiguous()
                torch.testing.assert_close(st.scores(q), torch_path(st, "scores", q), **TOL)
            else:
                p = torch.softmax(x[..., D:] * 3, -1)
                torch.testing.assert_close(st.mix(p), torch_path(st, "mix", p), **TOL)


@needs_kernels
def test_mixed_buckets_write_only_their_heads_into_strided_outputs(rotary):
    specs = [parse_spec("minmax-g32-fp16-prerope"), parse_spec("lloydmax-g64-rhadamard-fp16"), QuantSpec()]
    H, D, T = 5, 64, 96
    bits, qids = torch.tensor([2, 3, 2, 1, 4]), torch.tensor([0, 1, 0, 1, 2])  # non-contiguous heads per bucket
    g = torch.Generator().manual_seed(0)
    for role in ("k", "v"):
        st = RoleStore(role, bits, qids, specs, D, 0, rotary(D) if role == "k" else None)
        st.append(torch.randn(1, H, T, D, generator=g), 0)
        x = torch.randn(1, H, 2, D + T, generator=g)
        if role == "k":  # scores into a slice of a wider buffer, as the attention path does
            q = x[..., :D].contiguous()
            wide = torch.full((1, H, 2, T + 7), 7.0)
            st.scores(q, out=wide[..., 3:3 + T])
            torch.testing.assert_close(wide[..., 3:3 + T], torch_path(st, "scores", q), **TOL)
            assert (wide[..., :3] == 7).all() and (wide[..., 3 + T:] == 7).all()
        else:
            p = torch.softmax(x, -1)[..., D:]  # a strided view of the weights
            torch.testing.assert_close(st.mix(p), torch_path(st, "mix", p.contiguous()), **TOL)


@needs_kernels
def test_fp16_metadata_is_read_exactly_including_subnormals():
    spec = parse_spec("lloydmax-g64-rhadamard-fp16")
    st = store("v", spec, 2, 1, 64, 40)
    norm = st.buckets[0].parts["norm"].buf
    values = torch.tensor([6e-8, 1e-5, 3.0e-5, 0.5, 1.0, 65504.0, 2.0**-14, 1.5e-7], dtype=torch.float16)
    norm[0, 0, :40, 0] = values.repeat(5)
    for t in range(8):  # one token at a time: the output is that token's norm times its unrotated levels
        p = torch.zeros(1, 1, 1, 40)
        p[..., t] = 1.0
        want = torch_path(st, "mix", p)
        torch.testing.assert_close(st.mix(p), want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)


def test_buckets_the_kernels_do_not_take_use_the_torch_path():
    D = 64
    for spec, bits in [(parse_spec("lloydmax-qjl-g64-rhadamard-fp16"), 3), (QuantSpec(group_size=32, outlier_frac=0.05), 2),
                       (QuantSpec(), 16), (QuantSpec(group_size=4, group_along="channels"), 2)]:
        st = store("v", spec, bits, 2, D, 64)
        assert not kernels.runs(st.buckets[0], "cpu")
        p = torch.softmax(torch.randn(1, 2, 3, 64), -1)
        torch.testing.assert_close(st.mix(p), torch_path(st, "mix", p), atol=0, rtol=0)


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path))
    assert kernels.library() is None
    st = store("k", parse_spec("minmax-g32-fp16"), 2, 2, 64, 64)
    assert not kernels.runs(st.buckets[0], "cpu")
    q = torch.randn(1, 2, 3, 64)
    torch.testing.assert_close(st.scores(q), torch_path(st, "scores", q), atol=0, rtol=0)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert kernels.library() is None


@needs_kernels
def test_the_built_library_is_reused_and_a_failed_build_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("RATEQ_CACHE", str(tmp_path))
    path = kernels._build()
    assert path is not None and path.exists() and path.parent == tmp_path / "kernels"
    assert kernels._build() == path  # keyed by source and machine: built once
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    assert kernels._build() is None and kernels.build_error()
