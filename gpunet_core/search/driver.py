"""``gpunet search`` end to end: check the request, measure the budget's floor and NVIDIA's
seven GPUNets, run the workers on the shared study, write the Pareto front."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
from tqdm import tqdm

from gpunet_core.data.cache import local_dataset
from gpunet_core.data.folder import open_image_folder
from gpunet_core.models.spec import MODEL_INFO, spec_json
from gpunet_core.search import study as studies
from gpunet_core.search.measure import hardware_key
from gpunet_core.search.proxy import ProxyData
from gpunet_core.search.results import write_results
from gpunet_core.search.space import fits_resolution, load_space
from gpunet_core.search.study import SearchConfig, SearchError
from gpunet_core.utils.files import check_output_dir, remove_new_dirs_on_error

_logger = logging.getLogger(__name__)


def reference_spec(name: str, img_size: int, num_classes: int) -> list[dict[str, Any]]:
    """A published GPUNet at the search's resolution and class count."""
    spec = spec_json(name)
    spec[0]["img_resolution"] = img_size
    spec[-1]["num_classes"] = num_classes
    return spec


def measure_references(cfg: SearchConfig, study, data: ProxyData) -> list[dict[str, Any]]:
    """NVIDIA's seven GPUNets at the search resolution: latency measured and proxy trained
    exactly as the candidates (kept in the study, so a resumed search skips them)."""
    cache = studies.StudyCache(study)
    hardware = hardware_key(cfg.backend, cfg.batch)
    rows = []
    for name, info in MODEL_INFO.items():
        key = f"reference:{name}"
        row = study.user_attrs.get(key)
        if row is None:
            spec = reference_spec(name, data.img_size, data.num_classes)
            why = fits_resolution(spec)
            if why:
                row = {"name": name, "display": info["display"], "skipped": why,
                       "latency_ms": None, "proxy_top1": None}
            else:
                _logger.info("measuring %s the same way as the candidates", info["display"])
                result = studies.evaluate(spec, studies_unbudgeted(cfg), data, cache, hardware,
                                          name=name)
                row = {"name": name, "display": info["display"],
                       "latency_ms": result["latency_ms"], "proxy_top1": result["top1"],
                       "epoch_top1": result["epoch_top1"], "params": result["params"],
                       "gmacs": result["gmacs"],
                       "within_budget": result["latency_ms"] <= cfg.budget_ms}
            study.set_user_attr(key, row)
        rows.append(row)
    return rows


def studies_unbudgeted(cfg: SearchConfig) -> SearchConfig:
    """References are trained whatever their latency (they are drawn beside the front)."""

    return replace(cfg, budget_ms=float("inf"))


def num_classes(data: str) -> int:
    root = local_dataset(data, progress=False)
    return len(open_image_folder(root / "train").classes)


@contextmanager
def new_study_removed_on_error(cfg: SearchConfig) -> Iterator[bool]:
    """A study this block creates is deleted again when the block fails (a refused budget
    leaves nothing behind), and so is the default sqlite file it made."""

    db = Path(cfg.storage_url.removeprefix("sqlite:///")) if cfg.storage is None else None
    db_existed = db is not None and db.exists()
    storage = studies.open_storage(cfg)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage,
                                                                 include_best_trial=False)}
    created = cfg.study_name not in names
    try:
        yield created
    except BaseException:
        if created:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=cfg.study_name, storage=storage)
            if db is not None and not db_existed:
                storage.engine.dispose()
                db.unlink(missing_ok=True)
        raise


def open_checked_study(cfg: SearchConfig, space) -> tuple[Any, dict[str, float], bool, int]:
    """Open (or create) the study and refuse a budget below the space's fastest spec, removing
    a study made here when refused: ``(study, fastest ms per family, created, classes)``.
    ``gpunet search`` and the pipeline's setup task both start here."""
    classes = num_classes(cfg.data)
    with new_study_removed_on_error(cfg) as created:
        study = studies.open_study(cfg, space)  # an unreachable storage fails here, first
        fastest = studies.check_budget(cfg, space, study, classes)
    return study, fastest, created, classes


def search(cfg: SearchConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) the search ``cfg`` and write its results under ``cfg.out``."""
    space = load_space(cfg.space)
    studies.check_config(cfg, space)
    check_output_dir(cfg.out, "--out")
    size = studies.proxy_resolution(cfg, space)
    with remove_new_dirs_on_error(cfg.out):
        study, fastest, created, _ = open_checked_study(cfg, space)
    if created:
        _logger.info("created study %s in %s", cfg.study_name, studies.redact(cfg.storage_url))
    data = ProxyData.load(cfg.data, size, cfg.proxy)  # also refuses a one-class dataset
    references = measure_references(cfg, study, data) if cfg.references else []
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        bar = tqdm(total=cfg.trials, desc="search trials", unit="trial",
                   initial=min(cfg.trials, studies.finished_trials(study)))

    def report(done: int) -> None:
        if bar is not None:
            bar.n = min(done, cfg.trials)
            bar.refresh()

    try:
        studies.spawn_workers(cfg, progress=report)
    finally:
        if bar is not None:
            bar.close()
    study = studies.open_study(cfg, space)
    summary = {"study": cfg.study_name, "storage": studies.redact(cfg.storage_url),
               "data": str(cfg.data), "backend": cfg.backend, "precision": cfg.precision,
               "batch": cfg.batch, "img_size": size, "budget_ms": cfg.budget_ms,
               "hardware": hardware_key(cfg.backend, cfg.batch),
               "trials_counted": studies.counted_trials(study),
               "fastest_in_space_ms": fastest, "proxy": asdict(cfg.proxy),
               "sampler": cfg.sampler}
    return write_results(cfg.out, study, summary, references)


__all__ = ["SearchConfig", "SearchError", "search"]
