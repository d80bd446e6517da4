"""The Triton decode kernels compute what the torch path computes: scores and outputs straight from the packed
codes, for every family they take, every bit width, GQA, buckets of scattered heads, histories that end inside a
tile, pre-RoPE keys (rotated or not) re-rotated by position. Checked in Triton's interpreter on the CPU
(`TRITON_INTERPRET=1`), and compiled for CUDA GPUs (sm_86, sm_90) with Triton's compiler."""

from __future__ import annotations

import os
import textwrap

# Kernels run on CPU tensors. torch may have imported triton already; the kernels are defined on first use and read
# this then.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import cuda_compile  # noqa: E402  (tests/cuda_compile.py)
from rateq import QuantSpec, parse_spec, rotary_of  # noqa: E402
from rateq.runtime.kernels import triton_decode  # noqa: E402
from rateq.runtime.store import Bucket, RoleStore  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_decode.interpreting(), reason="TRITON_INTERPRET is set to something else")

# One quantizer per head; head 7 shares head 0's bucket (a bucket of scattered heads).
SPECS = [
    parse_spec("minmax-g8-fp16"),                      # float zero-points
    parse_spec("symmetric-g16-fp16"),                  # a constant shift
    parse_spec("minmax-g8-fp16-zcode"),                # integer zero-points: packed rows (keys), a stream (values)
    parse_spec("lloydmax-g16-rhadamard-fp16"),         # codebook levels, norms, rotated with signs
    parse_spec("minmax-g16-hadamard-fp16"),            # rotated
    QuantSpec(kind="symmetric", group_size=8, group_along="channels", rotation="hadamard", scale_dtype="fp8"),
    QuantSpec(group_size=8, scale_dtype="bf16"),
]
QIDS = [0, 1, 2, 3, 4, 5, 6, 0]
BITS = (1, 2, 3, 4, 8)
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 sums in another order


def _store(role: str, D: int, shift: int, chunks: tuple[int, ...], g: torch.Generator) -> RoleStore:
    """A store of 8 heads in 7 buckets, every bit width among them, filled in `chunks` appends (so the parts are
    strided views of grown buffers)."""
    bits = [BITS[(QIDS[hd] + shift) % len(BITS)] for hd in range(len(QIDS))]
    store = RoleStore(role, torch.tensor(bits), torch.tensor(QIDS), SPECS, D, 0)
    start = 0
    for n in chunks:
        store.append(torch.randn(2, len(QIDS), n, D, generator=g) * 2, start)
        start += n
    assert len(store.buckets) == len(SPECS)
    assert all(triton_decode.runs(b, "cpu") for b in store.buckets)
    return store


def _written(out: torch.Tensor, done: list[int]) -> None:
    """The heads written so far hold numbers, every other head is untouched (NaN)."""
    rest = [hd for hd in range(out.shape[1]) if hd not in done]
    assert not out[:, done].isnan().any()
    assert out[:, rest].isnan().all()


def _bucket_by_bucket(store, fn, x, out):
    """`fn(bucket, x, out)` for every bucket, checking after each that only the heads done so far are written."""
    done: list[int] = []
    for bucket in store.buckets:
        fn(bucket, x, out)
        done += bucket.head_list
        _written(out, done)
    return out


@pytest.mark.parametrize("shift", range(len(BITS)))
@pytest.mark.parametrize("D,r", [(16, 1), (32, 3)])
def test_scores_match_the_torch_path(shift, D, r, monkeypatch):
    g = torch.Generator().manual_seed(10 * shift + r)
    store = _store("k", D, shift, (48, 32), g)  # 80 keys: whole blocks of 8 and 16, not whole tiles of 64
    q = torch.randn(2, r, len(QIDS), D, generator=g).transpose(1, 2)  # (B, H, r, D), strided
    out = _bucket_by_bucket(store, triton_decode.scores, q, torch.full((2, len(QIDS), r, store.length), float("nan")))
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    torch.testing.assert_close(out, store.scores(q), **TOL)


@pytest.mark.parametrize("shift", range(len(BITS)))
@pytest.mark.parametrize("D,r,programs", [(16, 1, triton_decode.TARGET_PROGRAMS), (32, 3, 1)],
                         ids=["split", "one-split"])
def test_mix_matches_the_torch_path(shift, D, r, programs, monkeypatch):
    # programs=1: one program per head runs every tile (the loop); the default splits the tiles across programs
    monkeypatch.setattr(triton_decode, "TARGET_PROGRAMS", programs)
    g = torch.Generator().manual_seed(10 * shift + r + 5)
    store = _store("v", D, shift, (50, 83), g)  # 133 values: three tiles, the last partly filled
    p = torch.softmax(torch.randn(2, len(QIDS), r, store.length, generator=g) * 3, dim=-1)
    out = _bucket_by_bucket(store, triton_decode.mix, p, torch.full((2, len(QIDS), r, D), float("nan")))
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    torch.testing.assert_close(out, store.mix(p), **TOL)
    for bucket in store.buckets:  # and bucket by bucket against `Bucket.mix`, the torch path itself
        torch.testing.assert_close(bucket.select(out), bucket.mix(bucket.select(p)), **TOL)


def test_mix_is_deterministic():
    g = torch.Generator().manual_seed(3)
    store = _store("v", 16, 0, (200,), g)
    p = torch.softmax(torch.randn(1, len(QIDS), 2, 200, generator=g), dim=-1)
    outs = []
    for _ in range(2):
        out = torch.empty(1, len(QIDS), 2, 16)
        for bucket in store.buckets:
            triton_decode.mix(bucket, p, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_runs_takes_the_families_it_implements(monkeypatch):
    def bucket(spec, role="k", bits=4, D=16):
        return Bucket(bits, spec, [0], role, 1, D)

    for spec in SPECS:
        assert triton_decode.runs(bucket(spec), "cpu")
        assert triton_decode.runs(bucket(spec, "v"), "cpu")
    refused = [parse_spec("minmax-g16-fp16-prerope"), parse_spec("lloydmax-qjl-g16-rhadamard-fp16"),
               QuantSpec(group_size=16, outlier_frac=0.1)]
    for spec in refused:  # pre-RoPE keys without the store's tables, QJL sketches, sparse outliers: the torch path
        assert not triton_decode.runs(bucket(spec), "cpu")
    for sid in PREROPE_SPECS:  # pre-RoPE keys with the tables of a store
        b = bucket(parse_spec(sid))
        assert not triton_decode.runs(b, "cpu")
        b.span = lambda like, start, length: None
        assert triton_decode.runs(b, "cpu")
        assert triton_decode.runs(bucket(parse_spec(sid), "v"), "cpu")  # values are never stored before RoPE
    assert not triton_decode.runs(bucket(SPECS[0], bits=16), "cpu")
    assert not triton_decode.runs(bucket(parse_spec("minmax-g4-fp16"), D=12), "cpu")  # codes in a stream
    assert not triton_decode.runs(bucket(parse_spec("minmax-g8-hadamard-fp16"), D=24), "cpu")  # not 2^n
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    assert not triton_decode.runs(bucket(SPECS[0]), "cpu")
    monkeypatch.delenv("RATEQ_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_decode.runs(bucket(SPECS[0]), "cpu")  # compiled kernels need a CUDA device


# Pre-RoPE keys: one quantizer per head; head 4 shares head 0's bucket.
PREROPE_SPECS = ["minmax-g16-fp16-prerope", "minmax-g16-rhadamard-fp16-prerope", "minmax-g16-hadamard-bf16-prerope",
                 "lloydmax-g16-rhadamard-fp16-prerope"]
PQIDS = [0, 1, 2, 3, 0]


@pytest.fixture(scope="module")
def rotary():
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict = {}

    def make(D):
        if D not in made:
            config = LlamaConfig(hidden_size=2 * D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, head_dim=D, vocab_size=32)
            made[D] = rotary_of(LlamaForCausalLM(config))
        return made[D]
    return make


def _prerope_store(D: int, shift: int, rotary, g: torch.Generator) -> RoleStore:
    """Keys of 5 heads in 4 pre-RoPE buckets, 80 rows in two appends (whole blocks of 16, not whole tiles)."""
    bits = [BITS[(PQIDS[hd] + shift) % len(BITS)] for hd in range(len(PQIDS))]
    store = RoleStore("k", torch.tensor(bits), torch.tensor(PQIDS), [parse_spec(sid) for sid in PREROPE_SPECS], D, 0,
                      rotary(D))
    start = 0
    for n in (48, 32):
        store.append(torch.randn(2, len(PQIDS), n, D, generator=g) * torch.linspace(0.3, 3.0, D), start)
        start += n
    assert len(store.buckets) == len(PREROPE_SPECS)
    assert all(b.prerope and triton_decode.runs(b, "cpu") for b in store.buckets)
    return store


def _kernel_scores(store: RoleStore, q: torch.Tensor) -> torch.Tensor:
    return _bucket_by_bucket(store, triton_decode.scores, q, torch.full((*q.shape[:3], store.length), float("nan")))


@pytest.mark.parametrize("shift", [0, 1, 3])
@pytest.mark.parametrize("D,r,mat", [(16, 1, triton_decode.MAT_ELEMENTS), (32, 4, 512)], ids=["mha", "gqa-chunked"])
def test_prerope_scores_match_the_torch_path(shift, D, r, mat, rotary, monkeypatch):
    # mat=512 at D=32: the unrotation matrices are read 16 rows at a time (two chunks of channels)
    monkeypatch.setattr(triton_decode, "MAT_ELEMENTS", mat)
    g = torch.Generator().manual_seed(100 + 10 * shift + r)
    store = _prerope_store(D, shift, rotary, g)
    q = torch.randn(2, r, len(PQIDS), D, generator=g).transpose(1, 2)  # (B, H, r, D), strided
    got = _kernel_scores(store, q)
    with monkeypatch.context() as m:
        m.setenv("RATEQ_KERNELS", "torch")
        torch.testing.assert_close(got, store.scores(q), **TOL)
    store.keep(32, 80)  # rows now start at position 32: the tables follow the stored rows
    assert all(b.pos0 == 32 for b in store.buckets)
    got = _kernel_scores(store, q)
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    torch.testing.assert_close(got, store.scores(q), **TOL)


def test_prerope_scores_without_shared_tables_use_the_torch_path(rotary, monkeypatch):
    g = torch.Generator().manual_seed(7)
    store = _prerope_store(16, 2, rotary, g)
    store.position_shift = torch.tensor([0, 5])  # rows at different positions: no shared tables
    assert all(b.span(torch.zeros(1), b.pos0, b.length) is None for b in store.buckets)
    assert all(triton_decode.runs(b, "cpu") for b in store.buckets)  # decided when called
    q = torch.randn(2, len(PQIDS), 3, 16, generator=g)
    got = _kernel_scores(store, q)
    monkeypatch.setenv("RATEQ_KERNELS", "torch")
    want = store.scores(q)
    torch.testing.assert_close(got, want, **TOL)
    store.position_shift = None  # and the shift matters: the kernel with shared tables gives other scores
    assert not torch.allclose(store.scores(q), want, **TOL)


# Learned codebooks: codes of b·c bits (2 to 8, straddling bytes at 6) against each head's own centroids.
CODEBOOKS = [("codebook-g1", 3), ("codebook-g2", 1), ("codebook-g2", 3), ("codebook-g2-rhadamard", 4),
             ("codebook-g4", 2), ("codebook-g8", 1), ("codebook-g2-prerope", 2), ("codebook-g4-hadamard-prerope", 1)]


@pytest.mark.parametrize("sid,bits", CODEBOOKS)
@pytest.mark.parametrize("D,r", [(32, 1), (64, 3)])
def test_learned_codebooks_match_the_torch_path(sid, bits, D, r, rotary, codebook_store, monkeypatch):
    spec = parse_spec(sid)
    monkeypatch.setattr(triton_decode, "MAT_ELEMENTS", 1024)  # rotated pre-RoPE keys at D=64: four chunks
    g = torch.Generator().manual_seed(bits + r)
    for role in ("k",) if spec.prerope else ("k", "v"):
        # heads 0 and 2 hold codebooks (a bucket of scattered heads), head 1 a plain grid; 70 tokens end mid-tile
        store = codebook_store(role, spec, bits, 3, D, 70, B=2, rotary=rotary(D) if spec.prerope else None,
                               heads=[0, 2])
        book = next(b for b in store.buckets if b.spec == spec)
        assert triton_decode.runs(book, "cpu") and book.head_list == [0, 2]
        x = torch.randn(2, r, 3, D + 70, generator=g).transpose(1, 2)  # (B, H, r, ·), strided
        if role == "k":
            q = x[..., :D]
            got = torch.full((2, 3, r, 70), float("nan"))
            triton_decode.scores(book, q, got)
            want = book.scores(book.select(q))
        else:
            p = torch.softmax(x[..., D:] * 3, dim=-1)
            got = torch.full((2, 3, r, D), float("nan"))
            triton_decode.mix(book, p, got)
            want = book.mix(book.select(p))
        assert got[:, 1].isnan().all()  # only the bucket's heads are written
        torch.testing.assert_close(got[:, [0, 2]], want, **TOL)


def test_codebook_buckets_the_kernels_take(codebook_store):
    book = next(b for b in codebook_store("v", parse_spec("codebook-g4"), 2, 2, 16, 8).buckets)
    assert triton_decode.runs(book, "cpu")
    held = triton_decode._book(book, "cpu")  # the bound codebooks as they are: no copy per call
    assert held.dtype == torch.float32 and held.shape == (2, 4, 256, 4)
    assert held.data_ptr() == book.codec.param.data_ptr()
    refused = codebook_store("v", parse_spec("codebook-g4"), 1, 2, 16, 8).buckets[0]  # 4 codes a row: a stream
    assert refused.parts["codes"].part.stream and not triton_decode.runs(refused, "cpu")


@pytest.mark.skipif(not cuda_compile.available(), reason="Triton without its CUDA backend")
def test_the_kernels_compile_for_cuda_gpus_within_their_shared_memory():
    """Every family the kernels take at head_dim 128 (Qwen3's, Llama's): keys of plain, Lloyd–Max rotated,
    integer zero-point, per-channel fp8-scaled, pre-RoPE rotated and pre-RoPE codebook buckets (scores), values of
    plain, codebook and Lloyd–Max buckets (mix), 4 queries per KV head; the launches `scores` and `mix` make,
    compiled for sm_86 and sm_90 with Triton's compiler, in a process of its own outside the interpreter."""
    code = textwrap.dedent("""
        import sys, warnings
        warnings.filterwarnings("ignore")
        sys.path.insert(0, sys.argv[1])
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from cuda_compile import SHARED_LIMIT, Recorder, compile_launch
        from rateq import parse_spec, rotary_of
        from rateq.quant.kmeans import learn_unit_codebooks
        from rateq.quant.params import param_key
        from rateq.runtime.kernels import triton_decode as td
        from rateq.runtime.store import RoleStore

        D, T, B, r = 128, 192, 1, 4
        g = torch.Generator().manual_seed(0)
        config = LlamaConfig(hidden_size=2 * D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=D, vocab_size=32)
        rotary = rotary_of(LlamaForCausalLM(config))

        def store(role, sids, bits, prerope=False):  # one head per quantizer
            specs, params = [parse_spec(s) for s in sids], {}
            for spec, b in zip(specs, bits):
                if spec.kind == "codebook":
                    books = learn_unit_codebooks(torch.randn(2, 256, D, generator=g), b, spec.group_size, seed=1)
                    params[param_key(spec, b)] = books.view(1, 1, 2, *books.shape[1:]).expand(
                        1, len(specs), 2, *books.shape[1:]).contiguous()
            st = RoleStore(role, torch.tensor(bits), torch.arange(len(specs)), specs, D, 0,
                           rotary if prerope else None, params=params or None)
            st.append(torch.randn(B, len(specs), T, D, generator=g), 0)
            return st

        real = td._kernels()
        recs = td._state["kernels"] = (Recorder(real[0]), Recorder(real[1]))
        for st in (store("k", ["minmax-g32-fp16", "lloydmax-g16-rhadamard-fp16", "minmax-g16-fp16-zcode",
                               "symmetric-g32-channels-hadamard-fp8"], [2, 3, 4, 1]),
                   store("k", ["minmax-g16-hadamard-bf16-prerope", "codebook-g4-prerope"], [2, 2], prerope=True),
                   store("v", ["minmax-g32-fp16", "codebook-g2", "lloydmax-g16-rhadamard-fp16"], [2, 3, 4])):
            H = len(st.buckets)
            for b in st.buckets:
                assert td.fused_family(b) or td.codebook_family(b), b.spec
                if st.role == "k":
                    td.scores(b, torch.randn(B, H, r, D), torch.empty(B, H, r, T))
                else:
                    td.mix(b, torch.softmax(torch.randn(B, H, r, T), -1), torch.empty(B, H, r, D))
        assert [len(rec.launches) for rec in recs] == [6, 3], [len(rec.launches) for rec in recs]
        for fn, rec in zip(real, recs):
            for grid, args, kwargs in rec.launches:
                for cc in (86, 90):
                    shared = compile_launch(fn, args, kwargs, cc).metadata.shared
                    assert shared <= SHARED_LIMIT[86], (fn.__name__, cc, shared, kwargs)
        print("ok")
    """)
    cuda_compile.run_script(code)
