"""The baseline's linear model on standardised genes, with the centring folded into the model.

CellTypist standardises every gene (``StandardScaler``: minus the mean, over the standard deviation), clips the
values above 10 and fits a one-vs-rest logistic regression on the dense result. Centring a sparse matrix makes it
dense, so here the matrix keeps only the division by the standard deviation (``S = X / sd``, still sparse) and
the centring is carried by the model: the standardised matrix is ``Z = S - 1 offset^T`` with ``offset = mean / sd``,
so ``Z w = S w - offset . w``. Loss, gradient and decision function are computed that way, which gives the same
objective, the same L-BFGS iterates and the same decision function as the dense standardised matrix, with memory
that of ``S``. The clip at 10 of a centred value is a clip of ``S`` at ``10 + offset`` (a zero entry, centred, is
``-offset <= 0``, so only stored values can exceed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["CentredLogisticOvR", "GeneStats", "standardise"]

#: centred standardised values above this are clipped (CellTypist's ``indata[indata > 10] = 10``)
CLIP = 10.0


@dataclass
class GeneStats:
    """Per-gene count, sum and sum of squares, accumulated chunk by chunk (float64); ``StandardScaler``'s
    mean and scale (population standard deviation, 1 where it is 0) from them."""

    n_genes: int
    n: int = 0  # cells added
    s1: np.ndarray = field(init=False)  # per gene: sum of the values
    s2: np.ndarray = field(init=False)  # per gene: sum of the squared values

    def __post_init__(self) -> None:
        self.s1 = np.zeros(self.n_genes)
        self.s2 = np.zeros(self.n_genes)

    def add(self, x: sp.csr_matrix) -> None:
        """Add the rows of a CSR chunk (explicit entries only: sparse zeros add nothing to the sums)."""
        values = x.data.astype(np.float64)
        self.n += x.shape[0]
        self.s1 += np.bincount(x.indices, weights=values, minlength=self.n_genes)
        self.s2 += np.bincount(x.indices, weights=values * values, minlength=self.n_genes)

    def mean_scale(self, genes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, scale)`` of the genes (a mask or positions; None: all), as ``StandardScaler`` has them."""
        s1, s2 = (self.s1, self.s2) if genes is None else (self.s1[genes], self.s2[genes])
        mean = s1 / max(self.n, 1)
        var = np.maximum(s2 / max(self.n, 1) - mean**2, 0.0)
        scale = np.sqrt(var)
        scale[scale <= 1e-12 * np.maximum(np.abs(mean), 1.0)] = 1.0  # constant genes: left unscaled, as sklearn does
        return mean, scale


def standardise(x: sp.csr_matrix, mean: np.ndarray, scale: np.ndarray, clip: float = CLIP,
                dtype: Any = np.float64) -> sp.csr_matrix:
    """``S = x / scale`` with stored values clipped so that the centred ``S - mean / scale`` is at most ``clip``.

    The matrix stays sparse (same sparsity pattern); the centring is left to :class:`CentredLogisticOvR`.
    """
    out = sp.csr_matrix(x, dtype=dtype, copy=True)
    out.sum_duplicates()
    inv = (1.0 / scale)[out.indices]
    out.data *= inv.astype(dtype, copy=False)
    np.minimum(out.data, (clip + mean / scale)[out.indices].astype(dtype, copy=False), out=out.data)
    return out


def _binary_fit(S: sp.csr_matrix, offset: np.ndarray, target: np.ndarray, weight: np.ndarray, C: float,
                max_iter: int, tol: float) -> tuple[np.ndarray, float, int, bool]:
    """One L2 logistic regression on ``Z = S - offset`` (unpenalised intercept), as scikit-learn's ``lbfgs``."""
    from scipy.optimize import minimize
    from scipy.special import expit

    sw_sum = float(weight.sum())
    l2 = 1.0 / (C * sw_sum)
    d = S.shape[1]

    def loss_grad(coef: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = coef[:d], coef[d]
        z = S @ w + (b - offset @ w)
        # half binomial loss log(1 + e^z) - t z, stable for large |z|
        loss = float(weight @ (np.logaddexp(0.0, z) - target * z)) / sw_sum + 0.5 * l2 * float(w @ w)
        g = weight * (expit(z) - target) / sw_sum
        grad = np.empty(d + 1)
        grad[:d] = S.T @ g - offset * g.sum() + l2 * w
        grad[d] = g.sum()
        return loss, grad

    res = minimize(loss_grad, np.zeros(d + 1), method="L-BFGS-B", jac=True,
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return res.x, float(res.fun), int(res.nit), bool(res.success)


@dataclass
class CentredLogisticOvR:
    """One-vs-rest L2 logistic regression on standardised genes whose centring is folded into the model.

    ``fit(S, y, offset)`` fits on ``Z = S - offset`` without forming it; ``coef_`` and ``intercept_`` are those of
    ``Z`` (what scikit-learn's ``LogisticRegression(multi_class="ovr", solver="lbfgs")`` finds on the dense ``Z``,
    as CellTypist runs it: same loss, penalty ``1/(2C) |w|^2`` on the coefficients only, same L-BFGS settings,
    zero start). With two classes one problem is fitted (the second class positive). ``class_weight="balanced"``
    weighs each one-vs-rest problem's two sides by their inverse frequency, as scikit-learn does for ``ovr``.
    """

    C: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-4
    class_weight: str | None = None
    classes_: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    coef_: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    intercept_: np.ndarray = field(default_factory=lambda: np.empty(0))
    n_iter_: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=int))
    converged_: bool = True

    def fit(self, S: sp.csr_matrix, y: np.ndarray, offset: np.ndarray) -> CentredLogisticOvR:
        """Fit on ``S - offset`` (``S`` sparse, float64 preferred: a float32 one is upcast per product)."""
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced'; got {self.class_weight!r}.")
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("a classifier needs at least two classes.")
        S = sp.csr_matrix(S)
        offset = np.asarray(offset, dtype=np.float64)
        positives = self.classes_[1:] if len(self.classes_) == 2 else self.classes_
        coefs, iters, converged = [], [], True
        for positive in positives:
            target = (y == positive).astype(np.float64)
            weight = np.ones(len(y))
            if self.class_weight == "balanced":
                n_pos = target.sum()
                weight = np.where(target > 0, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
            coef, _, n_iter, ok = _binary_fit(S, offset, target, weight, self.C, self.max_iter, self.tol)
            coefs.append(coef)
            iters.append(n_iter)
            converged &= ok
        stacked = np.vstack(coefs)
        self.coef_, self.intercept_ = stacked[:, :-1], stacked[:, -1]
        self.n_iter_, self.converged_ = np.asarray(iters), converged
        return self

    def decision_function(self, S: sp.csr_matrix, offset: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
        """``Z coef^T + intercept`` of ``Z = S - offset``, ``[n, n_problems]``. ``genes`` (a mask over the model's
        genes) leaves the others out of the sum (a gene the data lack counts as its training mean, as CellTypist
        drops them); ``S`` then holds only the masked genes' columns."""
        coef = self.coef_ if genes is None else self.coef_[:, genes]
        offset = np.asarray(offset, dtype=np.float64)
        offset = offset if genes is None else offset[genes]
        return np.asarray(S @ coef.T) + (self.intercept_ - coef @ offset)

    def predict_proba(self, S: sp.csr_matrix, offset: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order: each one-vs-rest sigmoid, rows normalised to sum 1
        (scikit-learn's ``ovr``); the largest is the class of the largest decision value."""
        from scipy.special import expit

        scores = expit(self.decision_function(S, offset, genes))
        if scores.shape[1] == 1:
            return np.hstack([1.0 - scores, scores])
        total = scores.sum(axis=1, keepdims=True)
        return scores / np.where(total > 0, total, 1.0)
