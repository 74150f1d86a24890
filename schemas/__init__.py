"""Avro schemas of every streamlearn record, the schema registry and the Confluent wire framing.

The bottom layer: imports nothing from the other streamlearn packages.
"""
