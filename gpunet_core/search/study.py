"""The hardware-aware search: an Optuna multi-objective study over :mod:`.space`.

Objectives: proxy top-1 (:mod:`.proxy`) up, measured latency (:mod:`.measure`) down, with the
hard constraint ``latency <= budget_ms`` given to the sampler (constrained TPE by default,
NSGA-II on request). A candidate over the budget is measured, never trained. The study's
storage is how work is shared: an sqlite file by default, PostgreSQL on a cluster; every
worker (a process here, a KFP task there) runs :func:`run_worker` against the same study, and
the measured latencies live in the study too, so no worker measures a spec another has.
A killed worker's running trial goes stale (no heartbeat) and is retried once with the same
architecture; finished trials are never repeated.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from gpunet_core.data.prepare import read_manifest
from gpunet_core.inference.tensorrt import tensorrt_unavailable_reason
from gpunet_core.search.measure import hardware_key, measure_latency, model_cost
from gpunet_core.search.proxy import ProxyConfig, ProxyData, train_proxy
from gpunet_core.search.space import SearchSpace, fits_resolution, load_space, spec_hash
from gpunet_core.utils.errors import GpunetError

_logger = logging.getLogger(__name__)

SEARCH_BACKENDS = ("onnxruntime", "torch", "tensorrt", "trtexec")
SEARCH_PRECISIONS = ("fp32", "fp16", "int8")
SAMPLERS = ("tpe", "nsga2")
MAX_FAILURES = 3  # consecutive failed trials of one worker that stop it
DEFAULT_STUDY = "gpunet-search"
# storage URL a cluster task reads (manifests: the optuna database's Secret)
STORAGE_ENV = "GPUNET_SEARCH_STORAGE"
# a study's settings that must not change when it is resumed: trials would not compare
_FIXED = ("data", "backend", "precision", "batch", "resolutions", "families", "space_hash",
          "budget_ms", "proxy")


class SearchError(GpunetError):
    """A search request that cannot run (budget, backend, storage, a changed study)."""


@dataclass(frozen=True)
class SearchConfig:
    """One search: what to measure on, the budget, how many trials, where the study lives."""

    data: str
    out: str
    budget_ms: float
    backend: str = "onnxruntime"
    precision: str = "fp32"
    batch: int = 1
    trials: int = 20
    workers: int = 1
    storage: str | None = None  # default: sqlite file <out>/study.db
    study_name: str = DEFAULT_STUDY
    resolutions: tuple[int, ...] | None = None  # default: the space's grid
    families: tuple[str, ...] | None = None  # default: all of the space's
    space: str | None = None  # a search-space YAML (default: the packaged one)
    sampler: str = "tpe"
    seed: int = 0
    iterations: int = 50  # latency: timed runs per candidate
    threads: int | None = None  # latency: ONNX Runtime / torch intra-op threads
    references: bool = True  # measure NVIDIA's seven published GPUNets the same way
    heartbeat_s: int = 20  # a running trial silent for 2x this is stale (its worker died)
    prune_margin: float = 2.0  # points: prune when a faster finished trial was this far ahead
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"


def redact(url: str) -> str:
    """The URL without its password (for messages and pareto.json)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def check_config(cfg: SearchConfig, space: SearchSpace) -> None:
    """Refuse a request that cannot run, before any measurement or training."""
    if cfg.backend not in SEARCH_BACKENDS:
        raise SearchError(f"unknown --backend {cfg.backend!r}: use one of "
                          f"{', '.join(SEARCH_BACKENDS)}")
    if cfg.backend in ("tensorrt", "trtexec"):
        reason = (None if shutil.which("trtexec") else "trtexec is not on PATH") \
            if cfg.backend == "trtexec" else tensorrt_unavailable_reason()
        if reason:
            raise SearchError(f"--backend {cfg.backend} cannot measure here: {reason}; run the "
                              "search on a GPU node, or use --backend onnxruntime")
    if cfg.precision not in SEARCH_PRECISIONS:
        raise SearchError(f"unknown --precision {cfg.precision!r}: use one of "
                          f"{', '.join(SEARCH_PRECISIONS)}")
    if cfg.precision == "fp16" and cfg.backend == "onnxruntime":
        _logger.warning("fp16 graphs on the ONNX Runtime CPU provider run no faster than fp32")
    if not cfg.budget_ms > 0 or cfg.budget_ms == float("inf"):
        raise SearchError(f"--budget-ms must be a positive number of milliseconds, got "
                          f"{cfg.budget_ms}")
    for name, low in (("trials", 1), ("workers", 1), ("batch", 1), ("iterations", 5),
                      ("heartbeat_s", 1)):
        if getattr(cfg, name) < low:
            raise SearchError(f"--{name.replace('_', '-')} must be >= {low}, got "
                              f"{getattr(cfg, name)}")
    if cfg.sampler not in SAMPLERS:
        raise SearchError(f"unknown --sampler {cfg.sampler!r}: use {' or '.join(SAMPLERS)}")
    for family in cfg.families or ():
        if family not in space.families:
            raise SearchError(f"unknown --family {family!r}: the space has "
                              f"{', '.join(space.families)}")
    for size in cfg.resolutions or ():
        if not 16 <= size <= 2048:
            raise SearchError(f"--img-size must be in [16, 2048] pixels, got {size}")
    cfg.proxy.check()


# ------------------------------------------------------------------ storage and the study


def quiet_optuna() -> None:
    """Optuna flags heartbeats, grouped TPE and its retry callback as experimental: used on
    purpose, so those warnings are noise in every worker's log."""


    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# what a database says when another process created the same schema a moment earlier
_SCHEMA_RACE = ("already exists", "duplicate", "unique constraint")


def open_storage(cfg: SearchConfig, attempts: int = 5):
    """The study's RDB storage, with heartbeats and one retry of a dead worker's trial.

    Workers started at once on a new database each create Optuna's tables; the loser of that
    race gets "table ... already exists" and opens the storage again, finding them made."""

    quiet_optuna()
    url = cfg.storage_url
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": 60}}
                    if url.startswith("sqlite")
                    else {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
                    heartbeat_interval=cfg.heartbeat_s, grace_period=2 * cfg.heartbeat_s,
                    heartbeat_stale_trial_callback=optuna.storages
                    .RetryHeartbeatStaleTrialCallback(max_retry=1))
            except sqlalchemy.exc.DatabaseError as exc:
                if attempt == attempts or not any(m in str(exc).lower() for m in _SCHEMA_RACE):
                    raise
                time.sleep(0.2 * attempt)
    except ImportError as exc:
        raise SearchError(f"cannot open the study storage {redact(url)}: its database driver "
                          f"is not installed ({exc}); for PostgreSQL `pip install "
                          "psycopg[binary]` (the cluster images have it)") from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"cannot open the study storage {redact(url)}: {first}; check "
                          "--storage (sqlite:///PATH or postgresql://USER:PASS@HOST/DB) and "
                          "that the database is reachable") from None


def _sampler(cfg: SearchConfig):

    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, cfg.trials // 3)),
                                             seed=cfg.seed)
    return optuna.samplers.TPESampler(n_startup_trials=max(3, min(10, cfg.trials // 3)),
                                      multivariate=True, group=True, seed=cfg.seed)


def data_identity(data: str | Path) -> str:
    """The dataset a study is tied to: its manifest checksum, so that the same prepared dataset
    at another path (a re-prepared or copied one) resumes the study; else its path."""
    manifest = read_manifest(data)
    return f"sha256:{manifest['checksum']}" if manifest and manifest.get("checksum") \
        else str(data)


def settings(cfg: SearchConfig, space: SearchSpace) -> dict[str, Any]:
    """What the study was created with (stored in it; a resume must match)."""
    return {"data": data_identity(cfg.data), "backend": cfg.backend, "precision": cfg.precision,
            "batch": cfg.batch, "resolutions": list(cfg.resolutions or space.resolution.values()),
            "families": list(cfg.families or space.families),
            "space_hash": hashlib.sha256(Path(space.source).read_bytes()).hexdigest()[:16],
            "budget_ms": cfg.budget_ms, "proxy": asdict(cfg.proxy)}


def open_study(cfg: SearchConfig, space: SearchSpace, storage=None):
    """Create the study, or load it and check it was made with the same settings."""

    storage = storage or open_storage(cfg)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name,
                                directions=["maximize", "minimize"], sampler=_sampler(cfg),
                                load_if_exists=True)
    wanted = settings(cfg, space)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", wanted)
    else:
        changed = [k for k in _FIXED if stored.get(k) != wanted.get(k)]
        if changed:
            raise SearchError(
                f"study {cfg.study_name!r} in {redact(cfg.storage_url)} was created with other "
                f"settings ({', '.join(f'{k}: {stored.get(k)!r} now {wanted.get(k)!r}' for k in changed)}); "
                "resume it with its own settings or pass a new --study-name")
    return study


class StudyCache:
    """Measured latencies kept in the study's own storage, shared by all of its workers."""

    def __init__(self, study):
        self.study = study

    def get(self, key: str) -> dict[str, Any] | None:
        return self.study.user_attrs.get(f"latency:{key}")

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.study.set_user_attr(f"latency:{key}", value)


class TrialChooser:
    """The space's choices, asked of an Optuna trial (its parameters are the point)."""

    def __init__(self, trial):
        self.trial = trial

    def choice(self, name: str, options: list[Any]) -> Any:
        return self.trial.suggest_categorical(name, options)

    def integer(self, name: str, low: int, high: int, step: int = 1) -> int:
        return self.trial.suggest_int(name, low, high, step=step)


# ------------------------------------------------------------------ evaluating a candidate


class Pruned(Exception):
    """Raised from the proxy's epoch hook: the candidate is dominated already."""


def _dominated(study, trial_number: int, epoch: int, top1: float, latency: float,
               margin: float) -> int | None:
    """A finished trial at most as slow whose top-1 at ``epoch`` was ``margin`` points
    higher, or None. (Optuna's pruners are single-objective; this is the Pareto version of
    the median rule.)"""

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        curve = other.user_attrs.get("epoch_top1") or []
        if (other.number != trial_number and other.user_attrs.get("constraint", 1.0) <= 0
                and other.user_attrs.get("latency_ms", float("inf")) <= latency
                and len(curve) > epoch and curve[epoch] >= top1 + margin):
            return other.number
    return None


def evaluate(spec: list[dict[str, Any]], cfg: SearchConfig, data: ProxyData, cache,
             hardware: str, *, record=None, on_epoch=None, name: str = "candidate"
             ) -> dict[str, Any]:
    """Cost, measured latency and (within the budget) proxy top-1 of one architecture.

    ``record(facts)`` sees the cost and latency before training starts;
    ``on_epoch(epoch, top1, latency_ms)`` may raise :class:`Pruned`.
    """
    facts = {"spec_hash": spec_hash(spec), **model_cost(spec)}
    latency = measure_latency(spec, backend=cfg.backend, precision=cfg.precision,
                              batch=cfg.batch, iterations=cfg.iterations, threads=cfg.threads,
                              calib_data=Path(cfg.data) / "train" if cfg.precision == "int8"
                              else None, cache=cache, hardware=hardware, name=name)
    facts.update(latency_ms=latency["latency_ms"], latency_cached=latency["cached"],
                 constraint=latency["latency_ms"] - cfg.budget_ms)
    if record is not None:
        record(facts)
    if facts["constraint"] > 0:
        return {**facts, "top1": None, "skipped": "over the latency budget: not trained"}
    hook = None if on_epoch is None else (
        lambda epoch, top1: on_epoch(epoch, top1, facts["latency_ms"]))
    proxy = train_proxy(spec, data, cfg.proxy, on_epoch=hook)
    return {**facts, "top1": proxy["top1"], "epoch_top1": proxy["epoch_top1"],
            "proxy_seconds": proxy["seconds"]}


def _objective(cfg: SearchConfig, space: SearchSpace, data: ProxyData, cache, hardware: str):

    def objective(trial) -> tuple[float, float]:
        spec = space.sample(TrialChooser(trial), num_classes=data.num_classes,
                            resolutions=list(cfg.resolutions) if cfg.resolutions else None,
                            families=list(cfg.families) if cfg.families else None)
        trial.set_user_attr("spec", spec)
        why = fits_resolution(spec)
        if why:
            trial.set_user_attr("pruned", f"does not fit: {why}")
            raise optuna.TrialPruned(why)

        def record(facts: dict[str, Any]) -> None:
            for key, value in facts.items():
                trial.set_user_attr(key, value)
            # the sampler's hard constraint: feasible when <= 0
            trial.set_constraint("latency_over_budget_ms", facts["constraint"])

        curve: list[float] = []

        def on_epoch(epoch: int, top1: float, latency_ms: float) -> None:
            curve.append(top1)
            trial.set_user_attr("epoch_top1", curve)
            if epoch + 1 < cfg.proxy.epochs:
                better = _dominated(trial.study, trial.number, epoch, top1, latency_ms,
                                    cfg.prune_margin)
                if better is not None:
                    raise Pruned(f"trial {better} was as fast and {cfg.prune_margin:g}+ points "
                                 f"ahead after epoch {epoch + 1}")

        try:
            result = evaluate(spec, cfg, data, cache, hardware, record=record,
                              on_epoch=on_epoch, name=f"trial-{trial.number}")
        except Pruned as exc:
            trial.set_user_attr("pruned", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except Exception as exc:  # kept with the trial: the worker reports it
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        if result["top1"] is None:
            trial.set_user_attr("skipped", result["skipped"])
            return 0.0, result["latency_ms"]
        trial.set_user_attr("proxy_seconds", result["proxy_seconds"])
        return result["top1"], result["latency_ms"]

    return objective


def counted_trials(study) -> int:
    """Trials that count toward ``--trials``: finished, pruned, running or queued (a dead
    worker's failed trial does not: its retry does)."""

    return len(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)))


def _threads(cfg: SearchConfig) -> int:
    return max(1, (os.cpu_count() or 1) // cfg.workers)


def run_worker(cfg: SearchConfig, worker: int = 0, progress=None) -> int:
    """Run trials of the shared study until it holds ``cfg.trials``; returns how many this
    worker ran. Any number of workers, on any machines, may run this against one storage.
    ``progress(finished)`` is called after each trial."""
    import torch

    torch.set_num_threads(_threads(cfg))
    space = load_space(cfg.space)
    study = open_study(replace(cfg, seed=cfg.seed + worker), space)
    data = ProxyData.load(cfg.data, proxy_resolution(cfg, space), cfg.proxy)
    objective = _objective(cfg, space, data, StudyCache(study), hardware_key(cfg.backend,
                                                                               cfg.batch))
    ran = failures = 0
    while counted_trials(study) < cfg.trials or _dead_trials_requeued(study, cfg):
        # a candidate that breaks the exporter or the runtime fails alone, not the search
        mine: list = []
        study.optimize(objective, n_trials=1, catch=(Exception,),
                       callbacks=[lambda _study, trial, box=mine: box.append(trial)])
        ran += 1
        if not mine:
            continue
        last = mine[-1]
        failures = failures + 1 if last.state.name == "FAIL" else 0
        if failures >= MAX_FAILURES:
            reason = last.user_attrs.get("error", "see the log above")
            raise SearchError(f"{MAX_FAILURES} trials in a row failed, the last (trial "
                              f"{last.number}) with {reason}; the study keeps what finished")
        if progress is not None:
            progress(finished_trials(study))
    return ran


def _dead_trials_requeued(study, cfg: SearchConfig) -> bool:
    """Whether a dead worker's trial was put back in the queue: run it before stopping.

    A killed worker's trial stays RUNNING, and counted, until its heartbeat is older than
    the grace period, which Optuna checks only when a trial starts; so a resumed search
    whose count is already reached would stop with the trial never retried. Wait for the
    running trials one grace period (sqlite stamps heartbeats to the second, hence the
    extra second); live workers' trials finish or keep beating, dead ones go stale.
    """
    deadline = time.monotonic() + 2 * cfg.heartbeat_s + 1.5
    while True:
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(min(1.0, cfg.heartbeat_s / 2))
        optuna.storages.fail_stale_trials(study)


def finished_trials(study) -> int:

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                        TrialState.PRUNED)))


def proxy_resolution(cfg: SearchConfig, space: SearchSpace) -> int:
    sizes = cfg.resolutions or tuple(space.resolution.values())
    if len(set(sizes)) != 1:
        raise SearchError("the accuracy proxy trains at one resolution: pass one --img-size "
                          f"(got {list(sizes)})")
    return sizes[0]


def _worker_main(cfg: SearchConfig, worker: int) -> None:
    try:
        run_worker(cfg, worker)
    except GpunetError as exc:
        _logger.error("search worker %d: %s", worker, exc)
        raise SystemExit(2) from None


def check_budget(cfg: SearchConfig, space: SearchSpace, study, data_classes: int) -> dict:
    """The fastest point of each family measured: a budget below all of them is refused."""
    hardware = hardware_key(cfg.backend, cfg.batch)
    size = min(cfg.resolutions or space.resolution.values())
    fastest = {}
    for family in cfg.families or space.families:
        spec = space.smallest(family, num_classes=data_classes, resolution=size)
        fastest[family] = measure_latency(spec, backend=cfg.backend, precision=cfg.precision,
                                          batch=cfg.batch, iterations=cfg.iterations,
                                          threads=cfg.threads, cache=StudyCache(study),
                                          calib_data=Path(cfg.data) / "train"
                                          if cfg.precision == "int8" else None,
                                          hardware=hardware, name=f"smallest-{family}")
    best = min(v["latency_ms"] for v in fastest.values())
    if best > cfg.budget_ms:
        raise SearchError(f"--budget-ms {cfg.budget_ms:g} is below anything this space can "
                          f"reach on {cfg.backend}: its fastest spec ({size} px, batch "
                          f"{cfg.batch}) measured {best:.3f} ms; raise the budget or lower "
                          "--img-size")
    return {k: v["latency_ms"] for k, v in fastest.items()}


def spawn_workers(cfg: SearchConfig, progress=None) -> None:
    """``cfg.workers`` processes running :func:`run_worker` on the study; ``progress(n)``
    is called with the study's finished count while they run."""
    if cfg.workers == 1:
        run_worker(cfg, progress=progress)
        return
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_main, args=(cfg, i), daemon=False)
             for i in range(cfg.workers)]
    for proc in procs:
        proc.start()
    study = open_study(cfg, load_space(cfg.space))
    try:
        while any(p.is_alive() for p in procs):
            if progress is not None:
                progress(finished_trials(study))
            time.sleep(1.0)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    failed = [i for i, p in enumerate(procs) if p.exitcode]
    if failed:
        raise SearchError(f"search worker(s) {failed} failed (exit codes "
                          f"{[procs[i].exitcode for i in failed]}); see the log above. The "
                          "study keeps what finished: rerun the same command to resume")
