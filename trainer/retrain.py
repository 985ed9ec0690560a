"""Scheduled retraining: mine, train, evaluate on a fixed held-out manifest, promote only if not worse.

Configured by ``retrain`` in the node's config (:class:`dicomnode.config.RetrainConfig`; off by default):
``cron`` (APScheduler crontab), ``keywords`` (mined before each run), ``train_labels`` (labels files the
candidate is trained on, plus what the mining produced), ``held_out_labels`` (the fixed manifest the
candidate and the current model are compared on) and ``out_dir`` (one folder per run, plus
``retrain_history.jsonl``).

:func:`retrain_once` is one run, testable without the scheduler; :func:`run_scheduler` blocks and runs it
on the cron (``dicomnode retrain``). The node itself never imports the trainer: the retrainer is its own
process and hands a model over through ``promote`` (an atomic file replace at ``model.path``).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from dicomnode.config import Config, ConfigError

log = logging.getLogger("trainer.retrain")

HISTORY = "retrain_history.jsonl"


def _check(cfg: Config) -> None:
    r = cfg.retrain
    if not r.held_out_labels:
        raise ConfigError("config key 'retrain.held_out_labels': a fixed held-out labels file is needed")
    if not Path(r.held_out_labels).is_file():
        raise ConfigError(f"config key 'retrain.held_out_labels': file {r.held_out_labels!r} not found")
    if not r.train_labels and not r.keywords:
        raise ConfigError("config key 'retrain.train_labels': no training labels and no mining keywords")
    for i, p in enumerate(r.train_labels):
        if not Path(p).is_file():
            raise ConfigError(f"config key 'retrain.train_labels[{i}]': file {p!r} not found")


def out_root(cfg: Config) -> Path:
    """Folder of the retraining runs: ``retrain.out_dir``, else ``<data_dir>/retrain``."""
    return Path(cfg.retrain.out_dir).expanduser() if cfg.retrain.out_dir else cfg.resolved_data_dir / "retrain"


def mine_keywords(cfg: Config) -> list[str]:
    """Mine ``retrain.keywords`` from ``mining.pacs`` into ``<out_dir>/mined``; returns the manifest(s) made.

    Runs :func:`trainer.mine.mine` (one folder for every run, so a rerun fetches only what it lacks and
    keeps the same pseudonyms). Without keywords nothing is mined.
    """
    keywords = list(cfg.retrain.keywords)
    if not keywords:
        return []
    from trainer.mine import MineOptions, mine

    result = mine(cfg, MineOptions(keywords=keywords, out_dir=out_root(cfg) / "mined", progress=False))
    for warning in result.warnings:
        log.warning("mining: %s", warning)
    return [str(result.manifest)] if result.manifest is not None else []


def _summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {"n": metrics["n"], "error": metrics["error"], "mean_auc": metrics["mean_auc"],
            "accuracy": metrics["accuracy"], "model_version": metrics.get("model_version")}


def retrain_once(cfg: Config, config_path: str | Path | None = None, train_overrides: dict[str, Any] | None = None,
                 tolerance: float = 0.0, now: datetime | None = None,
                 train_fn: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One retraining run; returns (and writes to ``<run>/retrain_report.json``) what happened.

    Steps: mine the keywords (if any), train a candidate (:func:`trainer.train.train` with
    ``train_overrides`` applied to its settings), evaluate the candidate and the current model
    (``model.path``, else the shipped default; none = nothing to beat) on ``retrain.held_out_labels``,
    and promote the candidate only when it is not worse (:func:`trainer.evaluate.is_not_worse`: error not
    higher, mean AUC not lower, within ``tolerance``). Promotion writes to ``model.path``; when that is
    empty the config file ``config_path`` records the new path (without one, the run does not promote).
    ``train_fn`` replaces :func:`trainer.train.train` (same contract: settings in, report out, the best
    checkpoint written to ``<settings.out>/model.pt``).
    """
    _check(cfg)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    run_dir = out_root(cfg) / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    result: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "run_dir": str(run_dir), "promoted": False}
    try:
        return _run(cfg, config_path, train_overrides, tolerance, train_fn, run_dir, result)
    except Exception as exc:
        # A failed run (PACS down, broken labels, training error) is recorded, then raised to the caller.
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["reason"] = "run failed"
        _finish(cfg, run_dir, result)
        raise


def _run(cfg: Config, config_path: str | Path | None, train_overrides: dict[str, Any] | None, tolerance: float,
         train_fn: Callable[[Any], dict[str, Any]] | None, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    from dicomnode.classification.model import load_model
    from trainer.datasets import read_labels, read_many
    from trainer.evaluate import evaluate, is_not_worse
    from trainer.promote import install_model, promote, target_path
    from trainer.train import TrainSettings, train

    mined = mine_keywords(cfg)
    result["mined_labels"] = mined
    labels = list(cfg.retrain.train_labels) + mined
    held_out = read_labels(cfg.retrain.held_out_labels)
    train_rows = read_many(labels)
    shared = {r.patient for r in held_out} & {r.patient for r in train_rows}
    result["held_out_patients_in_training"] = len(shared)
    if shared:
        log.warning("%d patient(s) of the held-out manifest are also in the training labels: the comparison "
                    "flatters both models", len(shared))
    settings = TrainSettings(labels=labels, out=str(run_dir / "candidate"), progress=False,
                             **(train_overrides or {}))
    report = (train_fn or train)(settings)
    candidate_path = run_dir / "candidate" / "model.pt"
    if not candidate_path.is_file():
        result["reason"] = "training produced no model"
        return _finish(cfg, run_dir, result)
    candidate = load_model(candidate_path)
    result["candidate"] = {"path": str(candidate_path), "version": candidate.version,
                           "best_epoch": report.get("best_epoch")}
    new_metrics = evaluate(candidate, held_out)
    result["candidate_metrics"] = _summary(new_metrics)
    try:
        current = load_model(cfg.model.path or None)
    except FileNotFoundError as exc:
        current = None
        log.info("no current model to compare with: %s", exc)
    cur_metrics = evaluate(current, held_out) if current is not None else None
    result["current_metrics"] = _summary(cur_metrics)
    if cur_metrics is not None and not is_not_worse(new_metrics, cur_metrics, tolerance):
        result["reason"] = (f"candidate is worse on the held-out set (error {new_metrics['error']:.4f} vs "
                            f"{cur_metrics['error']:.4f}, mean AUC {new_metrics['mean_auc']} vs "
                            f"{cur_metrics['mean_auc']})")
        return _finish(cfg, run_dir, result)
    if cfg.model.path:
        record = install_model(candidate_path, target_path(cfg.model.path, cfg.resolved_data_dir))
    elif config_path is not None:
        record = promote(candidate_path, config_path)
    else:
        result["reason"] = "candidate is not worse, but model.path is empty and no config file was given to record it"
        return _finish(cfg, run_dir, result)
    result["promoted"] = True
    result["promotion"] = record
    result["reason"] = "no current model" if cur_metrics is None else "candidate is not worse on the held-out set"
    return _finish(cfg, run_dir, result)


def _finish(cfg: Config, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (run_dir / "retrain_report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out_root(cfg) / HISTORY, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({k: result.get(k) for k in ("started", "finished", "run_dir", "promoted", "reason",
                                                        "error") if k in result})
                 + "\n")
    log.info("retraining run %s: %s (%s)", run_dir.name, "promoted" if result["promoted"] else "not promoted",
             result.get("reason"))
    return result


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_days(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday, names allowed) as APScheduler day names.

    APScheduler's ``CronTrigger`` counts 0 = Monday, so a plain crontab ``0`` would run on Mondays; the
    field is expanded to explicit names (``"1-5"`` -> ``"mon,tue,wed,thu,fri"``). Raises ``ValueError``.
    """
    field = field.strip().lower()
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()

    def day(token: str) -> int:
        if token[:3] in _DAY_NAMES and token.isalpha():
            return _DAY_NAMES.index(token[:3])
        if token.isdigit() and 0 <= int(token) <= 7:
            return int(token) % 7
        raise ValueError(f"day of week {token!r} is not 0-7 or a day name")

    for item in field.split(","):
        rng, _, step_s = item.partition("/")
        step = int(step_s) if step_s else 1
        if step < 1:
            raise ValueError(f"step {step_s!r} must be at least 1")
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = day(a), day(b)
            if b.strip() == "7":
                hi = 7
            if hi < lo:
                raise ValueError(f"range {rng!r} runs backwards")
        else:
            lo = hi = day(rng)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


def cron_trigger(cfg: Config):
    """The APScheduler trigger of ``retrain.cron`` (crontab meaning: day of week 0 = Sunday).

    ``ConfigError`` naming the key when the expression is not valid.
    """
    from apscheduler.triggers.cron import CronTrigger

    expr = cfg.retrain.cron
    try:
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(f"expected 5 fields, got {len(fields)}")
        minute, hour, day, month, dow = fields
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=crontab_days(dow),
                           timezone="UTC")
    except ValueError as exc:
        raise ConfigError(f"config key 'retrain.cron': {expr!r} is not a crontab expression "
                          f"(minute hour day month day-of-week): {exc}") from exc


def run_scheduler(cfg: Config, config_path: str | Path | None, stop: threading.Event,
                  job: Callable[..., Any] = retrain_once, trigger: Any = None) -> int:
    """Run ``job`` on ``retrain.cron`` (or an APScheduler ``trigger``) until ``stop`` is set; returns 0
    (2 when retraining is off). A run that raises is logged and the schedule goes on."""
    if not cfg.retrain.enabled:
        log.warning("retraining is off (retrain.enabled is false); nothing scheduled")
        return 2
    _check(cfg)
    from apscheduler.schedulers.background import BackgroundScheduler

    trigger = trigger if trigger is not None else cron_trigger(cfg)

    def run() -> None:
        try:
            job(cfg, config_path)
        except Exception:  # one failed run must not end the schedule
            log.exception("retraining run failed")

    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(run, trigger, id="retrain", max_instances=1, coalesce=True)
    scheduler.start()
    log.info("retraining scheduled on %r (UTC); next run %s", cfg.retrain.cron,
             scheduler.get_job("retrain").next_run_time)
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
    return 0
