"""Kafka and Avro I/O, consumers, featurizers and micro-batches. Imports only `schemas`."""
