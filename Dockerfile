# One image for every streamlearn service of docker-compose.yml; the service's `command:` is the
# argument list of the `streamlearn` CLI (ENTRYPOINT).
#
#   docker build -t streamlearn:local .
#   docker run --rm streamlearn:local --help
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3

# A fixed non-root uid owns the data directories. Named volumes mounted on them start as a copy
# of the image's directory (ownership included), so the unprivileged user can write there.
RUN groupadd --system --gid 10001 streamlearn \
 && useradd --system --uid 10001 --gid streamlearn --home-dir /home/streamlearn --create-home streamlearn \
 && mkdir -p /data/home /data/features /data/models \
 && chown -R streamlearn:streamlearn /data

WORKDIR /opt/streamlearn

# Pinned dependencies first: this layer is rebuilt only when requirements.lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Then the project itself, without re-resolving dependencies.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streaming ./streaming
COPY ingest ./ingest
COPY trainer ./trainer
COPY serving ./serving
COPY streamlearn ./streamlearn
RUN pip install --no-deps . \
 && streamlearn --help > /dev/null

USER streamlearn
WORKDIR /home/streamlearn
ENV STREAMLEARN_HOME=/data/home \
    STREAMLEARN_FEATURE_STORE=/data/features \
    STREAMLEARN_MODEL_DIR=/data/models

ENTRYPOINT ["streamlearn"]
CMD ["--help"]
