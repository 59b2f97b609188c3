"""Tests of :mod:`scgpt_protocol.model.binning` against the official scGPT binning.

The fixture ``tests/fixtures/scgpt_official_tiny/reference.npz`` holds outputs of the official code:
``binning_input``/``binning_output`` (no ties, deterministic) and ``tied_input`` with the official
range ``tied_low``/``tied_high`` of every value and one official draw ``tied_official_sample``.

In the fixture, ``tied_low`` is ``right`` (number of edges < x) and ``tied_high`` is ``left``
(number of edges <= x); the official draw ``ceil(u * (right - left) + left)`` lies in
``tied_low + 1 .. tied_high`` when ``tied_high > tied_low`` and equals ``tied_high`` otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import chisquare

from scgpt_protocol.core.errors import InputDataError
from scgpt_protocol.model.binning import bin_nonzero, bin_values

FIXTURE = Path(__file__).parent / "fixtures" / "scgpt_official_tiny" / "reference.npz"
N_BINS = 51
#: family-wise significance level of the uniformity checks (Bonferroni over the tied groups)
FAMILY_ALPHA = 1e-3
#: draws of the tied rows for the statistical test (one seeded Generator)
N_DRAWS = 1200
STAT_SEED = 20240607


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _official_binning(row: np.ndarray, n_bins: int, uniforms: np.ndarray) -> np.ndarray:
    """The official scGPT per-row binning, transcribed, with the uniforms supplied."""
    out = np.zeros_like(row, dtype=np.int64)
    if row.max() == 0:
        return out
    nz_ids = row.nonzero()
    nz = row[nz_ids]
    bins = np.quantile(nz, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(nz, bins)
    right = np.digitize(nz, bins, right=True)
    assert uniforms.shape == nz.shape
    out[nz_ids] = np.ceil(uniforms * (right - left) + left).astype(np.int64)
    return out


# --------------------------------------------------------------------------------------------
# exact parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_distinct_values_reproduce_official_output_exactly(ref, seed):
    out = bin_values(ref["binning_input"], n_bins=N_BINS, rng=seed)
    assert out.dtype == np.float32
    assert out.shape == ref["binning_input"].shape
    np.testing.assert_array_equal(out, ref["binning_output"])


def test_distinct_values_row_by_row_and_nonzero_path(ref):
    x = ref["binning_input"]
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(bin_values(x[i], rng=i), ref["binning_output"][i])
        nz = x[i][x[i] != 0]
        np.testing.assert_array_equal(
            bin_nonzero(nz, rng=i), ref["binning_output"][i][x[i] != 0]
        )


def test_same_uniforms_as_official_code_give_identical_bins(ref):
    """With the uniforms the official code would draw, the bins are identical, tied or not."""
    seed = 7
    ours = bin_values(ref["tied_input"], n_bins=N_BINS, rng=seed)
    gen = np.random.default_rng(seed)
    for i, row in enumerate(ref["tied_input"]):
        u = gen.random(int(np.count_nonzero(row)))
        np.testing.assert_array_equal(ours[i], _official_binning(row, N_BINS, u))


def test_fixture_ranges_are_what_this_module_computes(ref):
    """Sanity of the fixture reading: tied_low = #edges < x, tied_high = #edges <= x."""
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    for i, row in enumerate(x):
        nz = row != 0
        edges = np.quantile(row[nz], np.linspace(0, 1, N_BINS - 1))
        np.testing.assert_array_equal(np.digitize(row[nz], edges), hi[i][nz])
        np.testing.assert_array_equal(np.digitize(row[nz], edges, right=True), lo[i][nz])
    assert np.all(lo[x == 0] == 0) and np.all(hi[x == 0] == 0)
    # tied values exist in every row, and with a range of several bins
    assert np.all(((hi - lo) >= 2).any(axis=1))


def test_official_sample_lies_in_fixture_range(ref):
    s, lo, hi, x = (ref[k] for k in ("tied_official_sample", "tied_low", "tied_high", "tied_input"))
    assert np.all((s >= lo) & (s <= hi))
    wide = (x != 0) & (hi > lo)
    assert np.all(s[wide] >= lo[wide] + 1)  # the official low bound is exclusive
    assert np.all(s[x == 0] == 0)


# --------------------------------------------------------------------------------------------
# ranges and determinism on tied data
# --------------------------------------------------------------------------------------------


def test_tied_values_stay_in_official_range_for_many_seeds(ref):
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    nz = x != 0
    wide = nz & (hi > lo)
    narrow = nz & (hi - lo <= 1)  # between edges or on exactly one edge: deterministic
    for seed in range(50):
        out = bin_values(x, n_bins=N_BINS, rng=seed)
        assert np.all((out >= lo) & (out <= hi))
        assert np.all(out[wide] >= lo[wide] + 1)
        np.testing.assert_array_equal(out[narrow], hi[narrow])
        assert np.all(out[~nz] == 0)
        assert out[nz].min() >= 1 and out.max() <= N_BINS - 1


def test_same_seed_same_output_and_generator_is_advanced(ref):
    x = ref["tied_input"]
    a = bin_values(x, rng=123)
    b = bin_values(x, rng=123)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(bin_values(x, rng=np.random.default_rng(123)), a)
    gen = np.random.default_rng(123)
    first = bin_values(x, rng=gen)
    second = bin_values(x, rng=gen)  # the Generator moved on
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)


def test_different_seeds_differ_on_tied_rows(ref):
    x = ref["tied_input"]
    outs = [bin_values(x, rng=seed) for seed in range(5)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.array_equal(outs[i], outs[j])
    # and on every single tied row
    for r in range(x.shape[0]):
        assert not np.array_equal(outs[0][r], outs[1][r])


def test_rng_none_gives_valid_bins(ref):
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    out = bin_values(x)
    assert np.all((out >= lo) & (out <= hi))


def test_2d_equals_rows_one_by_one_with_a_shared_generator(ref):
    """Documented semantics: one Generator, rows in order, one draw per non-zero value."""
    x = ref["tied_input"].copy()
    x[3] = 0.0  # an all-zero row consumes no draw
    out2d = bin_values(x, rng=99)
    gen = np.random.default_rng(99)
    rows = np.stack([bin_values(row, rng=gen) for row in x])
    np.testing.assert_array_equal(out2d, rows)
    assert np.all(out2d[3] == 0)


def test_csr_row_data_fast_path_equals_dense(ref):
    x = ref["tied_input"]
    csr = sp.csr_matrix(x)
    dense = bin_values(x, rng=5)
    gen = np.random.default_rng(5)
    for i in range(x.shape[0]):
        start, stop = csr.indptr[i], csr.indptr[i + 1]
        got = bin_nonzero(csr.data[start:stop], rng=gen)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, dense[i, csr.indices[start:stop]])


def test_explicit_zeros_in_csr_data_are_zero_and_consume_no_draw(ref):
    row = ref["tied_input"][0]
    nz = row[row != 0]
    with_zeros = np.insert(nz, [0, 5, len(nz)], 0.0)
    a = bin_nonzero(nz, rng=3)
    b = bin_nonzero(with_zeros, rng=3)
    assert np.all(b[[0, 6, len(b) - 1]] == 0)
    np.testing.assert_array_equal(np.delete(b, [0, 6, len(b) - 1]), a)


def test_rows_without_zeros_use_the_same_formula():
    gen = np.random.default_rng(0)
    row = gen.integers(1, 6, size=400).astype(np.float64)  # no zeros, many ties
    out = bin_values(row, rng=11)
    u = np.random.default_rng(11).random(row.size)
    np.testing.assert_array_equal(out, _official_binning(row, N_BINS, u))


# --------------------------------------------------------------------------------------------
# small cases, dtypes, n_bins
# --------------------------------------------------------------------------------------------


def test_all_zero_and_empty_inputs():
    np.testing.assert_array_equal(bin_values(np.zeros(10)), np.zeros(10, dtype=np.float32))
    out = bin_values(np.zeros((3, 4)), rng=0)
    assert out.dtype == np.float32 and out.shape == (3, 4) and not out.any()
    assert bin_values(np.zeros(0)).shape == (0,)
    assert bin_values(np.zeros((0, 5))).shape == (0, 5)
    assert bin_nonzero(np.zeros(0)).shape == (0,)


def test_single_nonzero_value_and_constant_row():
    # one value equals every edge: bin uniform over 1..n_bins-1
    out = bin_values(np.array([0.0, 3.0, 0.0]), n_bins=5, rng=0)
    assert out[0] == 0 and out[2] == 0 and 1 <= out[1] <= 4
    draws = np.array([bin_nonzero(np.array([2.0]), n_bins=5, rng=s)[0] for s in range(200)])
    assert set(draws.tolist()) == {1.0, 2.0, 3.0, 4.0}


@pytest.mark.parametrize("n_bins", [3, 11, 51, 101])
def test_bins_span_one_to_n_bins_minus_one(n_bins):
    gen = np.random.default_rng(n_bins)
    x = gen.lognormal(size=(4, 500)) * (gen.random((4, 500)) < 0.6)
    out = bin_values(x, n_bins=n_bins, rng=0)
    nz = x != 0
    assert np.all(out[~nz] == 0)
    assert out[nz].min() == 1 and out.max() == n_bins - 1
    # distinct values: bins are monotone in the value within a row
    for r in range(4):
        v, b = x[r][nz[r]], out[r][nz[r]]
        order = np.argsort(v)
        assert np.all(np.diff(b[order]) >= 0)


def test_integer_and_float32_inputs():
    gen = np.random.default_rng(0)
    counts = gen.poisson(2.0, size=(3, 200))
    np.testing.assert_array_equal(
        bin_values(counts, rng=1), bin_values(counts.astype(np.float64), rng=1)
    )
    logged = np.log1p(counts).astype(np.float32)
    out = bin_values(logged, rng=1)
    assert out.dtype == np.float32
    gen1 = np.random.default_rng(1)
    for r in range(3):
        u = gen1.random(int(np.count_nonzero(logged[r])))
        np.testing.assert_array_equal(out[r], _official_binning(logged[r], N_BINS, u))


def test_input_is_not_modified(ref):
    x = ref["tied_input"].copy()
    bin_values(x, rng=0)
    bin_nonzero(x[0][x[0] > 0], rng=0)
    np.testing.assert_array_equal(x, ref["tied_input"])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_nan_values_are_reported_with_count_and_positions():
    x = np.array([1.0, np.nan, 2.0, np.nan, 0.0])
    with pytest.raises(InputDataError, match=r"2 NaN value\(s\) at position\(s\) \[1, 3\]"):
        bin_values(x)
    with pytest.raises(InputDataError, match=r"non-negative expression"):
        bin_nonzero(x)


def test_negative_values_are_reported_with_count_positions_and_fix():
    x = np.zeros((2, 6))
    x[0, 1] = 1.0
    x[1, [2, 4, 5]] = -0.5
    with pytest.raises(InputDataError, match=r"3 negative value\(s\) at position\(s\) \[\(1, 2\)") as exc:
        bin_values(x)
    msg = str(exc.value)
    assert "raw counts" in msg and "log1p" in msg and "sc.pp.scale" in msg
    # an InputDataError is also a ValueError
    with pytest.raises(ValueError, match=r"1 negative value"):
        bin_nonzero(np.array([1.0, -2.0]))


def test_many_bad_values_list_the_first_few_positions():
    x = -np.ones(20)
    with pytest.raises(InputDataError, match=r"20 negative value\(s\) at position\(s\) \[0, 1, 2, 3, 4, \.\.\.\]"):
        bin_values(x)


def test_nan_and_negative_together_and_infinite():
    with pytest.raises(InputDataError, match=r"1 NaN value.*1 negative value"):
        bin_values(np.array([np.nan, -1.0, 2.0]))
    with pytest.raises(InputDataError, match=r"1 infinite value"):
        bin_values(np.array([np.inf, 1.0]))


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
def test_wrong_ndim(shape):
    with pytest.raises(InputDataError, match="1-D array .* 2-D array"):
        bin_values(np.ones(shape))
    with pytest.raises(InputDataError, match="1-D"):
        bin_nonzero(np.ones(shape) if shape else np.float64(1.0))


def test_sparse_input_is_refused_with_a_hint():
    with pytest.raises(InputDataError, match="bin_nonzero"):
        bin_values(sp.csr_matrix(np.eye(3)))


@pytest.mark.parametrize("n_bins", [2, 1, 0, -5])
def test_too_few_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins must be at least 3"):
        bin_values(np.ones(4), n_bins=n_bins)
    with pytest.raises(ValueError, match="n_bins must be at least 3"):
        bin_nonzero(np.ones(4), n_bins=n_bins)


def test_bad_types():
    with pytest.raises(TypeError, match="rng"):
        bin_values(np.ones(4), rng="seed")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n_bins"):
        bin_values(np.ones(4), n_bins=5.0)  # type: ignore[arg-type]
    with pytest.raises(InputDataError, match="numeric"):
        bin_values(np.array(["a", "b"]))


# --------------------------------------------------------------------------------------------
# statistics of the tie-breaking
# --------------------------------------------------------------------------------------------


def _tied_groups(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, np.ndarray, int, int]]:
    """(row, column positions, low, high) of every tied value class with a range of >= 2 bins."""
    groups = []
    for r in range(x.shape[0]):
        for value in np.unique(x[r][x[r] != 0]):
            cols = np.flatnonzero(x[r] == value)
            low, high = int(lo[r, cols[0]]), int(hi[r, cols[0]])
            assert np.all(lo[r, cols] == low) and np.all(hi[r, cols] == high)
            if high - low >= 2:
                groups.append((r, cols, low, high))
    return groups


def _uniformity_failures(
    draws: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, family_alpha: float = FAMILY_ALPHA
) -> dict[str, list[str]]:
    """Check that tied values are drawn uniformly over ``low + 1 .. high``.

    ``draws`` has shape [n_draws, *x.shape]. Returns, for each check, the groups that fail it:
    ``support`` (a draw outside low+1..high), ``ends`` (low+1 or high never drawn),
    ``chisquare`` (goodness of fit to the uniform, Bonferroni-corrected), ``mean`` (pooled mean
    more than 5 standard errors from the uniform mean).
    """
    groups = _tied_groups(x, lo, hi)
    alpha = family_alpha / len(groups)
    failures: dict[str, list[str]] = {"support": [], "ends": [], "chisquare": [], "mean": []}
    for r, cols, low, high in groups:
        name = f"row {r} value {x[r, cols[0]]:g} range {low + 1}..{high}"
        sample = draws[:, r, cols].ravel().astype(np.int64)
        k = high - low
        inside = (sample >= low + 1) & (sample <= high)
        if not inside.all():
            failures["support"].append(name)
        counts = np.bincount(sample[inside] - (low + 1), minlength=k)
        if counts[0] == 0 or counts[-1] == 0:
            failures["ends"].append(name)
        # draws outside the support count against the fit too (they are missing from counts)
        if not inside.all() or chisquare(counts).pvalue <= alpha:
            failures["chisquare"].append(name)
        n = sample.size
        mean_expected = (low + 1 + high) / 2
        se = np.sqrt((k * k - 1) / 12 / n)
        if abs(sample.mean() - mean_expected) > 5 * se:
            failures["mean"].append(name)
    return failures


@pytest.fixture(scope="module")
def many_draws(ref) -> np.ndarray:
    gen = np.random.default_rng(STAT_SEED)
    return np.stack([bin_values(ref["tied_input"], n_bins=N_BINS, rng=gen) for _ in range(N_DRAWS)])


def test_tied_values_are_uniform_over_their_range(ref, many_draws):
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    groups = _tied_groups(x, lo, hi)
    assert len(groups) >= 20  # the test has something to test
    failures = _uniformity_failures(many_draws, x, lo, hi)
    assert failures == {"support": [], "ends": [], "chisquare": [], "mean": []}


def test_uniformity_check_detects_always_left(ref, many_draws):
    """Negative control: always the top of the range (left) must be flagged."""
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    wrong = np.broadcast_to(hi, many_draws.shape)
    failures = _uniformity_failures(wrong, x, lo, hi)
    n_groups = len(_tied_groups(x, lo, hi))
    assert failures["support"] == []  # left is a legal value: only the statistics can tell
    assert len(failures["ends"]) == n_groups
    assert len(failures["chisquare"]) == n_groups
    assert len(failures["mean"]) == n_groups


def test_uniformity_check_detects_off_by_one(ref):
    """Negative control: floor instead of ceil (range low..high-1) must be flagged."""
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    gen = np.random.default_rng(1)
    u = gen.random((200, *x.shape))
    wrong = np.floor(u * (hi - lo) + lo)
    failures = _uniformity_failures(wrong, x, lo, hi)
    assert len(failures["support"]) == len(_tied_groups(x, lo, hi))


def test_uniformity_check_detects_a_subtle_bias_inside_the_range(ref):
    """Negative control: legal values, both ends hit, but skewed towards the top.

    The bin is drawn with u = max of two uniforms (density 2u) for a quarter of the values, the
    correct draw otherwise: the chi-square test must still flag it.
    """
    x, lo, hi = ref["tied_input"], ref["tied_low"], ref["tied_high"]
    gen = np.random.default_rng(2)
    shape = (N_DRAWS, *x.shape)
    u = gen.random(shape)
    skew = gen.random(shape) < 0.25
    u = np.where(skew, np.maximum(u, gen.random(shape)), u)
    wrong = np.ceil(u * (lo - hi) + hi)
    failures = _uniformity_failures(wrong, x, lo, hi)
    assert failures["support"] == [] and failures["ends"] == []
    assert len(failures["chisquare"]) == len(_tied_groups(x, lo, hi))
    # and the identical construction without skew passes
    fair = np.ceil(gen.random(shape) * (lo - hi) + hi)
    assert _uniformity_failures(fair, x, lo, hi)["chisquare"] == []
