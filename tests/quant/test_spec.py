import pytest

from rateq import KIVI, QuantSpec, RateQError, parse_spec


def test_kivi_costs_one_bit_of_metadata():
    # fp16 scale + fp16 zero per group of 32 = 32 bits / 32 elements — metadata as expensive as a whole code bit
    assert KIVI.bits_per_element(2) == 3.0
    assert QuantSpec(group_size=64).bits_per_element(2) == 2.5
    assert QuantSpec(kind="symmetric").bits_per_element(4) == 4.5
    assert QuantSpec(zero="code", group_size=64).bits_per_element(2) == 2 + 18 / 64
    assert QuantSpec(scale_dtype="fp8", zero="code", group_size=32).bits_per_element(3) == 3 + 11 / 32
    assert KIVI.bits_per_element(16) == 16.0


@pytest.mark.parametrize("spec", [KIVI, QuantSpec(kind="symmetric", group_size=64, scale_dtype="bf16"),
                                  QuantSpec(zero="code", group_along="tokens")])
def test_id_parses_back(spec):
    assert parse_spec(spec.id) == spec
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert parse_spec(spec.to_json()) == spec


def test_axis_for_roles():
    assert KIVI.axis_for("k") == "tokens" and KIVI.axis_for("v") == "channels"
    assert QuantSpec(group_along="channels").axis_for("k") == "channels"


@pytest.mark.parametrize("kw", [dict(kind="nf4"), dict(group_size=0), dict(scale_dtype="fp64"), dict(zero="int")])
def test_invalid_specs(kw):
    with pytest.raises(RateQError):
        QuantSpec(**kw)


def test_bad_bits_and_parse():
    with pytest.raises(RateQError):
        KIVI.bits_per_element(9)
    with pytest.raises(RateQError):
        parse_spec("minmax-q7")
