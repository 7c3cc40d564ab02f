# The Policy Server image (README, "Docker"). Two targets:
#   docker build -t policy-server:0.1.0 .                                   the server (the default, last stage)
#   docker build --target frontend -t policy-server-frontend:0.1.0 .        the streamlit demo page
# It serves schema.yaml + models/ of /app (the default example); mount your policy folder and set
# POLICY_SERVER_DIR to serve another. torch comes from PyPI: the CUDA build, which runs on CPUs
# too, so one image serves the CPU and the GPU workers of a Ray cluster.
FROM python:3.11-slim AS base

# Java runs the SDK generator behind /clients.
RUN apt-get update \
    && apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 policy
WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY policy_server/ policy_server/
COPY app.py generate.py frontend.py schema.yaml ./
COPY models/ models/
ENV PYTHONUNBUFFERED=1 \
    POLICY_SERVER_DIR=/app
USER policy


FROM base AS frontend
USER root
RUN pip install --no-cache-dir streamlit==1.67.0 altair==6.3.0
USER policy
EXPOSE 8501
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["streamlit", "run", "frontend.py", "--server.port", "8501", "--server.address", "0.0.0.0"]


FROM base AS server
# 8000: the API and its /metrics; 8080: Ray's own metrics (backend ray)
EXPOSE 8000 8080
# /health answers while Ray starts (up to a minute); /ready only once the policy answers
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "generate.py", "serve", "--host", "0.0.0.0", "--port", "8000"]
