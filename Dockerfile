# distllm on NVIDIA GPUs.
#
#   docker build -t distllm .
#   docker run --rm --gpus all --ipc=host -v "$PWD/data:/opt/distllm/data" -v "$PWD/runs:/opt/distllm/runs" \
#       distllm accelerate launch --config_file launch/accelerate/ddp.yaml -m distllm train configs/gpt2-124m.yaml
#
# Base: PyTorch 2.13.0 (the version the test suite runs; >= pyproject's torch floor of 2.5 for SDPA's
# enable_gqa, and >= 2.9 for the fused CUDA RMSNorm forward + backward the model uses on GPUs) with
# CUDA 12.6, which runs on drivers >= 560 and on every GPU from Volta to Hopper (CUDA 13 images need
# drivers >= 580). The devel flavour carries nvcc: DeepSpeed compiles some of its ops on first use
# (e.g. CPU Adam for ZeRO offload).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/distllm

# Dependencies first (a layer that survives source changes): the exact versions the tests ran
# with. torch is pinned to the base image's version, so pip keeps the image's CUDA build.
COPY launch/docker/requirements.lock launch/docker/requirements.lock
RUN pip install --requirement launch/docker/requirements.lock

# distllm itself, without touching the pinned dependencies; `pip check` fails the build if the
# lock and the package's requirements ever disagree.
COPY pyproject.toml README.md ./
COPY distllm distllm
COPY configs configs
COPY launch launch
COPY benchmarks benchmarks
RUN pip install --no-deps . && pip check && distllm --help >/dev/null

# forward_signals.sh as PID 1: `docker kill --signal=USR1` (or Slurm's signal through `docker run`)
# reaches every training process, which saves a checkpoint and exits; docker stop's SIGTERM too.
ENTRYPOINT ["/opt/distllm/launch/forward_signals.sh"]
CMD ["distllm", "--help"]
