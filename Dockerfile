# GPU image: CUDA PyTorch from the official image, distllm and its dependencies on top.
#   docker build -t distllm .
#   docker run --gpus all -v $PWD/runs:/opt/distllm/runs distllm train configs/gpt2-124m.yaml
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /opt/distllm

# Dependencies first (cached layer); torch is already in the base image and satisfies ">=2.5".
COPY pyproject.toml README.md ./
COPY distllm/__init__.py distllm/__init__.py
RUN pip install -e . && pip uninstall -y distllm

COPY distllm distllm
COPY configs configs
COPY launch launch
COPY benchmarks benchmarks
RUN pip install --no-deps -e .

ENTRYPOINT ["distllm"]
CMD ["--help"]
