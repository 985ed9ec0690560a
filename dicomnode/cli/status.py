"""``dicomnode status``: counts of patients, studies, series, instances and jobs by state."""

from __future__ import annotations

import argparse
import json

from dicomnode.config import Config

HELP = "counts of studies, series, instances and jobs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from dicomnode.db.index import counts
    from dicomnode.db.session import checked_index

    with checked_index(cfg) as (engine, sessions), sessions() as session:
        result = counts(session)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"index       {engine.url.render_as_string(hide_password=True)}")
    for key in ("patients", "studies", "series", "instances"):
        print(f"{key:<12}{result[key]}")
    print("jobs        " + ", ".join(f"{k} {v}" for k, v in result["jobs"].items()))
    for kind, states in sorted(result["jobs_by_kind"].items()):  # classify, results, forward (issue 14)
        print(f"  {kind:<10}" + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    print(f"last received {result['last_received_at'] or 'never'}")
    return 0
