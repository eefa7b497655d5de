"""down_proj's column weights estimated from gate and up (zse_convert/importance.py): the formula
against an independent computation, and how the converter records and applies them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_convert import _expected, _source_tensors, down_proj_column_weight_of
from tests.test_quantize import reference_quantize
from zse_convert.convert import ConvertOptions, convert
from zse_convert.importance import down_proj_column_weight, mean_square_silu, scaled_row_energy
from zse_runtime.zsefile import ZseFile


def _mean_square_silu_by_trapezoid(std: float) -> float:
    """E[silu(std * z)^2], z ~ N(0, 1), on a dense grid (independent of the quadrature)."""
    z = np.linspace(-14.0, 14.0, 200_001)
    g = std * z
    density = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf where silu is 0 anyway
        return float(np.trapezoid((g / (1 + np.exp(-g))) ** 2 * density, z))


def test_mean_square_silu_matches_the_integral():
    stds = np.array([0.0, 1e-3, 0.3, 1.0, 2.5, 7.0, 15.0, 40.0])
    got = mean_square_silu(stds)
    want = np.array([_mean_square_silu_by_trapezoid(s) for s in stds])
    # the quadrature's error is largest where silu's kink is a few nodes wide (std ~ 7-15)
    np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-30)
    # the limits that make it a sensible weight: ~std^2/4 when small, ~std^2/2 when large
    assert got[1] == pytest.approx(1e-6 / 4, rel=1e-3)
    assert got[-1] == pytest.approx(40.0 ** 2 / 2, rel=1e-2)


def test_column_weight_is_the_estimate_of_each_inputs_mean_square():
    rng = np.random.default_rng(3)
    gate = (rng.standard_normal((40, 24)) * np.linspace(0.01, 1.5, 40)[:, None]).astype(np.float32)
    up = (rng.standard_normal((40, 24)) * rng.uniform(0.1, 2.0, 40)[:, None]).astype(np.float32)
    gamma = rng.uniform(0.2, 3.0, 24).astype(np.float32)
    energy_gate = scaled_row_energy(gate, gamma)
    # float64 sums in column order: a row's energy is the same in any chunk of rows
    np.testing.assert_array_equal(np.concatenate([scaled_row_energy(gate[:7], gamma),
                                                  scaled_row_energy(gate[7:], gamma)]),
                                  energy_gate)
    got = down_proj_column_weight(energy_gate, scaled_row_energy(up, gamma))

    gate, up, gamma = (x.astype(np.float64) for x in (gate, up, gamma))
    energy_gate = ((gate * gamma) ** 2).sum(1)
    energy_up = ((up * gamma) ** 2).sum(1)
    want = np.array([_mean_square_silu_by_trapezoid(np.sqrt(e)) for e in energy_gate]) * energy_up
    want = np.maximum(want / want.mean(), 1e-4)  # mean 1, every column at least the floor
    assert want[0] == 1e-4 < want[1]  # the first gate row is tiny: its column gets the floor
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_column_weight_of_a_zero_layer_and_of_dead_columns():
    np.testing.assert_array_equal(down_proj_column_weight(np.zeros(8), np.zeros(8)), np.ones(8))
    energy_up = np.ones(8)
    energy_up[3] = 0.0  # column 3 of down_proj never sees an input: weighted at the floor
    got = down_proj_column_weight(np.ones(8), energy_up)
    assert got[3] == 1e-4 and np.allclose(np.delete(got, 3), got[0])


def test_no_column_weights_quantizes_down_proj_like_every_other_kind(tiny_qwen2, tiny_qwen2_zse,
                                                                    tmp_path):
    out = tmp_path / "plain.zse"
    result = run_cli(str(tiny_qwen2), "--out", str(out), "--no-column-weights", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["search_column_weights"] == {}
    src = _source_tensors(tiny_qwen2)
    with ZseFile(out) as plain, ZseFile(tiny_qwen2_zse) as weighted:
        assert plain.manifest["quantization"]["search_column_weights"] == {}
        assert weighted.manifest["quantization"]["search_column_weights"] == {
            "down_proj": "gate_up_estimate"}
        for name in ("layers.0.down_proj", "layers.1.down_proj"):
            w = _expected(name, src)
            group = plain.tensors[name].group_size
            _, scales, _, _, _ = reference_quantize(w, group)
            np.testing.assert_array_equal(plain.int4(name).scales, scales)
            column_weight = down_proj_column_weight_of(name, src)
            _, scales, _, _, _ = reference_quantize(w, group, column_weight=column_weight)
            np.testing.assert_array_equal(weighted.int4(name).scales, scales)
            # the estimate moved some groups: the option is not a no-op on this checkpoint
            assert not np.array_equal(plain.int4(name).scales, weighted.int4(name).scales)
        for name in ("layers.0.qkv", "layers.1.gate_up", "layers.1.o_proj"):  # unweighted kinds
            assert np.array_equal(plain.int4(name).qweight, weighted.int4(name).qweight)


@pytest.mark.parametrize("options", [dict(clip_search=False), dict(awq=True)])
def test_other_methods_record_no_column_weights(options, tiny_qwen2, tmp_path):
    """Round-to-nearest has no search to weight; AWQ and GPTQ weight by calibration inputs."""
    out = tmp_path / "other.zse"
    summary = convert(str(tiny_qwen2), out, ConvertOptions(calibration_tokens=512, **options))
    assert summary["search_column_weights"] == {}
    with ZseFile(out) as zse:
        assert zse.manifest["quantization"]["search_column_weights"] == {}
