"""The fence around DeepSpeed: every use of its private attributes, and the versions it was tested on.

distllm needs a few things DeepSpeed's public API does not give: the torch optimizer over a rank's
flat fp32 partitions (to create and restore AdamW's state), the partitions themselves (to work around
two 0.19 behaviours), and the link from a parameter to its slice of that state. They are all here,
so that a DeepSpeed upgrade is checked in one file, and ``check_version`` refuses a release outside
the range the test suite covers (``TESTED``) with one line at start-up, before anything is built.

Public DeepSpeed API (``deepspeed.zero.Init``, ``GatheredParameters``, ``deepspeed.utils.safe_*``,
``engine.get_global_grad_norm``, ``engine.was_step_applied``) is used directly elsewhere.
"""

from __future__ import annotations

import torch

from distllm.errors import ConfigError

TESTED = ((0, 19), (0, 20))
"""DeepSpeed releases in [TESTED[0], TESTED[1]) are supported (what CI installs and tests)."""


def check_version() -> None:
    """ConfigError naming the installed and the supported DeepSpeed versions when they differ."""
    import deepspeed

    version = deepspeed.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    if not TESTED[0] <= major_minor < TESTED[1]:
        low, high = (".".join(map(str, v)) for v in TESTED)
        raise ConfigError(
            f"DeepSpeed {version} is installed, but distllm supports DeepSpeed >={low},<{high} (it reaches into "
            f"version-specific internals); install a supported release: pip install 'deepspeed>={low},<{high}'"
        )


# ---------------------------------------------------------------------------- optimizer state


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer (AdamW) that steps this rank's flat fp32 partitions."""
    return engine.optimizer.optimizer


def flat_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, one per parameter group. ZeRO-3 hands them to the base
    optimizer only during ``step()``; ZeRO-1/2 keep them in its param groups."""
    zero = engine.optimizer
    return getattr(zero, "fp32_partitioned_groups_flat", None) or [
        p for g in base_optimizer(engine).param_groups for p in g["params"]
    ]


def adam_step(engine) -> int:
    """AdamW's step count on this rank (0 before the first step)."""
    return next((int(st["step"]) for st in base_optimizer(engine).state.values() if "step" in st), 0)


def set_adam_step(engine, step: int) -> None:
    for st in base_optimizer(engine).state.values():  # created by init_optimizer_state
        st["step"].fill_(float(step))


def init_optimizer_state(engine) -> None:
    """Create AdamW's state (zeros, step 0: what AdamW itself creates at its first step) for every flat
    partition up front. ZeRO-1/2 link each parameter to its slice of that state after the first step,
    but only for the parameter groups whose state exists by then (the first), so without this the
    moments of the second group (norm weights) could never be read or restored. Call it after
    ``share_fp32_partitions``: the state is keyed by the partitions."""
    base = base_optimizer(engine)
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for flat in flat_partitions(engine):
        st = base.state[flat]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 only
    if link is not None:
        link()  # what DeepSpeed runs after the first step, now that every group has state


def share_fp32_partitions(engine) -> None:
    """ZeRO-3: let the optimizer step the fp32 parameter partitions themselves instead of a copy of them.

    DeepSpeed means to skip its fp32 master copy when a partition is already fp32 on the optimizer's
    device (stage3.py ``_create_fp32_partitions``: "we don't need another copy of the weights"), but it
    compares ``tensor.device`` with the string ``current_device_name()`` ('cpu', 'cuda:0'), and a
    ``torch.device`` never equals a string, so 0.19 keeps a clone: 4 bytes per parameter / world size
    per rank, a fifth of the ZeRO-3 state in fp32 (4 + 4 + 4 + 8 bytes per parameter). Do what that
    branch does. Under bf16 the partitions are bf16 and the fp32 master copy stays, as it must;
    offloaded or swapped partitions are left alone.
    """
    zero = engine.optimizer
    if zero.offload_optimizer or getattr(zero, "swap_optimizer", False):
        return
    fp32 = zero.fp32_partitioned_groups_flat
    for i, (params, master) in enumerate(zip(zero.fp16_partitioned_groups_flat, fp32)):
        if params is None or params.dtype != master.dtype or params.device != master.device:
            continue
        if master.data_ptr() == params.data_ptr() or master in zero.optimizer.state:
            continue
        # nothing has stepped yet, so the copy must still be a copy; compared as bits because the last
        # rank's padding is uninitialised memory, which may hold NaNs
        if not torch.equal(params.view(torch.uint8), master.view(torch.uint8)):
            raise RuntimeError(f"ZeRO-3 fp32 partition {i} differs from its parameters before the first step")
        params.ds_id = master.ds_id
        params.requires_grad = True  # as DeepSpeed sets on its fp32 partitions
        fp32[i] = params


def grad_accum_dtype(engine) -> torch.dtype:
    """The dtype the engine accumulates gradients in over micro-batches."""
    optimizer = engine.optimizer
    for name in ("gradient_accumulation_dtype", "grad_acc_dtype"):  # ZeRO optimizers; BF16_Optimizer (ZeRO-1 + bf16)
        if getattr(optimizer, name, None) is not None:
            return getattr(optimizer, name)
    return engine.get_data_types()[1]


# ---------------------------------------------------------------------------- parameters


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's real shape (ZeRO-3 replaces ``p`` by an empty placeholder and keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


# ---------------------------------------------------------------------------- this rank's partition (checkpoints)


def local_pieces(engine, params: list[torch.nn.Parameter]) -> list[list[tuple[int, int, int, int]]]:
    """For each parameter, the pieces of it that this rank's flat fp32 partitions hold, as
    ``(group, offset in flat_partitions(engine)[group], offset in the flattened parameter, numel)``.

    Local bookkeeping only (no collective, nothing gathered). ZeRO-3: rank r holds elements
    [r * n, (r + 1) * n) of each parameter padded to a multiple of the world size, at the offset the
    optimizer keeps in ``grad_position``; the padding is left out. ZeRO-1/2: the fragment DeepSpeed
    linked to the parameter (``_hp_mapping``; None when the parameter lies in other ranks' partitions).
    """
    zero = engine.optimizer
    flats = flat_partitions(engine)
    out = []
    for p in params:
        if hasattr(p, "ds_tensor"):
            group, offset, n = zero.grad_position[zero.get_param_id(p)]
            start = torch.distributed.get_rank(group=p.ds_process_group) * n
            numel = max(0, min(n, p.ds_numel - start))
            out.append([(int(group), int(offset), start, numel)] if numel else [])
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            out.append([])
            continue
        group, offset = mapping.param_group_index, mapping.hp_fragment_address.start
        flat = flats[group]
        if mapping.hp_fragment.data_ptr() != flat.data_ptr() + offset * flat.element_size():
            raise RuntimeError(f"ZeRO fragment of a parameter is not a view of flat partition {group}")
        out.append([(group, offset, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)])
    return out


def partition_moments(engine, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamW's (exp_avg, exp_avg_sq) of flat partition ``group`` (created by ``init_optimizer_state``)."""
    state = base_optimizer(engine).state[flat_partitions(engine)[group]]
    return state["exp_avg"], state["exp_avg_sq"]


def working_partition(p: torch.nn.Parameter) -> tuple[torch.Tensor, bool]:
    """ZeRO-3: this rank's partition of the module's working copy of ``p`` (flat, padding included; fp32
    or bf16) and whether ``p`` is gathered whole right now (persistent small parameters are, after
    the engine starts), in which case ``p.data`` must be set too."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_tensor, p.ds_status == ZeroParamStatus.AVAILABLE
