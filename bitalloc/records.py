"""Strict, frozen pydantic records shared by the serialised results (allocations, KV
allocations): unknown fields are refused, values cannot be reassigned."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every serialised record: unknown fields refused, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SolverSummary(Strict):
    """How the choice was made."""

    method: str
    status: str
    objective: float
    lower_bound: float | None = None
    gap: float | None = None
    wall_time_s: float


class ProfileSummary(Strict):
    """Which profile predicted the losses."""

    method: str
    tokens: int | None = None
    seconds: float | None = None
    model_fingerprint: str | None = None
    calibration_fingerprint: str | None = None
    cache: str | None = None
    #: Pairs with measured interaction terms in the objective (0: purely additive).
    interaction_pairs: int = 0
    interaction_formats: list[str] | None = None
    #: The pairwise terms' share of the predicted loss (included in ``predicted_loss``).
    interaction_loss: float = 0.0
