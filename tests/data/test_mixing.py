"""Several sources mixed by weight: proportions, determinism, per-source positions, one tokenizer."""

import numpy as np
import pytest
from synthetic import make_data_dir, stream_dir

from distllm.config import DataConfig, load_config
from distllm.data.loader import build_train_loader
from distllm.data.mixing import MixSchedule
from distllm.errors import ConfigError, DataError
from distllm.tokenizer import save_tokenizer, train_tokenizer
from distllm.batch_plan import BatchPlan

T = 8


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [1, 1]])
def test_schedule_proportions_within_2_percent(weights):
    schedule = MixSchedule(weights)
    share = np.asarray(schedule.weights)
    for start in (0, 12_345_678_901):  # anywhere in a long run
        counts = np.bincount(schedule.sources(start, 64 * 200), minlength=len(weights))  # 200 batches of 64
        np.testing.assert_allclose(counts / counts.sum(), share, atol=0.02)
        per_batch = np.stack([np.bincount(schedule.sources(start + 64 * i, 64), minlength=len(weights))
                              for i in range(200)])
        assert np.abs(per_batch / 64 - share).max() < 0.1  # every single batch is close, too


def test_schedule_depends_on_the_position_only():
    schedule = MixSchedule([0.7, 0.3])
    whole = schedule.sources(1000, 512)
    np.testing.assert_array_equal(np.concatenate([schedule.sources(1000, 100), schedule.sources(1100, 412)]), whole)
    np.testing.assert_array_equal(MixSchedule([7, 3]).sources(1000, 512), whole)  # weights are normalised


@pytest.fixture
def two_sources(tmp_path, prepared_data):
    a = stream_dir(tmp_path / "web", prepared_data, 4003, 1000)  # 500 samples
    b = stream_dir(tmp_path / "code", prepared_data, 1603, 1000, offset=30_000)  # 200 samples
    return a, b


def test_loader_mixes_by_weight_and_saves_each_position(two_sources):
    web, code = two_sources
    cfg = DataConfig(dir=str(web), seq_len=T, mix={str(web): 0.7, str(code): 0.3}, prefetch=0)
    with build_train_loader(cfg, BatchPlan(16, 16), seed=0) as loader:
        assert loader.weights == pytest.approx([0.7, 0.3])
        from_code = 0
        for _ in range(150):  # 2400 samples: several epochs of both sources
            window = next(loader)
            is_code = loader.last_indices >= loader.offsets[1]
            assert ((window[:, 0] >= 30_000).numpy() == is_code).all()
            from_code += int(is_code.sum())
        assert from_code / 2400 == pytest.approx(0.3, abs=0.02)
        state = loader.state_dict()
    web_state, code_state = state["sources"]
    assert state["samples_seen"] == 2400
    assert web_state["data"] == str(web) and code_state["data"] == str(code)
    assert web_state["epoch"] * 500 + web_state["sample_index"] == pytest.approx(0.7 * 2400, abs=48)
    assert code_state["epoch"] * 200 + code_state["sample_index"] == pytest.approx(0.3 * 2400, abs=48)
    assert web_state["epoch"] >= 3 and code_state["epoch"] >= 3


def test_each_epoch_of_a_source_covers_it_without_repeats(two_sources):
    web, code = two_sources
    cfg = DataConfig(dir=str(web), seq_len=T, mix={str(web): 0.7, str(code): 0.3}, prefetch=0)
    with build_train_loader(cfg, BatchPlan(8, 8), seed=1) as loader:
        seen = {0: [], 1: []}
        epochs = []
        for _ in range(100):
            next(loader)
            for i in loader.last_indices.tolist():
                k = int(i >= loader.offsets[1])
                seen[k].append((loader.state_dict()["sources"][k]["epoch"], i))
        for k in (0, 1):
            for e in {e for e, _ in seen[k]}:
                ids = [i for ep, i in seen[k] if ep == e]
                assert len(ids) == len(set(ids))  # no sample twice within an epoch of a source
            epochs.append(max(e for e, _ in seen[k]))
        assert min(epochs) >= 1


def test_mix_sources_must_share_a_tokenizer(two_sources, tmp_path, prepared_data):
    web, _ = two_sources
    other_tok = tmp_path / "other_tokenizer"
    other_tok.mkdir()
    save_tokenizer(train_tokenizer(["another corpus entirely"] * 3, vocab_size=300), other_tok / "tokenizer.json")
    other = make_data_dir(tmp_path / "other", other_tok, {"train": [np.arange(500)], "val": [np.arange(50)]})
    cfg = DataConfig(dir=str(web), seq_len=T, mix={str(web): 0.5, str(other): 0.5})
    with pytest.raises(DataError, match=r"data.mix sources were made with different tokenizers: .*web .*other"):
        build_train_loader(cfg, BatchPlan(4, 4), seed=0)


def test_mix_config_is_validated():
    cfg = load_config(None, ["--data.mix={data/web: 7, data/code: 3}"]).validate()
    assert cfg.data.mix == {"data/web": 7.0, "data/code": 3.0}
    with pytest.raises(ConfigError, match=r"data.mix\['data/web'\] must be positive"):
        load_config(None, ["--data.mix={data/web: 0}"]).validate()
    with pytest.raises(ConfigError, match=r"data.mix\['data/web'\] must be a number"):
        load_config(None, ["--data.mix={data/web: lots}"]).validate()
    with pytest.raises(ConfigError, match="data.mix must be a mapping"):
        load_config(None, ["--data.mix=[data/web]"]).validate()
    with pytest.raises(ConfigError, match="data.mix must name at least one"):
        load_config(None, ["--data.mix={}"]).validate()


def test_resume_refuses_another_mix(two_sources):
    web, code = two_sources
    mixed = DataConfig(dir=str(web), seq_len=T, mix={str(web): 0.7, str(code): 0.3}, prefetch=0)
    state = build_train_loader(mixed, BatchPlan(4, 4), seed=0).state_dict()
    alone = DataConfig(dir=str(web), seq_len=T, prefetch=0)
    with pytest.raises(DataError, match="the data loader state is for other data"):
        build_train_loader(alone, BatchPlan(4, 4), seed=0).load_state_dict(state)
