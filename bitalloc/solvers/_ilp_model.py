"""The 0/1 linear model behind :class:`~bitalloc.solvers.ilp.ILPSolver`, shared by its backends.

Variables: ``x[v]`` for every allowed (unit, option), in row-major order, and, for every
interaction pair that is modelled, ``y[p, a, b]`` for every allowed option ``a`` of its first
unit and ``b`` of its second. Rows: one ``sum_j x[i, j] = 1`` per unit, the marginal rows
``sum_b y[p, a, b] - x[i, a] = 0`` and ``sum_a y[p, a, b] - x[j, b] = 0`` of every modelled
pair (exact for 0/1 ``x``: they force ``y[p, a, b] = x[i, a] * x[j, b]``, and are the tight
"local marginal" linearisation), and one ``costs @ x <= budget`` row per budget.

The objective is shifted so that every unit's and every pair's smallest allowed coefficient is
zero; the shift is a constant (each unit takes exactly one option, each pair exactly one
option pair) and makes the remaining coefficients non-negative and as small as possible, which
helps both the integer scaling for CP-SAT and the absolute tolerances of the MIP solvers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from bitalloc.errors import BitallocError
from bitalloc.solvers.problem import Problem, feasibility_tolerance


@dataclass(frozen=True)
class LinearModel:
    """The model's arrays (see the module docstring).

    Attributes:
        n_units: Units of the problem.
        x_index: ``(n, k)`` index of the ``x`` variable of each (unit, option), ``-1`` where
            the option is not allowed.
        x_unit: ``(n_x,)`` unit of every ``x`` variable.
        y_pair: ``(n_y,)`` modelled pair of every ``y`` variable (they follow the ``x``).
        objective: ``(n_x + n_y,)`` shifted objective coefficients, all ``>= 0``.
        constant: Objective value common to every choice (the shifts and folded terms).
        group_max: ``(n_units + pairs,)`` largest coefficient of every unit and modelled pair.
        rows: ``(n_units + marginal rows, n_x + n_y)`` CSR matrix of the equality rows.
        rhs: Right-hand sides of ``rows`` (``1`` for unit rows, ``0`` for marginal rows).
        costs: Budgeted cost of every ``x`` variable, per budget name.
        budgets: The budgets.
        pairs_modelled: Interaction pairs that got ``y`` variables.
        pairs_folded: Pairs folded into the unit objective or the constant (a constant table
            on the allowed options, or a side with a single allowed option).
    """

    n_units: int
    x_index: np.ndarray
    x_unit: np.ndarray
    y_pair: np.ndarray
    objective: np.ndarray
    constant: float
    group_max: np.ndarray
    rows: sp.csr_matrix
    rhs: np.ndarray
    costs: dict[str, np.ndarray]
    budgets: dict[str, float]
    pairs_modelled: int
    pairs_folded: int

    @property
    def n_x(self) -> int:
        """Number of ``x`` (choice) variables."""
        return int(self.x_unit.size)

    @property
    def n_y(self) -> int:
        """Number of ``y`` (interaction) variables."""
        return int(self.y_pair.size)

    @property
    def n_vars(self) -> int:
        """Number of variables."""
        return self.n_x + self.n_y

    @property
    def n_rows(self) -> int:
        """Number of constraints (equality rows plus one per budget)."""
        return int(self.rows.shape[0]) + len(self.budgets)

    def decode(self, x_values: np.ndarray) -> np.ndarray:
        """One option per unit from (possibly slightly fractional) ``x`` values: the largest."""
        table = np.full(self.x_index.shape, -np.inf)
        allowed = self.x_index >= 0
        table[allowed] = np.asarray(x_values, dtype=np.float64)[: self.n_x]
        return np.argmax(table, axis=1)

    def all_rows(
        self, costs: dict[str, np.ndarray], rhs: dict[str, float]
    ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """Every row as ``lower <= matrix @ v <= upper``, budgets last: ``costs[name] @ x <=
        rhs[name]`` (the callers' possibly rescaled version of :attr:`costs` and budgets)."""
        costs = [np.pad(costs[name], (0, self.n_y)) for name in self.budgets]
        budget_rows = sp.csr_matrix(np.array(costs).reshape(len(costs), self.n_vars))
        matrix = sp.vstack([self.rows, budget_rows], format="csr")
        lower = np.concatenate([self.rhs, np.full(len(rhs), -np.inf)])
        upper = np.concatenate([self.rhs, [rhs[name] for name in self.budgets]])
        return matrix, lower, upper

    def x_vector(self, choice: np.ndarray) -> np.ndarray:
        """0/1 vector over the ``x`` variables that encodes ``choice``."""
        x = np.zeros(self.n_x)
        x[self.x_index[np.arange(self.n_units), choice]] = 1.0
        return x


def build_model(problem: Problem) -> LinearModel:
    """The linear model of ``problem`` (no ties or pins: :meth:`BaseSolver.solve` removed them)."""
    allowed = problem.allowed
    n, k = allowed.shape
    objective = np.array(problem.objective, dtype=np.float64)
    constant = 0.0
    single = allowed.sum(axis=1) == 1

    # Fold what needs no y variables into the unit objective or the constant.
    modelled: list[tuple[int, int, np.ndarray]] = []
    for (i, j), table in zip(problem.interaction_pairs.tolist(), problem.interaction_values):
        sub = table[np.ix_(allowed[i], allowed[j])]
        if sub.min() == sub.max():
            constant += float(sub.flat[0])
        elif single[i]:
            objective[j, allowed[j]] += sub[0, :]
        elif single[j]:
            objective[i, allowed[i]] += sub[:, 0]
        else:
            modelled.append((i, j, sub))

    masked = np.where(allowed, objective, np.inf)
    unit_min = masked.min(axis=1)
    constant += float(unit_min.sum())
    flat = np.flatnonzero(allowed.ravel())
    x_unit = flat // k
    n_x = flat.size
    x_index = np.full((n, k), -1, dtype=np.int64)
    x_index.ravel()[flat] = np.arange(n_x)
    x_obj = objective.ravel()[flat] - unit_min[x_unit]
    group_max = [np.where(allowed, objective - unit_min[:, None], -np.inf).max(axis=1)]

    # Equality rows in COO form: unit rows first, then each pair's marginal rows.
    row_parts = [x_unit]
    col_parts = [np.arange(n_x)]
    val_parts = [np.ones(n_x)]
    y_obj: list[np.ndarray] = []
    y_pair: list[np.ndarray] = []
    next_row, next_var = n, n_x
    for i, j, sub in modelled:
        low = float(sub.min())
        constant += low
        shifted = sub - low
        group_max.append(np.array([shifted.max()]))
        ka, kb = shifted.shape
        y = next_var + np.arange(ka * kb).reshape(ka, kb)
        a_rows = next_row + np.arange(ka)
        b_rows = next_row + ka + np.arange(kb)
        xi = x_index[i, allowed[i]]
        xj = x_index[j, allowed[j]]
        # sum_b y[a, b] - x[i, a] = 0 and sum_a y[a, b] - x[j, b] = 0
        row_parts += [np.repeat(a_rows, kb), np.tile(b_rows, ka), a_rows, b_rows]
        col_parts += [y.ravel(), y.ravel(), xi, xj]
        val_parts += [np.ones(ka * kb), np.ones(ka * kb), -np.ones(ka), -np.ones(kb)]
        y_obj.append(shifted.ravel())
        y_pair.append(np.full(ka * kb, len(y_pair), dtype=np.int64))
        next_row += ka + kb
        next_var += ka * kb
    rows = sp.csr_matrix(
        (np.concatenate(val_parts), (np.concatenate(row_parts), np.concatenate(col_parts))),
        shape=(next_row, next_var),
    )
    rhs = np.zeros(next_row)
    rhs[:n] = 1.0
    return LinearModel(
        n_units=n,
        x_index=x_index,
        x_unit=x_unit,
        y_pair=np.concatenate([np.zeros(0, dtype=np.int64), *y_pair]),
        objective=np.concatenate([x_obj, *y_obj]),
        constant=constant,
        group_max=np.concatenate(group_max),
        rows=rows,
        rhs=rhs,
        costs={name: problem.costs[name].ravel()[flat] for name in problem.budgets},
        budgets=dict(problem.budgets),
        pairs_modelled=len(modelled),
        pairs_folded=len(problem.interaction_pairs) - len(modelled),
    )


def budget_excess(model: LinearModel, x: np.ndarray) -> dict[str, float]:
    """How far the 0/1 vector ``x`` exceeds each budget beyond its feasibility tolerance."""
    out = {}
    for name, budget in model.budgets.items():
        over = float(model.costs[name] @ x) - budget - feasibility_tolerance(budget)
        if over > 0:
            out[name] = over
    return out


# -- integer data for CP-SAT --------------------------------------------------------------

#: Largest magnitude allowed for an integer linear expression handed to CP-SAT; well inside
#: int64 so that its internal sums of coefficient times bound cannot overflow.
INT_LIMIT = 2**60
#: Largest scaled cost total: integers up to it, and float rounding errors far below one, are
#: exact in double precision, which the slack argument of :func:`integer_budget` relies on.
_COST_LIMIT = 2.0**48
#: Scales tried, in order, to make non-integer costs integral exactly (fractional bits such as
#: 4.25 or 4.125 need a power of two, decimal costs a power of ten).
_EXACT_SCALES = [2.0**p for p in range(21)] + [10.0**p for p in range(1, 7)]
#: Resolution of cost scaling when no exact scale exists: the largest total maps to ~2^40.
_INEXACT_TOTAL = 2.0**40


@dataclass(frozen=True)
class IntegerBudget:
    """One budget as integers: ``costs @ x <= budget`` (see :func:`integer_budget`)."""

    scale: float
    exact: bool
    relaxed_costs: np.ndarray
    relaxed_budget: int
    tight_costs: np.ndarray
    tight_budget: int


def integer_budget(cost: np.ndarray, budget: float, n_units: int) -> IntegerBudget:
    """Integer versions of one budget row, scaled by ``s``.

    With ``X = s * (budget + tol)`` (``tol`` the feasibility tolerance) and a per-coefficient
    slack ``t = min(s * tol / (4 (n + 1)), 1/4)`` (the last ``t`` in each bound absorbs the
    float rounding of ``X``, at most 1/16 below ``_COST_LIMIT``):

    * tight: ``ceil(c s - t) @ x <= floor(X - (n + 1) t)``. Every integer-feasible ``x`` has
      ``c @ x <= budget + tol - t / s``: feasible for the real costs.
    * relaxed: ``floor(c s + t) @ x <= floor(X + (n + 1) t)``. Every ``x`` feasible for the
      real costs satisfies it, so bounds proven on it are valid for the real problem.

    When every ``c s`` is within ``t`` of an integer (``exact``), both have the same
    coefficients; ``s`` is the first scale in ``_EXACT_SCALES`` that achieves this (``1`` for
    integer bit counts), else a power of two that maps the largest total to about 2^40.
    """
    tol = feasibility_tolerance(budget)
    top = max(float(cost.max(initial=0.0)) * n_units, abs(budget) + tol, 1e-300)

    def slack(s: float) -> float:
        return min(s * tol / (4.0 * (n_units + 1)), 0.25)

    scale, exact = None, False
    for s in _EXACT_SCALES:
        if s * top > _COST_LIMIT:
            continue
        scaled = cost * s
        if np.all(np.abs(scaled - np.round(scaled)) <= slack(s)):
            scale, exact = s, True
            break
    if scale is None:
        scale = 2.0 ** math.floor(math.log2(_INEXACT_TOTAL / top))
    t = slack(scale)
    scaled = cost * scale
    top_x = scale * (budget + tol)
    return IntegerBudget(
        scale=scale,
        exact=exact,
        relaxed_costs=np.floor(scaled + t).astype(np.int64),
        relaxed_budget=int(math.floor(top_x + (n_units + 1) * t)),
        tight_costs=np.ceil(scaled - t).astype(np.int64),
        tight_budget=int(math.floor(top_x - (n_units + 1) * t)),
    )


@dataclass(frozen=True)
class IntegerObjective:
    """The objective as integers, and what rounding it may have cost.

    ``coefficients = round(objective * scale)``. For every 0/1 solution of the model,
    ``scale * shifted_objective >= coefficients @ v - rounding``, so an integer bound ``L``
    gives the certified real bound ``constant + (L - rounding) / scale``.
    """

    scale: float
    coefficients: np.ndarray
    rounding: float


def integer_objective(model: LinearModel, scale: float | None) -> IntegerObjective:
    """Scale and round the model's objective (``scale=None``: automatic, see ILPSolver).

    The automatic scale is the power of two that maps the largest coefficient into
    (2^41, 2^42] (about 4e12), or lower where the sum over all units and pairs would pass 2^52,
    so every objective value stays an exact integer in double precision. The rounding
    allowance shrinks with the scale while CP-SAT's speed does not change (1,000 units x 8
    options: same time at 1e9 and 4e12, leaving a relative gap of 1e-6 and 2e-10). A power
    of two scales floats exactly: integer and other dyadic objectives round without error.
    """
    groups = model.group_max.size
    largest = float(model.group_max.max(initial=0.0))
    if scale is None:
        ceiling = min(2.0**42, 2.0**52 / max(groups, 1))
        scale = 2.0 ** math.floor(math.log2(ceiling / largest)) if largest > 0 else 1.0
    elif largest * scale * groups > INT_LIMIT:
        raise BitallocError(
            f"objective_scale={scale:g} overflows the integer objective (largest coefficient "
            f"{largest:.3g} over {groups} units and pairs); use a smaller objective_scale or "
            "None for the automatic choice"
        )
    scaled = model.objective * scale
    coefficients = np.round(scaled).astype(np.int64)
    error = coefficients - scaled  # exact: both sides are within one unit of each other
    # Each unit takes one x variable and each modelled pair one y variable, so the rounding
    # error of a solution is at most the sum over groups of each group's largest error.
    group_of = np.concatenate([model.x_unit, model.n_units + model.y_pair])
    worst = np.full(groups, -np.inf)
    np.maximum.at(worst, group_of, error)
    # The products objective * scale are rounded floats (relative error 2^-53 each) and the
    # sums above are float too; 2^-50 per group of the largest scaled value covers both.
    float_error = groups * 2.0**-50 * (largest * scale + 1.0)
    return IntegerObjective(scale, coefficients, float(worst.sum()) + float_error)


def cp_sat_model(
    model: LinearModel,
    coefficients: np.ndarray,
    budgets: dict[str, tuple[np.ndarray, int]],
    hint: np.ndarray | None,
) -> tuple[Any, bool]:
    """The CP-SAT model: integer objective ``coefficients``, integer ``(costs, limit)`` rows.

    Returns the model and whether ``hint`` (a choice) was added as a solution hint; it is
    added only when it meets every integer budget.
    """
    from ortools.sat.python import cp_model

    cp = cp_model.CpModel()
    variables = [cp.new_bool_var(f"v{v}") for v in range(model.n_vars)]
    rows = model.rows
    for r in range(rows.shape[0]):
        cols = rows.indices[rows.indptr[r] : rows.indptr[r + 1]].tolist()
        if r < model.n_units:
            cp.add_exactly_one(variables[v] for v in cols)
        else:
            coefs = rows.data[rows.indptr[r] : rows.indptr[r + 1]].astype(np.int64).tolist()
            cp.add(cp_model.LinearExpr.weighted_sum([variables[v] for v in cols], coefs) == 0)
    xs = variables[: model.n_x]
    use_hint = hint is not None
    for costs, limit in budgets.values():
        most = np.zeros(model.n_units, dtype=np.int64)
        np.maximum.at(most, model.x_unit, costs)
        if int(most.sum()) <= limit:
            continue  # cannot bind
        cp.add(cp_model.LinearExpr.weighted_sum(xs, costs.tolist()) <= limit)
        if hint is not None:
            at = model.x_index[np.arange(model.n_units), hint]
            use_hint &= int(costs[at].sum()) <= limit
    used = np.flatnonzero(coefficients)
    cp.minimize(
        cp_model.LinearExpr.weighted_sum(
            [variables[v] for v in used.tolist()], coefficients[used].tolist()
        )
    )
    if use_hint:
        # Only the x values: CP-SAT completes the y values by propagation.
        for v, value in zip(xs, model.x_vector(hint).astype(int).tolist()):
            cp.add_hint(v, value)
    return cp, use_hint
