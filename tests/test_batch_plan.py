"""The batch plan: one computation of micro-batch, accumulation and slicing for every process count."""

from pathlib import Path

import pytest

from distllm.batch_plan import MICRO_BATCH_CAP, BatchPlan, validation_micro_batch
from distllm.config import load_config
from distllm.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_a_set_micro_batch_is_kept_and_must_fit():
    plan = BatchPlan.build(32, 4, 2)
    assert (plan.micro_batch, plan.accum, plan.derived) == (4, 4, False)
    with pytest.raises(ConfigError, match=r"global_batch_size \(16\) must be divisible by train.micro_batch_size "
                                          r"x processes \(16 x 2 = 32\).*leave train.micro_batch_size unset"):
        BatchPlan.build(16, 16, 2)


@pytest.mark.parametrize("global_batch,world,micro", [(16, 1, 16), (16, 2, 8), (16, 4, 4), (512, 8, 16),
                                                      (24, 2, 12), (96, 4, 12), (7, 1, 7), (34, 2, 1)])
def test_an_unset_micro_batch_is_derived(global_batch, world, micro):
    plan = BatchPlan.build(global_batch, None, world)
    assert plan.micro_batch == micro and plan.derived
    assert plan.micro_batch * plan.accum * world == global_batch
    assert plan.micro_batch <= MICRO_BATCH_CAP
    assert "derived" in plan.describe()


def test_processes_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match=r"global_batch_size \(16\) must be divisible by the number of processes \(3\)"):
        BatchPlan.build(16, None, 3)


def test_every_rank_reads_its_own_positions_once():
    for world in (1, 2, 4):
        plan = BatchPlan.build(16, 2, world)
        seen = [i for m in range(plan.accum) for r in range(world) for i in range(16)[plan.positions(m, r)]]
        assert sorted(seen) == list(range(16))
    # 1 process x accum 2 and 2 processes x accum 1 read the same samples in the same order
    one, two = BatchPlan.build(8, 4, 1), BatchPlan.build(8, 4, 2)
    assert [one.positions(m, 0) for m in range(2)] == [two.positions(0, r) for r in range(2)]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shipped_configs_run_on_1_2_and_4_processes(config, world):
    cfg = load_config(config)
    cfg.validate(world_size=world)
    plan = BatchPlan.build(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    assert plan.micro_batch * plan.accum * world == cfg.train.global_batch_size


def test_the_validation_batch_does_not_depend_on_the_process_count():
    assert validation_micro_batch(16, None) == MICRO_BATCH_CAP == 16
    assert validation_micro_batch(8, None) == 8
    assert validation_micro_batch(512, 4) == 4
