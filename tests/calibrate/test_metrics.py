"""Each metric equals a direct recomputation from the layer's weights, with explicit torch math and no hook."""

import pytest
import torch

import rateq
from rateq.calibrate import calibrate_metrics
from rateq.calibrate.metrics import allowed_pairs, row_blocks
from rateq.quant import fake_quantize
from rateq.quant.spec import QuantSpec

SPEC16 = QuantSpec(group_size=16)
BITS = (1, 2, 3, 4, 6, 8)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def explicit_qkv(model, ids, layer):
    """Post-RoPE q (B, Hq, T, D), k, v (B, Hkv, T, D) of `layer`, from its input hidden state and weights."""
    with torch.no_grad():
        h = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer]  # input of `layer`
        block = model.model.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        B, T, _ = x.shape
        D = attn.head_dim
        q = attn.q_proj(x).view(B, T, -1, D)
        k = attn.k_proj(x).view(B, T, -1, D)
        v = attn.v_proj(x).view(B, T, -1, D)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(T)[None])  # (1, T, D)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return q, k, v, attn.scaling


def head_attention(q, k, v, scaling):
    """(B, T, D) query of one head against (B, T, D) keys/values, causal."""
    T = q.shape[1]
    s = q @ k.transpose(-1, -2) * scaling
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def unit_output_errors(q, k, v, scaling, head, role, bits):
    """`(B, Hq_group, T, D)` output error of KV head `head`'s query heads with only (head, role) quantized."""
    groups = q.shape[1] // k.shape[1]
    x = k if role == "k" else v
    xq = fake_quantize(x[:, head:head + 1], bits, SPEC16, role)[:, 0]  # T is a whole number of key blocks
    errs = []
    for qh in range(head * groups, (head + 1) * groups):
        ref = head_attention(q[:, qh], k[:, head], v[:, head], scaling)
        got = head_attention(q[:, qh], xq if role == "k" else k[:, head], xq if role == "v" else v[:, head], scaling)
        errs.append(got - ref)
    return torch.stack(errs, 1)


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen3", 4)])
def test_output_metric_is_the_heads_attention_error(tiny, arch, kv_heads):
    model = tiny(arch, kv_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    curves = rateq.calibrate(model, None, ids, metric="output", bits=BITS, quantizers=[SPEC16], batch_size=2,
                             query_stride=1)
    layer = 1
    q, k, v, scaling = explicit_qkv(model, ids, layer)
    for head in range(kv_heads):
        for r, role in enumerate(("k", "v")):
            want = torch.tensor([float(unit_output_errors(q, k, v, scaling, head, role, b).double().pow(2).sum())
                                 for b in BITS], dtype=torch.float64)
            torch.testing.assert_close(curves.distortion[layer, head, r, 0], want, rtol=2e-3, atol=1e-9)


def test_mse_and_score_metrics_by_hand(tiny):
    model = tiny("llama", kv_heads=2)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    by = calibrate_metrics(model, None, ids, metrics=("mse", "score"), bits=BITS, quantizers=[SPEC16],
                            query_stride=1)
    layer, head = 2, 1
    q, k, v, scaling = explicit_qkv(model, ids, layer)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    for i, b in enumerate(BITS):
        dk = k[:, head] - fake_quantize(k[:, head:head + 1], b, SPEC16, "k")[:, 0]  # (B, T, D)
        dv = v[:, head] - fake_quantize(v[:, head:head + 1], b, SPEC16, "v")[:, 0]
        assert by["mse"].distortion[layer, head, 0, 0, i] == pytest.approx(float(dk.double().pow(2).sum()), rel=1e-4)
        assert by["mse"].distortion[layer, head, 1, 0, i] == pytest.approx(float(dv.double().pow(2).sum()), rel=1e-4)
        score = values = 0.0
        for qh in (2, 3):  # the query heads reading KV head 1
            ds = (q[:, qh] @ dk.transpose(-1, -2)) * scaling  # (B, T, T)
            score += float((ds.double().pow(2) * causal).sum())
            s = (q[:, qh] @ k[:, head].transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf"))
            a = torch.softmax(s, -1)  # HeadQ: value error weighted by attention²
            values += float((a.double().pow(2).sum(1) * dv.double().pow(2).sum(-1)).sum())
        assert by["score"].distortion[layer, head, 0, 0, i] == pytest.approx(score, rel=1e-3)
        assert by["score"].distortion[layer, head, 1, 0, i] == pytest.approx(values, rel=1e-3)


@pytest.mark.parametrize("kv_heads", [2, 4])  # 4: one query head per KV head, where gradients reach the metric as views
def test_fisher_metric_is_gradient_weighted_output_error(tiny, kv_heads):
    model = tiny("qwen3", kv_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    curves = rateq.calibrate(model, None, ids, metric="fisher", bits=BITS, quantizers=[SPEC16], batch_size=2,
                             query_stride=1)
    layer, H, groups = 0, kv_heads, 4 // kv_heads
    # g = ∂(summed next-token NLL)/∂(attention output), read at the input of o_proj by a plain module hook.
    seen = {}

    def grab(module, args):
        args[0].retain_grad()
        seen["out"] = args[0]

    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(grab)
    try:
        logits = model(ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    g = seen["out"].grad.view(2, 64, 4, 16).transpose(1, 2)  # (B, Hq, T, D)
    q, k, v, scaling = explicit_qkv(model, ids, layer)
    for head in range(H):
        for r, role in enumerate(("k", "v")):
            want = [float((unit_output_errors(q, k, v, scaling, head, role, b).double().pow(2)
                           * g[:, groups * head:groups * (head + 1)].double().pow(2)).sum()) for b in BITS]
            torch.testing.assert_close(curves.distortion[layer, head, r, 0], torch.tensor(want, dtype=torch.float64),
                                       rtol=5e-3, atol=1e-12)
    assert curves.calibration["nll"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).detach()), rel=1e-5)


def test_reference_plan_runs_the_model_as_the_plan_stores_it(tiny):
    model = tiny("llama", kv_heads=2)
    fp = rateq.fingerprint(model)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4))
    plain = rateq.calibrate(model, None, ids, metric="fisher", bits=BITS, quantizers=[SPEC16])
    # A 16-bit reference (fp16 storage) is the full-precision model up to fp16 rounding: the same curves.
    fp16 = rateq.calibrate(model, None, ids, metric="fisher", bits=BITS, quantizers=[SPEC16],
                           reference=rateq.Plan.uniform(fp, 16, spec=SPEC16))
    torch.testing.assert_close(fp16.distortion[..., :2], plain.distortion[..., :2], rtol=2e-2, atol=0)
    # Around K2V2 the forward is the one-pass fake-quant model: same NLL as simulate_plan on the same ids.
    k2v2 = rateq.Plan.uniform(fp, 2, spec=SPEC16)
    around = rateq.calibrate(model, None, ids, metric="fisher", bits=BITS, quantizers=[SPEC16], reference=k2v2)
    with torch.no_grad(), rateq.simulate_plan(model, k2v2):
        logits = model(ids, use_cache=False).logits
    want = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    assert around.calibration["nll"] == pytest.approx(want, rel=1e-4)
    assert around.calibration["nll"] != pytest.approx(plain.calibration["nll"], rel=1e-6)
    assert around.calibration["reference"]["nominal_bits"] == 2.0
    assert not torch.allclose(around.distortion, plain.distortion, rtol=1e-2)


def _masks(T):
    causal = allowed_pairs(None, T, T, 1)[0]
    window = causal & ~causal.tril(-6)  # each query sees itself and the 5 keys before it
    padded = causal.clone()
    padded[:, :4] = False  # left padding: the first 4 rows attend nothing
    packed = causal.clone()
    packed[T // 2:, :T // 2] = False  # two documents in one row
    holes = causal & (torch.rand(T, T, generator=torch.Generator().manual_seed(T)) > 0.3)  # not a band at all
    return {"causal": causal, "window": window, "padded": padded, "packed": packed, "holes": holes}


@pytest.mark.parametrize("rows", [1, 5, 8, 64])
@pytest.mark.parametrize("mask", ["causal", "window", "padded", "packed", "holes"])
def test_row_blocks_bound_each_block_as_its_rows_do(mask, rows):
    ok = _masks(37)[mask][::2]  # every other query row, as a query stride samples them
    blocks = row_blocks(ok, rows)
    starts = [b[0] for b in blocks]
    for r0 in range(0, ok.shape[0], rows):  # a block is listed when, and only when, its rows see some key
        r1 = min(ok.shape[0], r0 + rows)
        block = ok[r0:r1]
        cols = block.any(0).nonzero().flatten()
        if not cols.numel():
            assert r0 not in starts
            continue
        _, r1_, ks, ke, m0, m1, live = blocks[starts.index(r0)]
        assert (r1_, ks, ke) == (r1, int(cols[0]), int(cols[-1]) + 1)
        banned = (~block[:, ks:ke]).any(0).nonzero().flatten()  # where some row of the block may not attend
        assert (m0, m1) == ((int(banned[0]), int(banned[-1]) + 1) if banned.numel() else (0, 0))
        assert live == bool(block.any(-1).all())


@pytest.mark.parametrize("mask", ["causal", "window", "padded", "packed"])
def test_the_chunking_of_query_rows_changes_no_sum(mask):
    # A GPU cuts a sequence's rows into 4 chunks, a CPU into 16 (scoring_defaults): each chunk reads only the band
    # of keys its rows see, so every cut gives the same sums, up to the order fp32 adds them in.
    from rateq.calibrate.metrics import LayerInputs, candidate_errors

    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, T, D = 2, 4, 2, 300, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    noise = torch.tensor([0.3, 0.03]).view(-1, 1, 1, 1, 1)
    k_hat, v_hat = (x[None] + noise * torch.randn(2, B, Hkv, T, D, generator=g) for x in (k, v))
    inp = LayerInputs(q, k, v, _masks(T)[mask][None].repeat(B, 1, 1), D ** -0.5)
    grad = torch.randn(B, T, Hq, D, generator=g)
    metrics = ("score", "output", "fisher")

    def sums(split, chunk_elements=1 << 30):  # 150 sampled rows per sequence
        return candidate_errors(inp, k_hat, v_hat, metrics, grad=grad, query_stride=2, row_split=split,
                                chunk_elements=chunk_elements)

    whole = sums(1)
    for other in (sums(4), sums(16), sums(1, chunk_elements=Hq * 2 * T)):  # 4 and 5 chunks; a row per chunk
        for m in metrics:
            for r in range(2):
                assert (whole[m][r] > 0).all()
                torch.testing.assert_close(other[m][r], whole[m][r], rtol=1e-5, atol=0)
