"""distllm: pretrain decoder-only language models from one CPU to many GPU nodes."""

from distllm import hostmem as _hostmem

_hostmem.enable_huge_pages()  # before torch's first allocation, which fixes the setting for the process
