"""Serving worker: answers prediction-request topics with dynamic batching and hot-swapped model versions."""
