"""The ``distllm`` command line: ``distllm SUBCOMMAND CONFIG.yaml [--section.key=value ...]``.

Works the same as ``python -m distllm``, ``accelerate launch -m distllm`` and
``torchrun -m distllm``. Errors a user can fix end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

from distllm import hostmem
from distllm.errors import UserError

OVERRIDES_HELP = (
    "Any config value can be overridden with --section.key=value, e.g. --train.max_steps=50 "
    "--model.n_layers=4 --run.dir=runs/try2 (values are parsed as YAML)."
)


def _config_parser(name: str, sub, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, epilog=OVERRIDES_HELP, allow_abbrev=False)
    p.add_argument("config", help="YAML run file, e.g. configs/debug.yaml"
                   + ("; or a run / checkpoint directory (the config saved there is used)"
                      if name in ("eval", "generate") else ""))
    return p


# Third-party warnings that tell a distllm user nothing they can act on: (category, module, message regex).
# DeepSpeed 0.19's ZeRO collectives call torch's deprecated names, and something resets Python's
# once-per-place memory every step: a 20-step 2-process ZeRO-3 run on CPU printed 1,766 of these.
LIBRARY_WARNINGS = [
    (FutureWarning, r"torch\.distributed\.c10d_logger",
     r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # torch 2.13's DDP, raised where Accelerate wraps the model: distllm passes broadcast_buffers=False on
    # purpose (the RoPE tables are constants) and Accelerate's kwargs have no forward_sync_buffers yet
    (FutureWarning, r"accelerate\.accelerator", r"`broadcast_buffers` is deprecated"),
]


def quiet_library_warnings() -> None:
    """Silence the known third-party warnings (``LIBRARY_WARNINGS``), each by category, module and message.
    Every other warning, ours included, still shows."""
    for category, module, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distllm",
        description="Pretrain decoder-only language models, from one CPU process to multi-node GPU clusters.",
        epilog="Run `distllm COMMAND --help` for the options of a command. " + OVERRIDES_HELP,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _config_parser("prepare", sub, "train a tokenizer and write token shards",
                   "Stream the corpus (data.source) with all cores (data.num_proc), train a byte-level BPE "
                   "tokenizer on a sample (or load tokenizer.path), and write train/val shards, tokenizer.json and, "
                   "last, manifest.json to data.dir (a directory or an fsspec URL such as s3://bucket/prefix). "
                   "Input that is not UTF-8 text is reported and skipped; data.dedup=true drops exact duplicates. "
                   "Interrupted? Run the same command again to finish. A data.dir prepared from other settings "
                   "is only replaced with --data.overwrite=true.")
    _config_parser("train", sub, "pretrain a model",
                   "Train the model described by the config on the shards in data.dir; logs, TensorBoard events "
                   "and checkpoints go to run.dir. Running the same command again continues the run from its "
                   "newest committed checkpoint (--checkpoint.resume_from=null insists on a fresh run). Works "
                   "the same under torchrun, accelerate launch and Slurm (see launch/README.md).")
    _config_parser("sft", sub, "fine-tune a pretrained model on instructions",
                   "Instruction fine-tuning with the training loop of `train` (same checkpoints, auto-resume, signals, "
                   "launchers, ZeRO): start from the weights of sft.init_from (a checkpoint or run directory; its "
                   "tokenizer and model shape must match the config), render the conversations of sft.data (chat "
                   "'messages' or Alpaca records in JSONL / JSON / Parquet; default: python-stdlib-docstrings, built "
                   "from this Python's standard library) with sft.chat_template, and learn the responses only, "
                   "normalised over each optimizer step's response tokens. Each evaluation logs the response-only "
                   "val_loss on held-out examples and writes greedy answers to held-out prompts to "
                   "run.dir/answers/step_NNNNNN.jsonl. Running the same command again resumes the SFT run. See the "
                   "sft section of the config (configs/sft-debug.yaml).")

    _config_parser("distill", sub, "train a student on a teacher's distribution (knowledge distillation)",
                   "Train model (the student) on the shards in data.dir with loss = distill.alpha * T^2 * "
                   "D(teacher, student) + (1 - distill.alpha) * cross-entropy (T = distill.temperature, D = "
                   "distill.divergence: forward_kl, reverse_kl or jsd), in the same loop as train: checkpoints, "
                   "auto-resume, signals, torchrun / accelerate launch / Slurm, DDP and ZeRO-1/2/3 (under ZeRO-3 the "
                   "teacher is partitioned too). distill.teacher is a distllm run or checkpoint directory, or a "
                   "Hugging Face model directory with the student's tokenizer; with distill.topk_dir the teacher's "
                   "top-k written by distill-topk is read instead of running the teacher.")
    _config_parser("distill-topk", sub, "precompute the teacher's top-k log-probabilities for offline distillation",
                   "Run distill.teacher once over every sample the run's train.max_steps steps read (the training "
                   "loader's global order for train.seed and train.global_batch_size) and write its distill.k most "
                   "likely next tokens and their log-probabilities at distill.temperature to distill.topk_dir; then "
                   "`distllm distill` with the same config trains without the teacher in memory.")

    p = _config_parser("eval", sub, "validation loss / bits per byte, or multiple-choice accuracy, of a checkpoint",
                       "Compute the validation loss, perplexity and bits per byte of a checkpoint on the val split of "
                       "the data it was trained on (or data.dir if given). With --tasks, score multiple-choice task "
                       "files (JSON lines: context, choices, label; the field names of HellaSwag, ARC, PIQA and SciQ "
                       "work as they are) exactly as lm-evaluation-harness 0.4 does (acc, acc_norm, standard errors); "
                       "under torchrun / accelerate launch the items are split over the processes. Prints JSON and "
                       "writes it to RUN_DIR/eval/.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (with a YAML run file)")
    p.add_argument("--tasks", default=None, metavar="A.jsonl,B.jsonl", help="multiple-choice task files to score")
    p.add_argument("--per-item", action="store_true", help="with --tasks: every choice's log-likelihood in the JSON")
    p.add_argument("--contamination", default=None, metavar="REPORT.json",
                   help="with --tasks: also score each task's clean subset from a `distllm contamination` report "
                        "(printed side by side)")
    p.add_argument("--delimiter", default=" ", help="with --tasks: text between context and choice (default: %(default)r)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="with --tasks: tokens per forward pass (default: about 512 MB of logits)")
    p.add_argument("--out", default=None, help="with --tasks: write the JSON here instead of RUN_DIR/eval/")

    p = _config_parser("contamination", sub, "check task items against the training data (GPT-3 n-gram overlap)",
                       "Report which multiple-choice items occur in the training data: GPT-3's method (appendix C: "
                       "lowercase, no punctuation, whitespace words; an item -- context + correct choice -- is dirty "
                       "if any of its N-grams is in a training document, items shorter than N words whole). Streams "
                       "the prepared train shards of data.dir (local or s3://) in worker processes (data.num_proc). "
                       "Writes a JSON report (per task and item, with where it was found) and prints a summary; "
                       "--decontaminate writes new shards without the contaminated documents.")
    p.add_argument("--tasks", required=True, metavar="A.jsonl,B.jsonl", help="task files to check")
    p.add_argument("--ngram", type=int, default=13, help="N of the N-grams (default: %(default)s)")
    p.add_argument("--all-choices", action="store_true", help="check context + every choice, not only the correct one")
    p.add_argument("--out", default=None, help="report path (default: RUN_DIR/contamination.json)")
    p.add_argument("--decontaminate", default=None, metavar="OUT_DIR",
                   help="write the shards without the contaminated documents to this new directory "
                        "(train on it with --data.dir=OUT_DIR); data.dir is never modified")

    p = _config_parser("generate", sub, "generate text from a checkpoint",
                       "Sample a continuation of a prompt from a checkpoint, with a KV cache.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (with a YAML run file)")
    p.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="treat --prompt as a user message: render it with the checkpoint's chat template and print "
                        "the assistant's reply, generated up to the end-of-sequence token")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user message")

    p = sub.add_parser("plot", help="plot the curves of a run as a PNG",
                       description="Write loss / validation / learning-rate / throughput curves of a run "
                                   "(from RUN_DIR/metrics.jsonl) to a PNG.", allow_abbrev=False)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama model directory",
                       description="Write a checkpoint as a Hugging Face Llama directory (safetensors weights, "
                                   "config.json, tokenizer files) that transformers' AutoModelForCausalLM and "
                                   "AutoTokenizer load with no custom code. TARGET is a run directory (its newest "
                                   "committed checkpoint) or a checkpoint directory; the config saved there is used.",
                       allow_abbrev=False)
    p.add_argument("target", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: %(default)s, as trained)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="split the weights into safetensors files of at most this size (default: %(default)s)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template (a file, or the template text) to write into tokenizer_config.json "
                        "instead of the checkpoint's own (default: the one it was trained with, else distllm's "
                        "Alpaca-style default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    hostmem.enable_huge_pages()  # first: torch reads the setting at its first allocation
    quiet_library_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # libraries: warnings and up
    logging.getLogger("distllm").setLevel(logging.INFO)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # in a multi-process job every rank sees the same user error: rank 0 alone reports it
    report = os.environ.get("RANK", "0") == "0"
    try:
        return _run(args, extra, parser)
    except Exception as e:
        if (reason := lost_contact(e)) is not None:  # every rank that saw it reports it: rank 0 may be the lost one
            print(f"distllm {args.command}: error: rank {os.environ.get('RANK', '0')} lost contact with another "
                  f"process of this job ({reason}): did it crash or get killed? Its own log says why; run the "
                  "same command again to resume from the newest committed checkpoint", file=sys.stderr)
            return 1
        if not isinstance(e, (UserError, OSError)):  # OSError: unwritable or missing path, full disk
            raise
        if report:
            from distllm.redact import redact_text

            print(f"distllm {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if report:
            print(f"distllm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_process_group()


# How torch.distributed's backends (gloo, NCCL) and its TCP store word a peer that is gone.
LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                "remote process exited", "Socket closed")


def lost_contact(e: BaseException) -> str | None:
    """The reason, if ``e`` is torch.distributed's error for a process of the job that went away; else None."""
    if "torch" not in sys.modules or not isinstance(e, (RuntimeError, OSError)):
        return None
    import torch.distributed as dist

    text = str(e)
    from_torch = isinstance(e, getattr(dist, "DistError", ())) or any(w in text for w in ("gloo", "NCCL", "c10d"))
    reason = next((r for r in LOST_CONTACT if r.lower() in text.lower()), None)
    return reason if from_torch and reason else None


def _shutdown_process_group() -> None:
    """Leave the process group cleanly (an abandoned gloo/NCCL group aborts the process at exit)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to leave
            pass


def check_sampling_args(args) -> None:
    """``generate``'s own options, checked before any checkpoint is loaded."""
    from distllm.errors import ConfigError

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (a system message belongs to a chat)")


def _saved_config(directory: str, overrides: list[str]):
    """A run or checkpoint directory -> (the config saved in its checkpoint + overrides, the checkpoint).

    Credentials were redacted when the config was saved; their placeholders are dropped here, so that
    storage falls back to its environment credentials (or takes them from the overrides)."""
    from distllm import checkpoint
    from distllm.config import apply_overrides, from_dict
    from distllm.redact import drop_redacted

    path = checkpoint.locate(directory)
    saved = drop_redacted(checkpoint.read_state(path).get("config", {}))
    return from_dict(apply_overrides(saved, overrides)), str(path)


def _run(args, extra: list[str], parser) -> int:
    if args.command == "plot":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from distllm.plot import plot_run

        path, resumes = plot_run(args.run_dir, args.out)
        print(f"wrote {path}" + (f" (resumed at step {', '.join(map(str, resumes))})" if resumes else ""))
        return 0
    if args.command == "export":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from distllm.export import export

        print(f"wrote {export(args.target, args.out, args.dtype, args.max_shard_gb, args.chat_template)}")
        return 0

    from distllm.config import load_config
    from distllm.errors import ConfigError

    bad = [x for x in extra if not (x.startswith("--") and "=" in x)]
    if bad:
        raise ConfigError(f"unrecognized argument '{bad[0]}' (config overrides look like --section.key=value)")
    target = getattr(args, "checkpoint", None)
    if args.command in ("eval", "generate", "contamination") and Path(args.config).is_dir():
        cfg, target = _saved_config(args.config, extra)
    else:
        cfg = load_config(args.config, extra)
    # checked now, before anything starts; these use the launcher's number of processes (torchrun, accelerate)
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")) if args.command in ("train", "sft", "distill") else 1)

    if args.command == "prepare":
        from distllm.data.prepare import prepare

        prepare(cfg)
    elif args.command == "distill-topk":
        from distllm.distillation import write_topk

        write_topk(cfg)
    elif args.command in ("train", "sft", "distill"):
        from distllm.train import train

        if args.command == "sft":
            from distllm.sft import run_sft

            result = run_sft(cfg)
        elif args.command == "distill":
            from distllm.distillation import run_distill

            result = run_distill(cfg)
        else:
            result = train(cfg)
        if result.is_main:
            def fmt(x: float) -> str:  # nan when no step ran in this process (resumed a finished run)
                return f"{x:.4f}" if math.isfinite(x) else "n/a"

            state = f"stopped ({result.stopped})" if result.stopped else "done"
            print(f"{state}: step {result.step}, train loss {fmt(result.loss)}, val loss {fmt(result.val_loss)}, "
                  f"checkpoint {result.checkpoint}")
        return result.exit_code
    elif args.command == "eval" and args.tasks:
        from distllm.evaluate import run_task_eval, side_by_side

        report = run_task_eval(cfg, target, args.tasks, args.per_item, args.contamination, args.delimiter,
                               args.batch_tokens, args.out)
        if report.get("written_to"):  # the main process
            print(json.dumps(report, indent=2))
            if args.contamination:
                print(side_by_side(report), file=sys.stderr)
    elif args.command == "eval":
        from distllm.evaluate import run_eval

        print(json.dumps(run_eval(cfg, target), indent=2))
    elif args.command == "contamination":
        from distllm.eval.contamination import run_contamination

        run_contamination(cfg, args.tasks, args.ngram, args.all_choices, args.out, args.decontaminate)
    elif args.command == "generate":
        from distllm.generate import run_generate

        check_sampling_args(args)
        print(run_generate(cfg, target, args.prompt, args.max_new_tokens, args.temperature,
                           args.top_k or None, args.top_p if args.top_p < 1 else None, args.seed,
                           chat=args.chat, system=args.system))
    return 0


if __name__ == "__main__":
    sys.exit(main())
