"""calibrate() on tiny random models: shapes, monotone curves, determinism, inputs, progress, dtypes."""

import pytest
import torch

import rateq
from rateq.calibrate import calibrate_metrics, calibration_ids
from rateq.quant.spec import QuantSpec

SPEC16 = QuantSpec(group_size=16)  # tiny models have head_dim 16
BITS = (1, 2, 3, 4, 5, 6, 8)


def ids(n=2, t=64, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen3", 2), ("llama", 4), ("qwen3", 4), ("gemma3", 2)])
def test_shapes_and_facts(tiny, arch, kv_heads):
    model = tiny(arch, kv_heads=kv_heads)
    curves = rateq.calibrate(model, None, ids(2, 64), metric="output", quantizers=[SPEC16], batch_size=2)
    L, D = model.config.num_hidden_layers, 16
    assert curves.shape == (L, kv_heads, 2, 1, len(BITS))
    assert curves.bits == BITS and curves.metric == "output" and curves.quantizers == [SPEC16]
    assert curves.model == rateq.fingerprint(model)
    cal = curves.calibration
    assert (cal["tokens"], cal["seq_len"], cal["n_samples"], cal["seed"]) == (128, 64, 2, 0)
    assert cal["data"] == "token ids" and cal["metric"] == "output" and cal["dtype"] == "float32"
    assert cal["device"] == "cpu" and cal["seconds"] > 0 and cal["nonmonotone"] == len(curves.nonmonotone())
    assert torch.isfinite(curves.distortion).all() and (curves.distortion > 0).all()
    if arch == "gemma3":  # sliding layers (window 16) hold 16 tokens per head, the full layer all 64
        assert curves.counts[:, 0, 0].tolist() == [16 * D, 64 * D, 16 * D]
    else:
        assert (curves.counts == 64 * D).all()


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen3", 4), ("gemma3", 2)])
def test_curves_fall_with_bits(tiny, arch, kv_heads):
    model = tiny(arch, kv_heads=kv_heads)
    by_metric = calibrate_metrics(model, None, ids(2, 64), metrics=("mse", "score", "output", "fisher"),
                                  quantizers=[SPEC16])
    assert by_metric["mse"].nonmonotone() == []  # raw mse falls with every extra bit
    for m, curves in by_metric.items():
        d = curves.distortion
        assert len(curves.nonmonotone()) <= 0.02 * d.numel(), m
        assert curves.monotone().nonmonotone() == []
        # 8 bits: (1/255)² of the 1-bit error for a uniform grid; far below 1e-3 for every unit and metric.
        assert (d[..., -1] < 1e-3 * d[..., 0]).all(), m
        assert (d[..., 1] < d[..., 0]).all(), m  # 2 bits always beat 1 bit


def test_same_seed_same_curves(tiny):
    model = tiny("llama")
    a = rateq.calibrate(model, None, ids(4, 64).flatten(), n_samples=2, seq_len=64, seed=3, metric="fisher",
                        quantizers=[SPEC16])
    b = rateq.calibrate(model, None, ids(4, 64).flatten(), n_samples=2, seq_len=64, seed=3, metric="fisher",
                        quantizers=[SPEC16])
    c = rateq.calibrate(model, None, ids(4, 64).flatten(), n_samples=2, seq_len=64, seed=4, metric="fisher",
                        quantizers=[SPEC16])
    assert torch.equal(a.distortion, b.distortion)
    assert not torch.equal(a.distortion, c.distortion)  # another seed draws other windows


def test_batch_size_does_not_change_curves(tiny):
    model = tiny("qwen3")
    one = rateq.calibrate(model, None, ids(3, 64), metric="fisher", quantizers=[SPEC16], batch_size=1)
    three = rateq.calibrate(model, None, ids(3, 64), metric="fisher", quantizers=[SPEC16], batch_size=3)
    torch.testing.assert_close(one.distortion, three.distortion, rtol=1e-4, atol=0)


def test_several_quantizers_and_bits(tiny):
    model = tiny("llama")
    specs = [SPEC16, QuantSpec(kind="symmetric", group_size=16)]
    curves = rateq.calibrate(model, None, ids(1, 64), metric="mse", bits=(2, 4, 16), quantizers=specs)
    assert curves.shape == (3, 2, 2, 2, 3)
    assert (curves.distortion[..., 2] < 1e-3 * curves.distortion[..., 1]).all()  # 16 = fp16 storage
    # min-max and symmetric quantizers give different errors
    assert not torch.allclose(curves.distortion[..., 0, :], curves.distortion[..., 1, :])


def test_engine_formats_are_priced_at_their_own_width_only(tiny):
    model = tiny("llama", head_dim=32, hidden_size=128)
    specs = [QuantSpec(group_size=32), "nvfp4", "fp8", "q4_0"]
    curves = rateq.calibrate(model, None, ids(1, 64), metric="mse", bits=(2, 4, 8), quantizers=specs,
                             policy=rateq.CachePolicy(block=32))
    d = curves.distortion
    assert torch.isfinite(d[..., 0, :]).all()  # the grid at every width
    for q, width in ((1, 4), (2, 8), (3, 4)):  # engine formats: finite at their width, absent elsewhere
        for i, b in enumerate(curves.bits):
            assert torch.isfinite(d[..., q, i]).all() == (b == width) and (b == width or torch.isinf(d[..., q, i]).all())
    assert (d[..., 2, 2] < d[..., 1, 1]).all()  # FP8 (8 bits) beats NVFP4 (4.5)
    assert curves.nonmonotone() == [] or all(idx[3] == 0 for idx in curves.nonmonotone())
    assert curves.calibration["nonmonotone"] == len(curves.nonmonotone())


def test_counts_follow_policy_and_sinks(tiny):
    model = tiny("llama")
    base = rateq.calibrate(model, None, ids(1, 64), metric="mse", quantizers=[SPEC16])
    sinks = rateq.calibrate(model, None, ids(1, 64), metric="mse", quantizers=[SPEC16],
                            policy=rateq.CachePolicy(sinks=32, block=32))
    # with 32 sink tokens kept in full precision only half the keys and values are quantized
    assert (sinks.distortion < base.distortion).all()
    assert sinks.calibration["policy"] == {"residual": 0, "block": 32, "sinks": 32}


def test_curves_round_trip(tiny, tmp_path):
    curves = rateq.calibrate(tiny("llama"), None, ids(1, 64), metric="score", quantizers=[SPEC16])
    curves.save(tmp_path / "c.safetensors")
    back = rateq.Curves.load(tmp_path / "c.safetensors")
    assert torch.equal(back.distortion, curves.distortion) and back.calibration == curves.calibration


def test_progress_events_and_bar(tiny, capsys):
    model = tiny("llama")
    events = []
    rateq.calibrate(model, None, ids(3, 64), metric="mse", quantizers=[SPEC16], progress=events.append)
    batches = [e for e in events if e["event"] == "batch"]
    assert events[0]["event"] == "start" and [e["tokens"] for e in batches] == [64, 128, 192]
    assert all(e["total"] == 192 for e in batches)
    rateq.calibrate(model, None, ids(1, 64), metric="mse", quantizers=[SPEC16], progress=True)
    assert "tok/s" in capsys.readouterr().err


def test_bf16_model(tiny):
    model = tiny("llama")
    ref = rateq.calibrate(model, None, ids(2, 64), metric="output", quantizers=[SPEC16], query_stride=1)
    low = rateq.calibrate(model.to(torch.bfloat16), None, ids(2, 64), metric="output", quantizers=[SPEC16],
                          query_stride=1)
    assert low.calibration["dtype"] == "bfloat16" and low.distortion.dtype == torch.float64
    # at 1–3 bits quantization error dominates bf16 rounding: the same curves within a few percent
    torch.testing.assert_close(low.distortion[..., :3], ref.distortion[..., :3], rtol=0.1, atol=0)


class ByteTokenizer:
    """Stands in for a tokenizer: one token per byte."""

    def __call__(self, text, **kw):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))])}


def test_text_inputs():
    tok = ByteTokenizer()
    got, name = calibration_ids(tok, "austen-emma", 3, 50, seed=1)
    assert got.shape == (3, 50) and name == "austen-emma"
    again, _ = calibration_ids(tok, "austen-emma", 3, 50, seed=1)
    assert torch.equal(got, again)
    raw, name = calibration_ids(tok, "a few words " * 20, 2, 16)
    assert raw.shape == (2, 16) and name.startswith("text (")
    many, name = calibration_ids(tok, ["first text " * 5, "second text " * 5], 2, 16)
    assert many.shape == (2, 16) and name == "2 texts"
    given, name = calibration_ids(None, ids(4, 32), 2, 16)
    assert torch.equal(given, ids(4, 32)[:2, :16]) and name == "token ids"


@pytest.mark.parametrize("kwargs,match", [
    (dict(texts="austen-emmma"), "unknown text"),
    (dict(texts="some words here"), "tokenizer"),
    (dict(texts=torch.zeros(2, 8, dtype=torch.long), seq_len=16), "asked for"),
    (dict(metric="kl"), "unknown metric"),
    (dict(bits=(4, 2)), "increasing"),
    (dict(bits=(0, 2)), "1..8"),
    (dict(quantizers=[QuantSpec()]), "head_dim 16"),
    (dict(quantizers=[SPEC16], policy=rateq.CachePolicy(block=24)), "block 24"),
    (dict(batch_size=0), "batch_size"),
])
def test_user_errors(tiny, kwargs, match):
    model = tiny("llama")
    kw = dict(texts=ids(1, 64), quantizers=[SPEC16])
    kw.update(kwargs)
    with pytest.raises(rateq.RateQError, match=match):
        rateq.calibrate(model, None, kw.pop("texts"), **kw)


def test_reference_plan_for_another_model(tiny):
    model = tiny("llama")
    other = rateq.Plan.uniform(rateq.fingerprint(tiny("llama", kv_heads=4)), 2, spec=SPEC16)
    with pytest.raises(rateq.RateQError, match="num_kv_heads"):
        rateq.calibrate(model, None, ids(1, 64), quantizers=[SPEC16], reference=other)


def test_low_precision_matmuls_keep_the_curves(tiny):
    # The GPU path: candidate deltas through bf16 matmuls. Rounding is relative to the quantization error, so even
    # the 8-bit points stay within a few percent of the fp32 computation.
    model = tiny("qwen3", kv_heads=2)
    metrics = ("score", "output", "fisher")
    ref = calibrate_metrics(model, None, ids(2, 64), metrics=metrics, quantizers=[SPEC16])
    low = calibrate_metrics(model, None, ids(2, 64), metrics=metrics, quantizers=[SPEC16],
                            matmul_dtype=torch.bfloat16)
    assert low["output"].calibration["matmul_dtype"] == "bfloat16"
    for m in metrics:
        torch.testing.assert_close(low[m].distortion, ref[m].distortion, rtol=0.03, atol=0)


def test_query_stride_estimates_the_full_sums(tiny):
    # Every 4th query row, scaled by 4: an unbiased estimate of the sums over every row, close on 2 × 256 tokens
    # and ranking the units' points like the full sums; every row at stride 1.
    from scipy.stats import spearmanr

    model = tiny("llama", kv_heads=2)
    metrics = ("score", "output", "fisher")
    full = calibrate_metrics(model, None, ids(2, 256), metrics=metrics, quantizers=[SPEC16], query_stride=1)
    part = calibrate_metrics(model, None, ids(2, 256), metrics=metrics, quantizers=[SPEC16], query_stride=4)
    assert full["fisher"].calibration["query_stride"] == 1 and part["fisher"].calibration["query_stride"] == 4
    for m in metrics:
        a, b = full[m].distortion.flatten(), part[m].distortion.flatten()
        assert not torch.equal(a, b)
        assert float((b / a).log().abs().median()) < 0.15, m
        assert spearmanr(a.numpy(), b.numpy()).correlation > 0.97, m
    # mse prices every stored position whatever the stride
    mse = [calibrate_metrics(model, None, ids(1, 64), metrics=("mse",), quantizers=[SPEC16], query_stride=s)
           for s in (1, 4)]
    assert torch.equal(mse[0]["mse"].distortion, mse[1]["mse"].distortion)


@pytest.mark.parametrize("stride", [0, -1, 1.5, True])
def test_query_stride_must_be_a_positive_whole_number(tiny, stride):
    with pytest.raises(rateq.RateQError, match="query_stride"):
        rateq.calibrate(tiny("llama"), None, ids(1, 64), quantizers=[SPEC16], query_stride=stride)


def test_candidates_storing_a_role_alike_are_scored_once_and_priced_alike(tiny):
    # Pre-RoPE quantizers store values as their post-RoPE twins do: one scoring, the same value curves; keys differ.
    from rateq.calibrate.capture import role_columns

    pre, post = QuantSpec(group_size=16, prerope=True), SPEC16
    cols = role_columns(BITS, [pre, post], "v", 16)
    assert [c[2] for c in cols] == [[b, len(BITS) + b] for b in range(len(BITS))]
    assert len(role_columns(BITS, [pre, post], "k", 16)) == 2 * len(BITS)
    curves = rateq.calibrate(tiny("llama", kv_heads=2), None, ids(1, 64), quantizers=[pre, post])
    d = curves.distortion
    assert torch.equal(d[:, :, 1, 0], d[:, :, 1, 1])
    assert not torch.equal(d[:, :, 0, 0], d[:, :, 0, 1])


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_scoring_a_layer_reads_nothing_back_from_the_device(tiny, arch):
    # On a GPU a read-back (an item, a nonzero, a truth value) waits for every queued kernel: the layers' scoring
    # takes none (chunk bounds come from the mask's CPU copy), so the reads of a calibration (the loss per batch,
    # the curves' check at the end, the model's own mask making) do not grow with the layers or the chunks of rows.
    from dispatch_count import Dispatched  # tests/dispatch_count.py

    found = []
    for layers in (2, 4):
        kinds = ["sliding_attention", "full_attention"] * (layers // 2)  # gemma3: sliding-window layers too
        model = tiny(arch, kv_heads=2, num_hidden_layers=layers, **({"layer_types": kinds} if arch == "gemma3" else {}))
        with Dispatched() as d:  # 2 × 96 tokens in batches of 2, every 2nd row scored in chunks of 8: 6 per layer
            calibrate_metrics(model, None, ids(2, 96), metrics=("fisher",), quantizers=[SPEC16, QuantSpec(
                group_size=16, prerope=True)], batch_size=2, query_stride=2, chunk_elements=8 * 4 * 14 * 96)
        found.append(d.read_backs)
    assert found[0] == found[1] <= 4, found
