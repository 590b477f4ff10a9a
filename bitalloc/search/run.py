"""``search()``: measured multi-objective search over allocations, seeded by the solvers.

The profile predicts; the search measures. Candidate allocations are proposed by an Optuna
sampler (NSGA-II or TPE) over a per-unit categorical space, evaluated on the evaluation split
(loss, perplexity and KL to the unquantized model) in this process or on Ray actors, and told
to a study in durable storage as each finishes. The study starts from the solvers' allocations
at several budgets (``enqueue_trial``), so the sampler refines them instead of starting cold.

Interruption loses no finished trial: each is committed when told. Ctrl-C fails the trials in
flight and queues their parameters again; after ``kill -9`` the next ``--resume`` does the
same for the trials the dead process left RUNNING.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bitalloc.allocation import Allocation, Measured, UnitChoice
from bitalloc.config import (
    SEARCH_FLAT_FIELDS,
    SEARCH_SHARED,
    AllocateConfig,
    SearchConfig,
    call_arguments,
    check_known,
    search_flat,
)
from bitalloc.config.messages import SEARCH_NO_BUDGET
from bitalloc.config.search import SAMPLERS, SPACES
from bitalloc.data import tensor_fingerprint
from bitalloc.errors import BitallocError
from bitalloc.fileio import write_json_atomic
from bitalloc.formats import QuantFormat
from bitalloc.jobs import check_ray_address, job_key, job_pool, run_all
from bitalloc.measuring import baseline_formats, uniform_assignment, uniform_avg_bits
from bitalloc.models import excluded_parameters, model_fingerprint
from bitalloc.outputs import check_output_dir
from bitalloc.planning import build_problem, default_method, feasible_avg_bits
from bitalloc.search import study as studies
from bitalloc.search.storage import (
    BEST_FILE,
    FRONTIER_FILE,
    PROFILE_FILE,
    SEARCH_FILE,
    close_storage,
    default_run_dir,
    default_storage_url,
    open_storage,
    readable,
    study_names,
)
from bitalloc.sensitivity import Profile
from bitalloc.solvers import solve
from bitalloc.stages import Prepared, allocation_for, prepare_and_profile

#: Offsets from the budget (average bits) at which the solvers' allocations seed the study.
SEED_OFFSETS = (-0.5, -0.25, 0.0, 0.25, 0.5)
#: Spread (standard deviation of the log factor) of the per-unit noise put on the profile to
#: draw further seeds at the budget: about the error of a Fisher term (1.5-2x for some roles).
SEED_NOISE = 0.5


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the best measured allocation within the budget, the measured
    Pareto front (``(trial number, avg_bits, perplexity)``) and how the study got there."""

    study_name: str
    storage: str
    run_dir: Path
    budget: float
    best: Allocation | None
    best_trial: int | None
    pareto: list[tuple[int, float, float]]
    trials_completed: int
    evaluations: int
    recovered: list[int]
    fp16_perplexity: float
    uniform: dict[str, dict[str, float]]
    wall_time_s: float
    seeds: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"study {self.study_name!r} in {self.storage}: {self.trials_completed} trials "
            f"finished ({self.evaluations} evaluated in this run, {self.wall_time_s:.0f} s)",
            f"unquantized perplexity {self.fp16_perplexity:.3f}; uniform: "
            + ", ".join(f"{k} {v['perplexity']:.2f}" for k, v in self.uniform.items()),
            "measured Pareto front (avg bits, perplexity): "
            + ", ".join(f"{b:.3f}/{p:.2f}" for _, b, p in self.pareto),
        ]
        if self.best is None:
            lines.append(f"no finished trial meets {self.budget:g} bits yet")
        else:
            lines.append(
                f"best: avg_bits={self.best.avg_bits:.4f} "
                f"perplexity={self.best.measured.perplexity:.4f} (trial {self.best_trial})"
            )
        return "\n".join(lines)


def search_space(
    units: Sequence[Any],
    palette: Sequence[QuantFormat],
    seeds: Sequence[Mapping[str, str]],
    *,
    space: str = "near",
    radius: int = 1,
) -> dict[str, list[str]]:
    """Per unit, the formats the sampler may choose, cheapest first.

    ``full`` is every palette format that can store the unit. ``near`` keeps, in each unit's
    own cost order, the formats from ``radius`` steps below the cheapest seed choice to
    ``radius`` steps above the dearest, so every seed lies inside the space and the sampler
    refines around them.
    """
    if space not in SPACES:
        raise BitallocError(f"search space {space!r} is not one of {', '.join(SPACES)}")
    if radius < 0:
        raise BitallocError(f"radius must be >= 0, not {radius}")
    result = {}
    for unit in units:
        # Only the formats that can store the unit (llama.cpp's row-length rules).
        fitting = [f for f in palette if f.allows(unit.shape)]
        order = sorted(fitting, key=lambda f: (f.storage_bits(unit.shape), f.name))
        names = [f.name for f in order]
        if space == "full" or not seeds:
            result[unit.name] = names
            continue
        picked = [names.index(seed[unit.name]) for seed in seeds]
        lo = max(0, min(picked) - radius)
        hi = min(len(names) - 1, max(picked) + radius)
        result[unit.name] = names[lo : hi + 1]
    return result


def population_size(trials: int) -> int:
    """Trials per NSGA-II generation (and seeds in the first one) for a study of ``trials``."""
    return max(8, min(50, trials // 4))


def make_sampler(name: str, *, seed: int, trials: int) -> Any:
    """The Optuna sampler for ``name`` (``nsga2`` or ``tpe``), seeded."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size(trials))
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=max(5, min(20, trials // 5))
        )
    raise BitallocError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")


def _seed_allocations(
    prep: Prepared, prof: Profile, budget: float, method: str
) -> list[tuple[str, float, Allocation]]:
    """The solver's allocations at the budget and :data:`SEED_OFFSETS` around it (clipped to
    the feasible range, repeats dropped): ``(source, budget, allocation)``."""
    low, high = feasible_avg_bits(prep.units, prep.palette)
    seeds: dict[str, tuple[str, float, Allocation]] = {}
    for offset in SEED_OFFSETS:
        target = min(max(budget + offset, low), high)
        problem = build_problem(prep.units, prep.palette, prof, target)
        alloc = allocation_for(prep, prof, solve(problem, method=method), target)
        key = job_key(tuple(alloc.formats.items()))
        seeds.setdefault(key, (f"seed:{method}@{target:g}", target, alloc))
    return list(seeds.values())


def _perturbed_seeds(
    prep: Prepared,
    prof: Profile,
    budget: float,
    method: str,
    count: int,
    seed: int,
    known: set[str],
) -> list[tuple[str, dict[str, str]]]:
    """Up to ``count`` more allocations at the budget, each the solver's answer for the profile
    with every unit's row scaled by a random log-normal factor (:data:`SEED_NOISE`).

    They are what the profile cannot tell apart from its own answer: the first generation of
    the search is made of them instead of random allocations, which in a space of hundreds of
    units are far worse (they mostly land between the palette's cheapest and dearest choices
    at random)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(4 * count):
        if len(out) >= count:
            break
        noise = np.exp(rng.normal(0.0, SEED_NOISE, size=(len(prof.units), 1)))
        table = replace(prof, loss=prof.loss * noise)
        problem = build_problem(prep.units, prep.palette, table, budget)
        formats = allocation_for(prep, table, solve(problem, method=method), budget).formats
        key = job_key(tuple(formats.items()))
        if key not in known:
            known.add(key)
            out.append((f"seed:{method}@{budget:g}~noise{k}", formats))
    return out


class _Costs:
    """Average bits and predicted loss of any assignment, from the palette and profile."""

    def __init__(self, prep: Prepared, prof: Profile):
        self.units = prep.units
        self.numel = sum(u.numel for u in prep.units)
        self.formats = {f.name: f for f in prep.palette}
        self.row = {name: i for i, name in enumerate(prof.units)}
        self.col = {name: j for j, name in enumerate(prof.formats)}
        self.loss = prof.loss

    def avg_bits(self, assignment: Mapping[str, str]) -> float:
        bits = sum(self.formats[assignment[u.name]].storage_bits(u.shape) for u in self.units)
        return bits / self.numel

    def predicted(self, assignment: Mapping[str, str]) -> float:
        return float(
            sum(self.loss[self.row[u.name], self.col[assignment[u.name]]] for u in self.units)
        )

    def unit_loss(self, unit: str, fmt: str) -> float:
        return float(self.loss[self.row[unit], self.col[fmt]])


def search(
    model: Any = None,
    config: AllocateConfig | float | None = None,
    search_config: SearchConfig | None = None,
    *,
    tokenizer: object | None = None,
    **overrides: Any,
) -> SearchResult:
    """Search allocations by measurement until the study holds ``trials`` finished trials.

    ``config`` holds the allocation options the search shares with :func:`bitalloc.allocate`
    (model, budget, palette, text, profiler, seed solver, workers; a number is the short form
    of ``avg_bits``) and ``search_config`` its own (:class:`~bitalloc.config.SearchConfig`:
    trials, sampler, storage, study, run directory, resume, space, radius, seed);
    ``overrides`` are options of either by their flat names (``avg_bits=3.25``,
    ``trials=40``, ...), applied on top; ``profile`` may also be a :class:`Profile` object.

    Objectives: average bits and perplexity on the evaluation split (both minimised); the
    result's ``best`` is the lowest-perplexity allocation within ``avg_bits``. The study lives
    in ``storage`` (default SQLite in ``run_dir``, itself default ``runs/<study>``) under the
    name ``study``; ``resume`` continues an existing one (checked to be the same search),
    and without it an existing study of that name is an error. ``sampler`` is ``nsga2`` or
    ``tpe``; ``space`` is ``near`` (``radius`` palette steps around the seeds) or ``full``.
    Evaluations run in this process (``workers=0``) or on that many Ray actors (local Ray, or
    ``ray_address`` / ``$RAY_ADDRESS``). The profile (``profiler`` or a saved ``profile``)
    seeds the study with the solvers' allocations at the budget and around it.

    Writes into ``run_dir``: ``search.json`` (summary), ``profile.safetensors``,
    ``frontier.json`` (the seeds, measured) and ``best.json`` (the best allocation).
    """
    import optuna

    start_time = time.perf_counter()
    config, options, profile = _resolve(model, config, search_config, overrides)
    avg_bits = config.target.avg_bits
    trials, sampler, seed = options.trials, options.sampler, options.seed
    study, space, radius, resume = options.study, options.space, options.radius, options.resume
    workers, ray_address = config.profile.workers, config.profile.ray_address
    progress = config.progress
    if workers > 0 and (ray_address or os.environ.get("RAY_ADDRESS")):
        check_ray_address(ray_address or os.environ["RAY_ADDRESS"])
    run_dir = Path(options.run_dir) if options.run_dir is not None else default_run_dir(study)
    # The run directory and the storage are checked before any expensive work, so a path that
    # cannot be written, a bad URL or a damaged study fails at once rather than after
    # profiling. (A resumed run's missing storage is the better message, so it comes first.)
    if not resume:
        check_output_dir(run_dir, "run directory", must_be_empty=False)
    url = options.storage or default_storage_url(run_dir)
    store = open_storage(url, create=not resume)
    known = study_names(store, url)
    if resume and study not in known:
        raise BitallocError(
            f"--resume: no study named {study!r} in {url} (it holds {known or 'no studies'}); "
            "drop --resume to start one"
        )
    if not resume and study in known:
        raise BitallocError(
            f"a study named {study!r} already exists in {url}; continue it with --resume or "
            "choose another --study name (nothing was changed)"
        )
    if resume:
        check_output_dir(run_dir, "run directory", must_be_empty=False)
        with readable(url):
            studies.check_stored(store, study)

    prep, prof = prepare_and_profile(model, config, tokenizer=tokenizer, profile=profile)
    ev = prep.evaluation_windows(config.data.eval_tokens)
    identity = {
        "model": prep.loaded.source,
        "model_fingerprint": model_fingerprint(prep.model, prep.units),
        "palette": [f.name for f in prep.palette],
        "budget": float(avg_bits),
        "eval_tokens": int(ev.numel()),
        "seq_len": int(ev.shape[1]),
        "eval_fingerprint": tensor_fingerprint(ev),
        "space": space,
        "units": [u.name for u in prep.units],
        "clipping": "mse" if prep.importance is None else prep.importance.digest,
    }
    method = default_method(prof, config.solve.solver)
    seeds = _seed_allocations(prep, prof, float(avg_bits), method)
    # The first generation: the solver's seeds, then noisy-profile seeds up to its size.
    population = population_size(trials)
    extra = _perturbed_seeds(
        prep,
        prof,
        float(avg_bits),
        method,
        max(0, population - len(seeds)),
        seed,
        {job_key(tuple(a.formats.items())) for _, _, a in seeds},
    )
    starts = [(source, alloc.formats) for source, _, alloc in seeds] + extra
    choices = search_space(
        prep.units, prep.palette, [f for _, f in starts], space=space, radius=radius
    )
    costs = _Costs(prep, prof)

    if resume:
        with readable(url):
            # A resumed sampler gets a fresh seed, so it does not repeat the first run's draws.
            done_before = store.get_n_trials(store.get_study_id_from_name(study))
            opt_sampler = make_sampler(sampler, seed=seed + done_before, trials=trials)
            st = studies.load_study(store, study, opt_sampler, identity)
            recovered = studies.recover_abandoned(st)
            # The space the study was started with: the sampler's history is only valid in it.
            choices = studies.stored_space(st, choices)
    else:
        opt_sampler = make_sampler(sampler, seed=seed, trials=trials)
        st = studies.create_study(store, study, opt_sampler, identity)
        st.set_user_attr("space_choices", choices)
        for source, formats in starts:
            st.enqueue_trial(dict(formats), user_attrs={"source": source})
        recovered = []
    run_dir.mkdir(parents=True, exist_ok=True)
    prof.save(run_dir / PROFILE_FILE)
    write_json_atomic(
        run_dir / SEARCH_FILE,
        {"storage": url, "study": study, "budget": float(avg_bits), "status": "running"},
    )

    evaluations = 0
    layers = {u.name: u.layer for u in prep.units}
    owner = studies.owner_tag()
    with job_pool(
        prep.model,
        ev,
        layers,
        keep_logprobs=True,
        workers=workers,
        ray_address=ray_address,
        importance=prep.importance,
    ) as pool:
        evaluations += _measure_baselines(st, pool, prep, avg_bits, progress)
        finished = len(studies.completed(st))
        # Measured allocation -> (trial number, scores, perplexity), to answer repeats.
        evaluated = {
            job_key(tuple(t.user_attrs["formats"].items())): (t.number, t.user_attrs, t.values[1])
            for t in studies.completed(st)
        }
        in_flight: dict[int, Any] = {}
        bar = tqdm(
            total=trials,
            initial=min(finished, trials),
            desc=f"search {study}",
            unit="trial",
            disable=not progress,
        )
        study_id = store.get_study_id_from_name(study)
        try:
            while finished + len(in_flight) < trials or in_flight:
                # Counted from the storage, not from this process's own tells: another search
                # on the same study (a second machine, a second --resume) finishes trials too,
                # and `trials` is what the study should hold, not what each process adds.
                finished = store.get_n_trials(study_id, state=optuna.trial.TrialState.COMPLETE)
                bar.n = min(finished, trials)
                while finished + len(in_flight) < trials and pool.pending < pool.capacity:
                    trial = st.ask()
                    # Tracked from the moment it exists, so an interrupt at any point below
                    # fails it rather than leaving it RUNNING.
                    in_flight[trial.number] = trial
                    try:
                        assignment = {
                            u.name: trial.suggest_categorical(u.name, choices[u.name])
                            for u in prep.units
                        }
                        trial.set_user_attr("source", trial.user_attrs.get("source", "sampler"))
                        trial.set_user_attr("owner", owner)
                        trial.set_user_attr("formats", assignment)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        # SQLite cannot lock a row, so two searches on one study can both pop
                        # the same queued trial; the other one has finished it already.
                        del in_flight[trial.number]
                        continue
                    job = tuple(assignment.items())
                    twin = evaluated.get(job_key(job))
                    if twin is not None:
                        # A repeat of a measured allocation: its values are known already.
                        number, scores, ppl = twin
                        # Kept in flight until told, so that an interrupt during the tell
                        # still fails the trial rather than leaving it RUNNING.
                        told = _tell(st, trial, scores, ppl, costs, assignment, duplicate_of=number)
                        del in_flight[trial.number]
                        if told:
                            finished += 1
                            bar.update(1)
                        continue
                    pool.submit(trial.number, job)
                if not in_flight:
                    continue
                number, job, result = pool.wait()
                evaluations += 1
                trial = in_flight[number]
                assignment = dict(job)
                ppl = math.exp(result["loss"])
                told = _tell(st, trial, result, ppl, costs, assignment)
                del in_flight[number]
                if not told:
                    continue
                evaluated[job_key(job)] = (number, result, ppl)
                finished += 1
                bar.update(1)
                bar.set_postfix(ppl=f"{ppl:.2f}", bits=f"{costs.avg_bits(assignment):.3f}")
        except BaseException:
            # Ctrl-C or a failure: the trials in flight are failed and queued again, so that
            # --resume evaluates them; every finished trial is already stored.
            pool.cancel()
            for number, trial in in_flight.items():
                if st.trials[number].state != optuna.trial.TrialState.RUNNING:
                    continue  # told just before the interrupt
                st.tell(number, state=optuna.trial.TrialState.FAIL)
                if len(trial.params) == len(prep.units):
                    st.enqueue_trial(
                        dict(trial.params),
                        user_attrs={
                            "source": trial.user_attrs.get("source", "sampler"),
                            "retry_of": number,
                        },
                    )
            raise
        finally:
            bar.close()

    result = _finish(
        st,
        prep,
        costs,
        seeds,
        method,
        run_dir,
        url,
        float(avg_bits),
        ev,
        {
            "evaluations": evaluations,
            "recovered": recovered,
            "wall_time_s": time.perf_counter() - start_time,
        },
    )
    close_storage(store)
    return result


def _resolve(
    model: Any,
    config: AllocateConfig | float | None,
    search_config: SearchConfig | None,
    overrides: dict[str, Any],
) -> tuple[AllocateConfig, SearchConfig, Profile | None]:
    """The validated allocation and search configurations, and a profile held in memory."""
    config, flat = call_arguments(model, config, overrides)
    profile = flat.pop("profile") if isinstance(flat.get("profile"), Profile) else None
    if config is None and "avg_bits" not in flat:
        raise BitallocError(SEARCH_NO_BUDGET)
    own = {k: flat.pop(k) for k in list(flat) if k in SEARCH_FLAT_FIELDS}
    base = (search_config or SearchConfig()).model_dump()
    options = SearchConfig.build({**base, **own})
    shared = {k: flat.pop(k) for k in list(flat) if k in SEARCH_SHARED}
    check_known(flat, {}, "search()", also=SEARCH_SHARED + tuple(SEARCH_FLAT_FIELDS))
    if config is None:
        config = AllocateConfig.from_flat(**shared)
    elif shared:
        config = config.with_flat(**shared)
    if config.target.avg_bits is None:
        raise BitallocError(SEARCH_NO_BUDGET)
    search_flat(config, options)  # refuses allocation options the search does not use
    return config, options, profile


def _tell(
    st: Any,
    trial: Any,
    scores: Mapping[str, Any],
    ppl: float,
    costs,
    assignment,
    duplicate_of: int | None = None,
) -> bool:
    """Store a measured trial; False when another search on the study finished it first
    (both popped the same queued trial), in which case its stored result stands.

    On SQLite, which cannot lock a row, the check and the tell run under an exclusive lock on
    a file beside the database (:func:`tell_lock`), so that two searches never both tell one
    trial; other storages refuse the second tell themselves."""
    import optuna

    lock = tell_lock(st)
    if lock is None:
        return _store(st, trial, scores, ppl, costs, assignment, duplicate_of, optuna)
    with _exclusive(lock):
        if st.trials[trial.number].state.is_finished():
            return False
        return _store(st, trial, scores, ppl, costs, assignment, duplicate_of, optuna)


def tell_lock(st: Any) -> Path | None:
    """The lock file of a study on SQLite (``<database>.tell.lock``), else None."""
    storage = getattr(st, "_storage", None)
    storage = getattr(storage, "_backend", storage)
    url = getattr(storage, "url", None)
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///") :]).expanduser().with_suffix(".tell.lock")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store(st, trial, scores, ppl, costs, assignment, duplicate_of, optuna) -> bool:
    try:
        if duplicate_of is not None:
            trial.set_user_attr("duplicate_of", duplicate_of)
        trial.set_user_attr("loss", scores.get("loss"))
        trial.set_user_attr("kl", scores.get("kl"))
        trial.set_user_attr("predicted_loss", costs.predicted(assignment))
        st.tell(trial, [costs.avg_bits(assignment), ppl])
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    except ValueError:
        # Optuna says "Cannot tell a COMPLETE trial" when the other search told it between
        # our attributes and our tell.
        if st.trials[trial.number].state.is_finished():
            return False
        raise
    return True


def _finish(st, prep, costs, seeds, method, run_dir, url, budget, ev, run_info) -> SearchResult:
    """Summarise the study, write the run directory's files and return the result."""
    from bitalloc.planning import Frontier, FrontierPoint

    trials = studies.completed(st)
    front = studies.pareto_front([tuple(t.values) for t in trials])
    pareto = [(trials[i].number, trials[i].values[0], trials[i].values[1]) for i in front]
    fp16 = float(st.user_attrs["fp16_perplexity"])
    uniform = dict(st.user_attrs["uniform"])
    tokens = int(ev.shape[0] * (ev.shape[1] - 1))
    best_trial = studies.best_within(trials, budget)
    best = None
    if best_trial is not None:
        fmt = {f.name: f for f in prep.palette}
        formats = best_trial.user_attrs["formats"]
        best = Allocation.from_choices(
            model=prep.loaded.source,
            budget=budget,
            units=[
                UnitChoice.of(u, fmt[formats[u.name]], costs.unit_loss(u.name, formats[u.name]))
                for u in prep.units
            ],
            excluded=excluded_parameters(prep.model, prep.units),
        )
        best = prep.recorded(best)
        fp16_bits = uniform_avg_bits(prep.units, "fp16")
        best = best.with_measured(
            Measured(
                perplexity=best_trial.values[1],
                baselines={**{k: v["perplexity"] for k, v in uniform.items()}, "fp16": fp16},
                baseline_avg_bits={
                    **{k: v["avg_bits"] for k, v in uniform.items()},
                    "fp16": fp16_bits,
                },
                eval_tokens=tokens,
                seq_len=int(ev.shape[1]),
                measured_loss_increase=math.log(best_trial.values[1]) - math.log(fp16),
                predicted_loss_increase=float(best.data.predicted_loss or 0.0),
            )
        )
        best.save(run_dir / BEST_FILE)
    by_source = {t.user_attrs.get("source"): t for t in trials}
    seed_rows = []
    points = []
    for source, target, alloc in seeds:
        measured = by_source.get(source)
        ppl = None if measured is None else measured.values[1]
        points.append(FrontierPoint(target, alloc, ppl))
        seed_rows.append(
            {
                "source": source,
                "avg_bits": alloc.avg_bits,
                "predicted_loss": alloc.data.predicted_loss,
                "perplexity": ppl,
            }
        )
    frontier = Frontier(tuple(points), method, (), fp16)
    write_json_atomic(run_dir / FRONTIER_FILE, frontier.to_json())
    result = SearchResult(
        study_name=st.study_name,
        storage=url,
        run_dir=run_dir,
        budget=budget,
        best=best,
        best_trial=None if best_trial is None else best_trial.number,
        pareto=pareto,
        trials_completed=len(trials),
        fp16_perplexity=fp16,
        uniform=uniform,
        seeds=seed_rows,
        **run_info,
    )
    write_json_atomic(
        run_dir / SEARCH_FILE,
        {
            "storage": url,
            "study": st.study_name,
            "budget": budget,
            "status": "finished",
            "trials_completed": result.trials_completed,
            "evaluations": result.evaluations,
            "wall_time_s": result.wall_time_s,
            "best": None
            if best is None
            else {
                "trial": result.best_trial,
                "avg_bits": best.avg_bits,
                "perplexity": best.measured.perplexity,
            },
            "pareto": [{"trial": n, "avg_bits": b, "perplexity": p} for n, b, p in result.pareto],
            "fp16_perplexity": fp16,
            "uniform": uniform,
            "seeds": seed_rows,
        },
    )
    return result


def _measure_baselines(st: Any, pool: Any, prep: Prepared, budget: float, progress: bool) -> int:
    """Measure the unquantized model and uniform baselines once per study (kept in its
    attributes); returns the evaluations run."""
    if "fp16_perplexity" in st.user_attrs and "uniform" in st.user_attrs:
        return 0
    jobs = {"fp16": ()}
    for fmt in baseline_formats(prep.units, prep.palette, budget):
        if not fmt.is_float:
            jobs[fmt.name] = tuple(uniform_assignment(prep.units, fmt).items())
    results = {}
    with tqdm(total=len(jobs), desc="baselines", unit="job", disable=not progress) as bar:
        for name, _, result in run_all(pool, list(jobs.items())):
            results[name] = math.exp(result["loss"])
            bar.update(1)
    uniform = {
        name: {"avg_bits": uniform_avg_bits(prep.units, name), "perplexity": ppl}
        for name, ppl in results.items()
        if name != "fp16"
    }
    st.set_user_attr("uniform", uniform)
    st.set_user_attr("fp16_perplexity", results["fp16"])
    return len(jobs)
