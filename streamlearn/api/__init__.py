"""The control API: ``/query``, ``/trainModel``, ``/process`` and ``/jobs`` over HTTP (docs/API.md).

``app`` builds the FastAPI app, ``jobs`` runs requests as child ``streamlearn`` processes and keeps
their state under ``<home>/jobs``, ``requests`` holds the request bodies and the tenant rule,
``query`` answers ``GET /query`` from the columnar store, ``compact`` keeps that store fresh.
It lives in the command-line layer because its jobs run trainers and replays.
"""
