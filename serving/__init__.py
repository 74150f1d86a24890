"""Serving worker: answers prediction-request topics with dynamic batching and hot-swapped model versions.

Modules: ``worker`` (Kafka consume-predict-produce loop, transactions; run by ``streamlearn serve``),
``versions`` (background loading, atomic swaps, policy), ``model`` (one verified, warmed-up
version), ``policy`` (latest/pinned/canary, canary judge), ``inputs`` (request -> features),
``labels`` (late labels from raw topics for the canary), ``http_api`` (TF Serving REST shape),
``client`` (predict client), ``metrics`` (Prometheus), ``txn`` (the transactional producer's settings),
``exceptions``.
"""
