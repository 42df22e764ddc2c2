"""Multiple-choice scoring: lm-evaluation-harness 0.4's encoding and metrics, per-item log-likelihoods
equal to an independent computation with ``transformers`` on the export (and to lm-eval itself when it
is installed), the same numbers for 1 and 2 processes and under ZeRO-3, and the ``eval --tasks`` CLI."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distllm.__main__ import main
from distllm.config import from_dict
from distllm.errors import DataError
from distllm.eval import multiple_choice as mc
from distllm.eval.tasks import Item, Task, load_task, write_lm_eval_task
from distllm.model import Transformer
from distllm.tokenizer import eot_id, load_tokenizer

MAX_LEN = 64  # the tiny model's context: the long items below need lm-eval's left truncation

LONG = ("Module subprocess\n\nSubprocesses with accessible I/O streams. This module allows you to spawn "
        "processes, connect to their input/output/error pipes, and obtain their return codes. For a complete "
        "description of this module see the Python documentation. Main API: run(...): Runs a command, waits "
        "for it to complete, then returns a CompletedProcess instance.")
ITEMS = [  # (context, choices, gold): the tiny corpus's own phrases, and every edge of lm-eval's encoding
    ("Module json\n\nJSON", ["(JavaScript Object Notation) is a subset of JavaScript", "is a fruit", "x"], 0),
    ("Module os ", ["OS routines for NT or Posix", "banana bread recipe"], 0),  # trailing space -> continuation
    ("Module re\n\nSupport for regular", ["expressions (RE).", "cats and dogs."], 0),
    ("", ["Module random", "Zebra quantum"], 0),  # empty context: the prefix token stands in
    ("Grüße aus", ["Köln — naïve café", "Berlin"], 0),
    (LONG, ["the process finishes.", "Popen"], 1),  # context + choice > 65 tokens: left-truncated
    ("Module heapq\n\nHeap queue", ["algorithm (a.k.a. priority queue).", "of bananas", "system"], 0),
    ("Module string\n\nA collection of string", ["constants.", "beans.", "a", "operations"], 0),
]


def write_task(path: Path, items=ITEMS) -> Path:
    path.write_text("".join(json.dumps({"context": c, "choices": ch, "label": g}) + "\n" for c, ch, g in items))
    return path


@pytest.fixture(scope="module")
def trained(tiny_corpus, prepared_data, tmp_path_factory):
    """A tiny model trained for a few steps on the tiny corpus, its export, and a task file."""
    from distllm.export import export
    from distllm.train import train

    root = tmp_path_factory.mktemp("mc")
    cfg = from_dict({
        "run": {"dir": str(root / "run")},
        "data": {"source": str(tiny_corpus), "dir": str(prepared_data), "seq_len": 32, "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 512},
        "model": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 64, "vocab_size": 512,
                  "max_seq_len": MAX_LEN},
        "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": 15, "eval_every": 0,
                  "eval_batches": 1, "device": "cpu"},
        "optim": {"warmup_steps": 2, "lr": 1e-2},
        "logging": {"tensorboard": False, "progress": False},
    }).validate()
    result = train(cfg)
    out = export(result.checkpoint, root / "hf")
    return {"cfg": cfg, "checkpoint": result.checkpoint, "export": out, "root": root,
            "task": write_task(root / "tiny_mc.jsonl"), "tokenizer": Path(prepared_data) / "tokenizer.json"}


def distllm_model(ckpt: Path):
    from distllm import checkpoint

    state = checkpoint.read_state(ckpt)
    model = Transformer(from_dict({"model": state["config"]["model"]}).model)
    checkpoint.load_weights(ckpt, model)
    return model.eval()


# --------------------------------------------------------------------------- lm-eval's encoding


def test_encode_pair_splits_the_joint_encoding_where_the_context_ends(prepared_data):
    tok = load_tokenizer(Path(prepared_data) / "tokenizer.json")
    encode = lambda s: tok.encode(s).ids  # noqa: E731
    eot = eot_id(tok)
    ctx, cont = mc.encode_pair(encode, "Module os ", "OS routines", eot)
    assert ctx == encode("Module os") and cont == encode("Module os OS routines")[len(ctx):]  # the space moved
    assert tok.decode(ctx + cont) == "Module os OS routines"
    # encoding the continuation on its own gives other tokens at the boundary (why lm-eval splits the joint one)
    ctx, cont = mc.encode_pair(encode, "Support for regular", "expressions", eot)
    assert cont == encode("Support for regularexpressions")[len(ctx):] != encode("expressions")
    assert ctx + cont != encode("Support for regular") + encode("expressions")
    assert mc.encode_pair(encode, "", " Module", eot) == ([eot], encode(" Module"))  # the prefix token
    ids = encode(" Module")
    assert mc.encode_pair(lambda s: [eot] + encode(s), "", " Module", eot) == ([eot], ids)  # starts with it already


def test_metrics_follow_lm_eval_argmax_ties_and_stderr():
    item = Item(index=0, context="c", choices=("aaaa", "b", "cc"), gold=2)
    assert mc.item_predictions(item, [-4.0, -2.0, -2.0]) == (1, 0)  # tie -> the first; per char: -1, -2, -1 -> 0
    assert mc.item_predictions(item, [-8.0, -3.0, -1.0]) == (2, 2)
    task = Task("t", "t.jsonl", [Item(i, "c", ("a", "bb"), i % 2) for i in range(5)])
    lls = {i: [-1.0, -5.0] for i in range(5)}  # always picks choice 0: right for items 0, 2, 4
    m = mc.task_metrics(task, lls)
    p = 3 / 5
    assert m["acc"] == pytest.approx(p) and m["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert mc.task_metrics(task, lls, indices=[1, 3])["acc"] == 0.0
    assert mc.task_metrics(task, lls, indices=[0])["acc_stderr"] is None


def test_batches_cover_every_choice_once_whatever_their_size(prepared_data, tmp_path):
    tok = load_tokenizer(Path(prepared_data) / "tokenizer.json")
    task = load_task(write_task(tmp_path / "t.jsonl"))
    items = mc.encode_task(task, 0, tok, eot_id(tok), " ", MAX_LEN)
    assert not items[5].fits(MAX_LEN) and all(e.fits(MAX_LEN) for i, e in enumerate(items) if i != 5)
    for budget in (1, 64, 10_000):
        batches = mc.plan_batches(items, MAX_LEN, budget)
        seen = [(e.item, c) for b in batches if isinstance(b, mc.SharedBatch) for e in b.items
                for c in range(len(e.continuations))]
        seen += [(e.item, c) for b in batches if isinstance(b, mc.TruncatedBatch) for e, c in b.rows]
        assert sorted(seen) == sorted((e.item, c) for e in items for c in range(len(e.continuations)))
        for b in batches:
            if isinstance(b, mc.SharedBatch):  # contexts within the slack of the shortest
                lengths = [len(e.context) for e in b.items]
                assert max(lengths) - min(lengths) <= mc.slack(min(lengths)) and b.prefix == min(lengths) - 1


def test_a_choice_longer_than_the_context_is_a_clear_error(prepared_data, tmp_path):
    tok = load_tokenizer(Path(prepared_data) / "tokenizer.json")
    task = load_task(write_task(tmp_path / "t.jsonl", [("c", ["word " * 80], 0)]))
    with pytest.raises(DataError, match=r"t\.jsonl: item 0: choice 0 is \d+ tokens, longer than the model's context of 64"):
        mc.encode_task(task, 0, tok, eot_id(tok), " ", MAX_LEN)


# --------------------------------------------------------------------------- parity


def hf_loglikelihood(hf, hf_tok, context: str, continuation: str, eot: int) -> float:
    """lm-eval's recipe written out on the Hugging Face model and tokenizer of the export."""
    enc = lambda s: hf_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if context == "":
        cont = enc(continuation)
        ctx, cont = ([eot], cont) if cont[0] != eot else (cont[:1], cont[1:])
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = enc(context)
        cont = enc(context + continuation)[len(ctx):]
    inp = (ctx + cont)[-(MAX_LEN + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([inp])).logits[0].double(), -1)
    start = len(inp) - len(cont)
    return float(sum(logp[start + j, t] for j, t in enumerate(cont)))


def test_per_item_loglikelihoods_match_transformers_on_the_export(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(trained["export"]).eval()
    hf_tok = AutoTokenizer.from_pretrained(trained["export"])
    tok = load_tokenizer(trained["tokenizer"])
    task = load_task(trained["task"])
    model = distllm_model(trained["checkpoint"])
    got = mc.score(model, [task], tok, per_item=True, batch_tokens=96)["tasks"]["tiny_mc"]
    worst = 0.0
    for row, item in zip(got["per_item"], task.items):
        ref = [hf_loglikelihood(hf, hf_tok, item.context, " " + c, eot_id(tok)) for c in item.choices]
        worst = max(worst, max(abs(a - b) for a, b in zip(row["loglikelihoods"], ref)))
        assert row["loglikelihoods"] == pytest.approx(ref, abs=1e-4), item.index
    print(f"max |log-likelihood difference| vs transformers: {worst:.2e}")
    distinct = {round(x, 2) for r in got["per_item"] for x in r["loglikelihoods"]}
    assert len(distinct) == sum(len(i.choices) for i in task.items)  # a real model: no two choices alike


def test_lm_eval_gives_the_same_scores_on_the_export(trained, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tok = load_tokenizer(trained["tokenizer"])
    task = load_task(trained["task"])
    ours = mc.score(distllm_model(trained["checkpoint"]), [task], tok, per_item=True)["tasks"]["tiny_mc"]
    write_lm_eval_task(task, tmp_path / "lm_eval_tasks")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={trained['export']},dtype=float32",
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")),
                                  batch_size=4, device="cpu", log_samples=True)
    theirs = out["results"]["tiny_mc"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    for sample in out["samples"]["tiny_mc"]:
        lls = [r[0] for r in sample["filtered_resps"]]
        assert lls == pytest.approx(ours["per_item"][sample["doc_id"]]["loglikelihoods"], abs=1e-4)


# --------------------------------------------------------------------------- processes


ZERO3_SCRIPT = """
import json, sys
import torch
from distllm import distributed
from distllm.config import from_dict
from distllm.eval.multiple_choice import score, score_tasks
from distllm.eval.tasks import load_tasks
from distllm.model import Transformer
from distllm.optim import build_optimizer
from distllm.tokenizer import load_tokenizer

cfg = from_dict(json.loads(sys.argv[1]))
rt = distributed.setup(cfg)
torch.manual_seed(cfg.train.seed)
with rt.init_context():  # ZeRO-3: every parameter partitioned as it is made
    model = Transformer(cfg.model)
optimizer = build_optimizer(model, cfg.optim, rt.device.type)
model, optimizer = rt.parallelize(model, optimizer, cfg.train)
model.train()
tasks, tok = load_tasks(sys.argv[2]), load_tokenizer(sys.argv[3])
result = score(model, tasks, tok, rt, rt.device, per_item=True, batch_tokens=48)  # many batches, uneven per rank
flat = score_tasks(model, tasks, tok, rt, rt.device)
assert model.training  # restored for the loop
if rt.is_main:
    json.dump({"result": result, "flat": flat, "engine": rt.engine_name}, open(sys.argv[4], "w"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # as distllm's main does: no gloo thread left to abort the exit
"""


def test_one_and_two_processes_and_zero3_give_the_same_scores(trained, tmp_path):
    from distributed_runs import env, free_port

    tok = load_tokenizer(trained["tokenizer"])
    task = load_task(trained["task"])
    one = mc.score(distllm_model(trained["checkpoint"]), [task], tok, per_item=True, batch_tokens=48)["tasks"]["tiny_mc"]

    # two processes through the CLI: items split over ranks, the whole model on each
    out = tmp_path / "two.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    proc = subprocess.run([*torchrun, "-m", "distllm", "eval", str(trained["root"] / "run"), "--tasks",
                           str(trained["task"]), "--per-item", "--batch-tokens", "48", "--out", str(out),
                           "--train.device=cpu"], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    got = two["tasks"]["tiny_mc"]
    assert (got["acc"], got["acc_norm"]) == (one["acc"], one["acc_norm"])
    for a, b in zip(got["per_item"], one["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)

    # ZeRO-3 on 2 processes, the model built partitioned and wrapped by the engine, as in training
    cfg = copy.deepcopy(trained["cfg"])
    cfg.distributed.zero_stage, cfg.train.global_batch_size = 3, 16
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    out = tmp_path / "zero3.json"
    proc = subprocess.run([*torchrun[:-1], str(free_port()), str(script), json.dumps(cfg.to_dict()),
                           str(trained["task"]), str(trained["tokenizer"]), str(out)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zero3 = json.loads(out.read_text())
    assert zero3["engine"] == "DeepSpeed ZeRO-3"
    torch.manual_seed(cfg.train.seed)
    ref = mc.score(Transformer(cfg.model).eval(), [task], tok, per_item=True, batch_tokens=48)["tasks"]["tiny_mc"]
    got = zero3["result"]["tasks"]["tiny_mc"]
    assert (got["acc"], got["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    for a, b in zip(got["per_item"], ref["per_item"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    assert zero3["flat"]["eval/tiny_mc/acc"] == ref["acc"] and zero3["flat"]["eval/tiny_mc/acc_norm"] == ref["acc_norm"]


# --------------------------------------------------------------------------- the command line


def test_eval_tasks_prints_json_writes_it_to_the_run_and_reports_bad_files(trained, tmp_path, capsys):
    run = trained["root"] / "run"
    assert main(["eval", str(run), "--tasks", str(trained["task"]), "--train.device=cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["tasks"]["tiny_mc"]
    assert report["step"] == 15 and m["items"] == len(ITEMS) and 0 <= m["acc"] <= 1 and "per_item" not in m
    written = Path(report["written_to"])
    assert written.parent == run / "eval" and json.loads(written.read_text())["tasks"] == report["tasks"]

    # with a contamination report: the clean subset scored beside the full set
    from distllm.eval import contamination

    report, _ = contamination.check(str(trained["cfg"].data.dir), [load_task(trained["task"])], num_proc=1,
                                    progress=False)
    dirty = report["tasks"]["tiny_mc"]["dirty_indices"]
    assert dirty  # the items are the corpus's own phrases
    path = contamination.write_report(report, tmp_path / "contamination.json")
    assert main(["eval", str(run), "--tasks", str(trained["task"]), "--contamination", str(path),
                 "--out", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    clean = json.loads(captured.out)["tasks"]["tiny_mc"]["clean"]
    assert clean["items"] == len(ITEMS) - len(dirty)
    assert "clean items" in captured.err and captured.err.splitlines()[1].split()[-1] == str(len(dirty))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b"], "label": 0}\n{"context": "a", "choices": ["b"], "label": 3}\n')
    assert main(["eval", str(run), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distllm eval: error: {bad}:2: label 'label' = 3 is out of range for 1 choices"]


def test_the_projection_of_unscored_positions_is_skipped_or_falls_back(prepared_data, tmp_path):
    """Under ``_head_rows`` the model projects only the scored positions; a model whose output projection
    is not the ``lm_head`` module (no hook applies) gives the same numbers from its full logits."""
    from distllm.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, n_layers=1, n_heads=2, d_model=32, max_seq_len=MAX_LEN)).eval()
    calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))

    class Plain(torch.nn.Module):  # the same weights, projecting with F.linear: no lm_head module to hook
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cfg = inner, inner.cfg

        def new_kv_cache(self, *a, **k):
            return self.inner.new_kv_cache(*a, **k)

        def forward(self, tokens, cache=None, start_pos=0):
            head, self.inner.lm_head = self.inner.lm_head, torch.nn.Identity()
            try:
                hidden = self.inner(tokens, cache=cache, start_pos=start_pos)
            finally:
                self.inner.lm_head = head
            return torch.nn.functional.linear(hidden, head.weight)

    tok = load_tokenizer(Path(prepared_data) / "tokenizer.json")
    task = load_task(write_task(tmp_path / "t.jsonl"))
    a = mc.score(model, [task], tok, per_item=True)["tasks"]["t"]["per_item"]
    assert calls and all(len(shape) == 2 for shape in calls)  # (N, d): only scored rows were projected
    assert sum(n for n, _ in calls) == sum(len(c) for e in mc.encode_task(task, 0, tok, eot_id(tok), " ", MAX_LEN)
                                           for c in e.continuations)
    b = mc.score(Plain(model), [task], tok, per_item=True)["tasks"]["t"]["per_item"]
    for x, y in zip(a, b):
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)


def test_tasks_are_scored_in_the_training_loop(tiny_config, tmp_path):
    """train.eval_tasks: the tasks are scored with every validation (step 0, each eval_every, the end) and
    logged as eval/<task>/...; the last record equals `distllm eval --tasks` on the final checkpoint."""
    from distllm.train import train

    cfg = tiny_config
    cfg.train.max_steps, cfg.train.eval_every = 4, 2
    cfg.train.eval_tasks = [str(write_task(tmp_path / "tiny_mc.jsonl"))]
    result = train(cfg)
    records = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/tiny_mc/acc_norm" in r]
    assert [r["step"] for r in scored] == [0, 2, 4]
    assert all({"eval/tiny_mc/acc", "eval/tiny_mc/acc_stderr", "eval/tiny_mc/acc_norm_stderr"} <= r.keys()
               for r in scored)
    tok = load_tokenizer(Path(cfg.data.dir) / "tokenizer.json")
    model = distllm_model(result.checkpoint)
    final = mc.score(model, [load_task(cfg.train.eval_tasks[0])], tok)["tasks"]["tiny_mc"]
    assert scored[-1]["eval/tiny_mc/acc"] == final["acc"] and scored[-1]["eval/tiny_mc/acc_norm"] == final["acc_norm"]
