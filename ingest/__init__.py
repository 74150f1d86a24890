"""Event sources (web-log tailer, sensors, image watcher), demo data generators and the HTTP ingest gateway."""
