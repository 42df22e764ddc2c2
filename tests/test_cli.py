"""The command line: every command has --help; user errors are one line, exit 2, no traceback."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from distllm.__main__ import lost_contact, main, quiet_library_warnings

COMMANDS = ["prepare", "train", "eval", "generate", "plot", "distill", "distill-topk"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "distllm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_user_error(r, *fragments):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_config(tmp_path, cfg_dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: distllm " + command in capsys.readouterr().out


def test_unknown_config_key(tmp_path):
    cfg = write_config(tmp_path, {"train": {"max_step": 3}})
    assert_user_error(run_cli("train", cfg), "unknown config key 'train.max_step'", "did you mean 'train.max_steps'")


def test_unknown_override_key(tmp_path):
    cfg = write_config(tmp_path, {})
    assert_user_error(run_cli("prepare", cfg, "--data.sorce=x"), "unknown config key 'data.sorce'",
                      "did you mean 'data.source'")


def test_missing_corpus(tmp_path):
    missing = tmp_path / "no-such-corpus"
    cfg = write_config(tmp_path, {"data": {"source": str(missing), "dir": str(tmp_path / "out")}})
    assert_user_error(run_cli("prepare", cfg), str(missing))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_empty_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("")
    cfg = write_config(tmp_path, {"data": {"source": str(corpus), "dir": str(tmp_path / "out")}})
    assert_user_error(run_cli("prepare", cfg), "empty")


def test_missing_config_file(tmp_path):
    assert_user_error(run_cli("train", tmp_path / "nope.yaml"), "config file not found")


def test_train_before_prepare(tmp_path):
    cfg = write_config(tmp_path, {"data": {"dir": str(tmp_path / "nothing")}, "run": {"dir": str(tmp_path / "run")}})
    assert_user_error(run_cli("train", cfg), "manifest.json", "distllm prepare")


def test_eval_without_checkpoint(tmp_path, prepared_data):
    cfg = write_config(tmp_path, {"data": {"dir": str(prepared_data)}, "run": {"dir": str(tmp_path / "empty-run")}})
    assert_user_error(run_cli("eval", cfg), "no committed checkpoint")


def test_train_eval_generate_plot(tiny_config, tmp_path, capsys):
    cfg = tiny_config
    path = write_config(tmp_path, cfg.to_dict())
    assert main(["train", str(path), "--train.max_steps=12", "--train.eval_every=6"]) == 0
    assert "done: step 12" in capsys.readouterr().out

    assert main(["eval", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 12 and report["val_loss"] > 0 and report["val_ppl"] > 1

    assert main(["generate", str(path), "--prompt", "The ", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The ") and text.rstrip("\n") != "The "  # the prompt, then generated text
    assert main(["generate", str(path), "--prompt", "The ", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "The \n"  # nothing generated: the prompt alone

    assert main(["plot", cfg.run.dir]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote ") and out.strip().endswith("curves.png")
    png = out.strip().split(" ", 1)[1]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # resuming a finished run trains nothing and keeps the checkpoint
    assert main(["train", str(path), "--train.max_steps=12", "--checkpoint.resume_from=latest"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "done: step 12, train loss n/a, val loss n/a" in out


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0"),
    ("--temperature", "nan", "--temperature must be >= 0"),
    ("--top-k", "-3", "--top-k must be >= 0"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0"),
])
def test_generate_rejects_bad_sampling_options(tmp_path, option, value, message):
    cfg = write_config(tmp_path, {"run": {"dir": str(tmp_path / "run")}})
    assert_user_error(run_cli("generate", cfg, option, value), message)


def test_unwritable_paths_are_one_line_errors(tmp_path, tiny_corpus, tiny_config):
    cfg = write_config(tmp_path, {"data": {"source": str(tiny_corpus), "dir": "/dev/null/data"}})
    assert_user_error(run_cli("prepare", cfg), "Not a directory", "/dev/null/data")
    cfg = write_config(tmp_path, {**tiny_config.to_dict(), "run": {"dir": "/dev/null/run"}})
    assert_user_error(run_cli("train", cfg, "--train.max_steps=3"),
                      "run.dir /dev/null/run cannot be created: /dev/null is not a directory")
    (tmp_path / "a-file").write_text("")  # was "[Errno 17] File exists"
    r = run_cli("train", cfg, "--train.max_steps=3", f"--run.dir={tmp_path / 'a-file'}")
    assert_user_error(r, f"run.dir {tmp_path / 'a-file'} is a file; choose another --run.dir")


def test_prepare_on_a_full_disk(tmp_path, tiny_corpus, mount_tmpfs):
    disk = mount_tmpfs("32k")
    cfg = write_config(tmp_path, {"data": {"source": str(tiny_corpus), "dir": str(disk / "data")},
                                  "tokenizer": {"vocab_size": 512}})
    assert_user_error(run_cli("prepare", cfg), "No space left on device")
    assert not (disk / "data" / "manifest.json").exists()  # never looks complete


def test_eval_with_mismatched_tokenizer(tiny_config, tmp_path, tiny_corpus):
    """A checkpoint evaluated on shards made by another tokenizer is refused with a clear error."""
    cfg = tiny_config
    path = write_config(tmp_path, cfg.to_dict())
    assert main(["train", str(path), "--train.max_steps=3", "--train.eval_every=0"]) == 0
    other = tmp_path / "other-data"
    assert main(["prepare", str(path), f"--data.source={tiny_corpus}", f"--data.dir={other}",
                 "--tokenizer.vocab_size=300", "--model.vocab_size=320"]) == 0
    r = run_cli("eval", path, f"--data.dir={other}")
    assert_user_error(r, "different tokenizer")


def test_known_library_warnings_are_silenced_and_others_still_show():
    """By category, module and message: the deprecated-collective FutureWarnings DeepSpeed's ZeRO triggers in
    torch go; another warning from the same place, and ours, still show."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        for text, category, module in [
            ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning,
             "torch.distributed.c10d_logger"),
            ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning,
             "torch.distributed.c10d_logger"),
            ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", UserWarning,
             "torch.distributed.c10d_logger"),  # another category
            ("something else is deprecated", FutureWarning, "torch.distributed.c10d_logger"),
            ("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, "distllm.train"),  # ours
        ]:
            warnings.warn_explicit(text, category, module.replace(".", "/") + ".py", 1, module=module)
    assert [(str(w.message), w.category) for w in seen] == [
        ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", UserWarning),
        ("something else is deprecated", FutureWarning),
        ("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning),
    ]


def test_lost_contact_is_recognised_from_torch_distributed_errors():
    import torch.distributed as dist

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection {}"
    assert lost_contact(RuntimeError(gloo.format("closed by peer"))) == "Connection closed by peer"
    assert lost_contact(RuntimeError(gloo.format("reset by peer"))) == "Connection reset by peer"
    assert lost_contact(dist.DistNetworkError("Broken pipe")) == "Broken pipe"
    assert lost_contact(RuntimeError(gloo.format("timed out"))) is None  # not a lost peer
    assert lost_contact(ConnectionResetError("Connection reset by peer")) is None  # not from torch.distributed
    assert lost_contact(ValueError(gloo.format("closed by peer"))) is None
