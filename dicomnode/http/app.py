"""The Flask application: the status page, its JSON API, ``/metrics`` and ``/healthz``.

====================================  =====================================================================
``GET /``                             studies with their series and region ranges, the queue by state,
                                      recent errors (failed jobs, refused C-STOREs), refused associations
``GET /series/<uid>``                 one series: region ranges and the probability profile (Fig. 7)
``GET /series/<uid>/profile.png``     the profile picture (drawn once per classification)
``GET /api/overview``                 everything ``/`` shows, as JSON
``GET /api/studies?limit=N``          studies, newest first (default 100)
``GET /api/series/<uid>``             one series with its ranges and per-slice probabilities
``GET /api/queue``                    jobs by kind and state
``GET /api/events``                   refused associations and C-STOREs of every process, newest first
``GET /metrics``                      Prometheus text format (every process's counters + index gauges)
``GET /healthz``                      200 ``{"status": "ok"}`` when the index answers, else 503
====================================  =====================================================================

An unknown series is answered 404 naming the UID (JSON under ``/api``, a page elsewhere). With
``http.token`` set, every route but ``/healthz`` needs ``Authorization: Bearer <token>``, ``?token=<token>``
(which also sets a cookie, so the page's links and picture work in a browser) or that cookie; else 401.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request, send_file
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from dicomnode import dicom_status
from dicomnode.config import Config
from dicomnode.http import collectors, events, profile, queries
from dicomnode.http.collectors import JOB_STATES

log = logging.getLogger("dicomnode.http.app")

TOKEN_COOKIE = "dicomnode_token"

#: C-STORE refusal codes the page explains (README, "C-STORE statuses").
STATUS_MEANINGS = {
    f"0x{dicom_status.OUT_OF_RESOURCES:04X}": "out of resources",
    f"0x{dicom_status.DATASET_DOES_NOT_MATCH_SOP_CLASS:04X}": "dataset does not match the request",
    f"0x{dicom_status.CANNOT_DECODE:04X}": "dataset does not decode",
    f"0x{dicom_status.INVALID_UID:04X}": "missing or invalid UID",
    f"0x{dicom_status.DUPLICATE_REJECTED:04X}": "duplicate refused",
    f"0x{dicom_status.INDEX_FAILED:04X}": "index write failed",
}


#: Why an association was refused, as the page says it (the metric's ``reason`` label -> words).
REJECTION_REASONS = {
    "calling_ae_title_not_allowed": "calling AE title (or its host) not in security.allowed_peers",
    "called_ae_title_not_recognised": "called AE title is not this node's",
    "local_limit_exceeded": "listener.max_associations associations already active",
    "rejected_by_pynetdicom": "rejected by pynetdicom (its own association limit)",
}


def _token_ok(token: str) -> bool:
    given = ""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    given = given or request.args.get("token", "") or request.cookies.get(TOKEN_COOKIE, "")
    return hmac.compare_digest(given.encode(), token.encode())


def create_app(cfg: Config, sessions: sessionmaker[Session], metrics_folder: Path) -> Flask:
    """The application for the node of ``cfg``, reading the index through ``sessions`` and the
    processes' metric and event files in ``metrics_folder``."""
    app = Flask("dicomnode.http")
    app.json.sort_keys = False
    token = cfg.http.token
    profiles_dir = cfg.resolved_data_dir / "http" / "profiles"
    storage_dir = cfg.resolved_storage_dir

    def session() -> Session:
        if "session" not in g:
            g.session = sessions()
        return g.session

    @app.teardown_appcontext
    def _close(_exc: BaseException | None) -> None:
        s = g.pop("session", None)
        if s is not None:
            s.close()

    @app.before_request
    def _authorise() -> Any:
        if not token or request.path == "/healthz":
            return None
        if not _token_ok(token):
            return _error(401, "a valid token is required (http.token): send 'Authorization: Bearer <token>' "
                               "or add ?token=<token>")
        return None

    @app.after_request
    def _remember_token(response: Response) -> Response:
        if token and request.args.get("token") and _token_ok(token):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    def _error(code: int, message: str) -> Response:
        titles = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}
        title = titles.get(code, "Error")
        if request.path.startswith("/api/") or request.path in ("/metrics", "/healthz") or request.path.endswith(".png"):
            response = jsonify(error=message, status=code)
        else:
            response = Response(render_template("error.html", code=code, title=title, message=message,
                                                ae_title=cfg.ae_title), mimetype="text/html")
        response.status_code = code
        if code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="dicomnode"'
        return response

    @app.errorhandler(queries.NotFound)
    def _not_found(exc: queries.NotFound) -> Response:
        return _error(404, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    def overview() -> dict[str, Any]:
        s = session()
        return {
            "ae_title": cfg.ae_title,
            "summary": queries.summary(s),
            "studies": queries.studies(s, _limit()),
            "errors": queries.recent_errors(s),
            "refused_stores": events.recent(metrics_folder, "cstore_refused"),
            "refused_associations": events.recent(metrics_folder, "association_rejected"),
        }

    def _limit() -> int:
        raw = request.args.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10000:
            raise _BadRequest(f"limit must be a whole number from 1 to 10000, not {raw!r}")
        return int(raw)

    @app.errorhandler(_BadRequest)
    def _bad_request(exc: _BadRequest) -> Response:
        return _error(400, str(exc))

    @app.get("/")
    def page_index() -> str:
        return render_template("index.html", job_states=JOB_STATES, status_meanings=STATUS_MEANINGS,
                               rejection_reasons=REJECTION_REASONS, **overview())

    @app.get("/series/<series_uid>")
    def page_series(series_uid: str) -> str:
        return render_template("series.html", s=queries.series_detail(session(), series_uid), ae_title=cfg.ae_title)

    @app.get("/series/<series_uid>/profile.png")
    def series_profile(series_uid: str) -> Response:
        s = session()
        detail = queries.series_detail(s, series_uid)
        if not detail["slices"]:
            raise queries.NotFound(f"series {series_uid} has no classification results "
                                   f"(classification state: {detail['classification_state']})")
        paths = [storage_dir / rel for rel in queries.slice_files(s, series_uid)]
        return send_file(profile.profile_png(detail, paths, profiles_dir), mimetype="image/png", max_age=60)

    @app.get("/api/overview")
    def api_overview() -> Response:
        return jsonify(overview())

    @app.get("/api/studies")
    def api_studies() -> Response:
        return jsonify(studies=queries.studies(session(), _limit()))

    @app.get("/api/series/<series_uid>")
    def api_series(series_uid: str) -> Response:
        return jsonify(queries.series_detail(session(), series_uid))

    @app.get("/api/queue")
    def api_queue() -> Response:
        return jsonify(queries.summary(session())["queue"])

    @app.get("/api/events")
    def api_events() -> Response:
        return jsonify(events=events.recent(metrics_folder))

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = collectors.exposition(metrics_folder, sessions)
        return Response(body, content_type=content_type)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            session().execute(text("SELECT 1"))
        except Exception as exc:
            log.error("health check: the index does not answer: %s", exc)
            return _error(503, f"the index does not answer: {type(exc).__name__}")
        return jsonify(status="ok", ae_title=cfg.ae_title)

    return app


class _BadRequest(ValueError):
    """A query parameter is malformed (the message says which and why)."""
