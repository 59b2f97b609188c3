"""Temperature scaling, the expected calibration error and the reliability diagram (issue 18)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scgpt_protocol.annotate.calibration import (
    calibrated,
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_table,
)
from scgpt_protocol.annotate.refinement import abstain


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_cells(n: int, seed: int, n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model of these cells."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, n_classes))
    p = _softmax(logits)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return logits, y


def _confidence_correct(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return p.max(axis=1), p.argmax(axis=1) == y


def test_over_confident_model_gets_t_above_one_and_lower_nll():
    val_logits, val_y = _calibrated_cells(3000, seed=0)
    over = 5 * val_logits  # the same ranking, far too sure
    t = fit_temperature(over, val_y)
    assert 3.5 < t < 7.0  # the factor of 5 is recovered, up to sampling noise
    assert negative_log_likelihood(over, val_y, t) < negative_log_likelihood(over, val_y, 1.0) - 0.5

    # ECE on held-out cells of the same distribution: lower after than before
    test_logits, test_y = _calibrated_cells(3000, seed=1)
    before = _softmax(5 * test_logits)
    after = calibrated(5 * test_logits, t, logits=True)
    ece_before = expected_calibration_error(*_confidence_correct(before, test_y))
    ece_after = expected_calibration_error(*_confidence_correct(after, test_y))
    assert ece_before > 0.15
    assert ece_after < 0.04
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # temperature never changes the call
    record = calibration_record(t, ece_before, ece_after, n_cells=len(val_y))
    assert record["temperature"] == pytest.approx(t)
    assert record["ece_before"] > record["ece_after"]
    assert record["split"] == "validation" and record["n_cells"] == 3000 and record["n_bins"] == 15


def test_calibrated_logits_keep_temperature_near_one():
    logits, y = _calibrated_cells(4000, seed=2)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.12)


def test_temperature_is_one_when_it_cannot_improve():
    # two cells whose logits carry no information: every temperature gives the same NLL (log 2)
    assert fit_temperature(np.zeros((2, 2)), np.array([0, 1])) == 1.0


def test_probabilities_and_logits_give_the_same_calibrated_probabilities():
    logits, _ = _calibrated_cells(200, seed=3)
    for t in (0.5, 1.0, 2.7):
        from_logits = calibrated(logits, t, logits=True)
        from_probabilities = calibrated(_softmax(logits), t)
        np.testing.assert_allclose(from_probabilities, from_logits, atol=1e-6)
    np.testing.assert_allclose(calibrated(_softmax(logits), 1.0), _softmax(logits), atol=1e-6)
    # the fit on log-probabilities is the fit on logits
    _, y = _calibrated_cells(200, seed=3)
    assert fit_temperature(np.log(_softmax(3 * logits)), y) == pytest.approx(fit_temperature(3 * logits, y), rel=1e-3)


def test_calibrated_probabilities_drive_unknown():
    logits, y = _calibrated_cells(2000, seed=4)
    over = 5 * logits
    t = fit_temperature(over, y)
    raw = _softmax(over)
    cal = calibrated(raw, t)
    labels = np.array(["a", "b", "c", "d"], dtype=object)[raw.argmax(axis=1)]
    _, raw_unknown = abstain(labels, raw.max(axis=1), 0.5)
    cal_calls, cal_unknown = abstain(labels, cal.max(axis=1), 0.5)
    assert cal_unknown.sum() > raw_unknown.sum() + 100  # softened: many more cells below 0.5
    assert raw_unknown[cal_unknown].sum() == raw_unknown.sum()  # every raw Unknown stays Unknown
    assert (cal_calls[cal_unknown] == "Unknown").all() and (cal_calls[~cal_unknown] == labels[~cal_unknown]).all()
    # calibrated abstention keeps the cells that are right at the rate they are said to be
    kept = ~cal_unknown
    right = cal.argmax(axis=1) == y
    assert abs(right[kept].mean() - cal.max(axis=1)[kept].mean()) < 0.05


def test_ece_and_reliability_table_by_hand():
    conf = np.array([0.05, 0.55, 0.6, 0.95, 0.95, 1.0])
    correct = np.array([False, True, False, True, True, False])
    table = reliability_table(conf, correct, n_bins=2)
    assert list(table.columns) == ["bin", "lower", "upper", "n", "mean_confidence", "accuracy"]
    assert table["n"].tolist() == [1, 5]
    assert table["lower"].tolist() == [0.0, 0.5] and table["upper"].tolist() == [0.5, 1.0]
    assert table.loc[1, "accuracy"] == pytest.approx(3 / 5)
    assert table.loc[1, "mean_confidence"] == pytest.approx(np.mean([0.55, 0.6, 0.95, 0.95, 1.0]))
    expected = (1 * abs(0 - 0.05) + 5 * abs(3 / 5 - 0.81)) / 6
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(expected)
    # 15 bins by default, empty ones kept with NaN; a confidence of exactly 0 goes in the first bin
    full = reliability_table([0.0, 1.0], [False, True])
    assert len(full) == 15 and full["n"].tolist()[0] == 1 and full["n"].tolist()[-1] == 1
    assert np.isnan(full.loc[5, "accuracy"])
    assert expected_calibration_error([0.0, 1.0], [False, True]) == 0.0


@pytest.mark.parametrize(("logits", "y", "match"), [
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "at least one cell"),
    (np.zeros((4, 3)), np.zeros(3, dtype=int), "one true class index per cell"),
    (np.zeros((4, 3)), np.array([0, 1, 2, 3]), "outside 0..2"),
    (np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
])
def test_fit_temperature_refuses_bad_input(logits, y, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, y)


def test_bad_input_errors_say_what_was_expected():
    with pytest.raises(TypeError, match="integer class indices"):
        fit_temperature(np.zeros((2, 2)), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="0 < lowest < highest"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 1]), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="positive number"):
        calibrated(np.full((1, 2), 0.5), 0.0)
    with pytest.raises(ValueError, match="probabilities"):
        calibrated(np.array([[-1.0, 2.0]]), 1.0)
    with pytest.raises(ValueError, match="one of each per cell"):
        expected_calibration_error([0.5, 0.5], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_table([1.5], [True])
    assert isinstance(reliability_table([0.5], [True]), pd.DataFrame)


def test_reliability_diagram_draws_every_curve_and_saves(tmp_path):
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.pl.calibration import plot_reliability
    from scgpt_protocol.pl.figure import save_figure

    logits, y = _calibrated_cells(1000, seed=5)
    over = _softmax(5 * logits)
    after = calibrated(over, fit_temperature(5 * logits, y))
    tables = {name: reliability_table(*_confidence_correct(p, y))
              for name, p in (("scGPT before", over), ("scGPT after", after), ("baseline", _softmax(logits)))}
    fig = plot_reliability(tables, title="validation cells")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "perfectly calibrated"
    for name, p in (("scGPT before", over), ("scGPT after", after), ("baseline", _softmax(logits))):
        ece = expected_calibration_error(*_confidence_correct(p, y))
        assert f"{name} (ECE {ece:.3f})" in legend
    assert len(ax.get_lines()) == 4  # the diagonal + one line per curve
    assert ax.get_lines()[1].get_xdata().size == int((tables["scGPT before"]["n"] > 0).sum())
    assert min(t.get_fontsize() for t in ax.get_legend().get_texts()) >= 8
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "validation cells"
    path = save_figure(fig, RunLayout(tmp_path / "run"), "reliability_test")
    assert path.is_file() and path.stat().st_size > 1000 and path.with_suffix(".pdf").is_file()
    with pytest.raises(ValueError, match="mean_confidence"):
        plot_reliability({"bad": pd.DataFrame({"n": [1]})})
