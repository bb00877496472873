# steer's OpenAI-compatible server.
#
#   docker build -t steer .                       # CPU (python:3.11-slim)
#   docker run -p 8000:8000 -v /path/to/policy:/models/policy:ro steer
#
# GPU: build on a CUDA runtime image; the same steps install the torch build you pin:
#   docker build -t steer:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -p 8000:8000 -v /path/to/policy:/models/policy:ro steer:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CUDA base images ship without Python; python:3.11-slim already has it.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
COPY pyproject.toml README.md ./
COPY steer ./steer
COPY training ./training
COPY service ./service
COPY ui ./ui
# The README's install steps: torch first, then the package. EXTRAS="[ui]" adds the Gradio UI at /ui.
# TORCH_INDEX_URL: PyTorch's CPU wheels by default (the public index's torch==2.13.0 is the CUDA build).
ARG EXTRAS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install ".${EXTRAS}"

RUN useradd --create-home --uid 1000 steer
USER steer

# Mount a policy directory (steer sft / steer demo output) at /models/policy, or set STEER_POLICY.
# The server listens on 0.0.0.0 here, so it needs STEER_API_KEYS=key1,key2 (bearer-token auth on
# every route but /health) and refuses to start without one, unless STEER_ALLOW_NO_AUTH=1 says
# that an open server is meant. See docs/serving.md for every variable.
ENV STEER_POLICY=/models/policy \
    STEER_PORT=8000
VOLUME ["/models"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('STEER_PORT', '8000'), timeout=4)"

CMD ["steer", "serve", "--host", "0.0.0.0"]
