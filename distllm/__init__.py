"""distllm: pretrain decoder-only language models from one CPU to many GPU nodes."""
