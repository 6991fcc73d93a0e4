"""``sci-scale`` (and ``python -m sci_scale``): one entry point, one sub-command per job.

Sub-commands are thin: they parse arguments, set up logging and call the library. Errors the
user can fix (config, data, layout) print as one line and exit with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sci_scale.config import load_config
from sci_scale.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

USER_ERRORS = (UserError, FileNotFoundError)


def setup_logging(verbose: bool = False) -> None:
    from sci_scale.runtime.launch_env import read_dist_env

    rank, _, _ = read_dist_env()
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # megatron-core logs every dataset index it builds at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _resolve_config(path: str | None) -> Path | None:
    if path is None:
        return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    return Path(path)


def _config_from_args(args: argparse.Namespace):
    # A first positional argument holding "=" is an override, not a config file.
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return load_config(_resolve_config(config), overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    from sci_scale.train.trainer import train

    result = train(cfg, resume="auto" if args.auto_resume else args.resume)
    if result.history:
        first, last = result.history[0], result.history[-1]
        logging.getLogger("sci_scale").info(
            "lm_loss %.4f -> %.4f over steps %d..%d; metrics in %s",
            first["lm_loss"],
            last["lm_loss"],
            first["step"],
            last["step"],
            result.run_dir / "metrics.jsonl",
        )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from sci_scale.launch.slurm import SubmitOptions, submit

    cfg = _config_from_args(args)
    opts = SubmitOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        job_name=args.job_name,
        exclusive=not args.no_exclusive,
        signal_seconds=args.signal_seconds,
        max_requeues=args.max_requeues,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        launcher=args.launcher,
        extra_sbatch=list(args.sbatch),
        gpu_memory=args.gpu_memory,
        **({"template": Path(args.template)} if args.template else {}),
    )
    result = submit(cfg, opts, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(result.script)
        return 0
    print(f"submitted job {result.job_id}")
    print(f"run directory {result.run_dir}")
    print(f"script {result.script_path}; follow with: sci-scale status {result.run_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sci_scale.launch.memory_plan import format_plan, plan_memory, require_fit

    cfg = _config_from_args(args)
    world = args.nodes * args.gpus_per_node
    plan = plan_memory(cfg, world, args.gpu_memory)
    named = args.config and ("=" not in args.config or args.config.endswith((".yaml", ".yml")))
    print(
        f"memory plan of {args.config if named else DEFAULT_CONFIG.name} on {args.nodes} "
        f"node(s) x {args.gpus_per_node} GPU(s) of {args.gpu_memory / 1e9:g} GB"
    )
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    require_fit(plan)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from sci_scale.launch.status import format_status, read_status

    status = read_status(args.run_dir, query_slurm=not args.finished)
    if args.finished:
        return 0 if status.finished else 3
    print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sci_scale.convert import hf

    if args.convert_command == "hf-to-sci":
        hf.hf_to_sci(args.hf, args.out, args.tp, args.pp, args.seq_length, args.dtype)
        print(
            f"sci-scale checkpoint {args.out}; train from it with checkpoint.init_from={args.out}"
        )
    elif args.convert_command == "sci-to-hf":
        hf.sci_to_hf(args.ckpt, args.out, args.dtype)
        print(f"Hugging Face model {args.out}")
    else:
        diff = hf.verify(
            args.ckpt,
            args.hf,
            batch=args.batch,
            seq=args.seq,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            pipeline=args.pp,
        )
        if diff is not None:
            ok = diff <= args.tolerance
            print(
                f"max |logits difference| = {diff:.3e} "
                f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})"
            )
            return 0 if ok else 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from sci_scale.eval.suite import EvalPlan, evaluate_checkpoint_dir

    tasks = set(args.task)
    if "cogs" in tasks and not args.cogs_path:
        raise FileNotFoundError("--task cogs needs --cogs-path (a COGS TSV file)")
    ckpt = Path(args.ckpt)
    plan = EvalPlan(
        ppl_blocks=args.ppl_blocks if "ppl" in tasks else 0,
        scan_splits=[args.split] if "scan" in tasks else [],
        cogs_file=Path(args.cogs_path) if "cogs" in tasks else None,
        scan_part=args.part,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        probe_templates=args.probe_templates if "probe" in tasks else 0,
        progress=True,
    )
    figures = evaluate_checkpoint_dir(ckpt, plan, corpus=args.corpus)
    for key, value in figures.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from sci_scale.experiment.ablation import run_ablation

    cfg = _config_from_args(args)
    out = Path(args.out or cfg.run.dir)
    command = " ".join(["sci-scale", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else ""
    report = run_ablation(cfg, out, command, reevaluate=args.reevaluate)
    print(f"report written to {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sci_scale.train.bench import bench, report

    cfg = _config_from_args(args)
    results = bench(cfg, steps=args.steps, warmup=args.warmup, baseline=args.baseline)
    print(report(results))
    if args.json:
        import json

        from sci_scale.train.bench import summary

        Path(args.json).write_text(json.dumps(summary(results), indent=2) + "\n")
        print(f"figures written to {args.json}")
    if args.markdown:
        from sci_scale.train.bench import markdown_table, summary

        Path(args.markdown).write_text(markdown_table(summary(results)))
        print(f"markdown table written to {args.markdown}")
    return 0


def cmd_pairs_scan(args: argparse.Namespace) -> int:
    from sci_scale.data.pairs import enumerate_commands, format_scan_line, interpret, scan_split

    out = sys.stdout
    if args.split == "all":
        for command in enumerate_commands():
            out.write(format_scan_line(command, interpret(command)) + "\n")
    else:
        for command, actions in scan_split(args.split, args.part, seed=args.seed):
            out.write(format_scan_line(command, actions) + "\n")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import itertools

    from sci_scale.data.corpus import CorpusError, stdlib_docstrings
    from sci_scale.data.preprocess import BadRecords, iter_texts, resolve_inputs
    from sci_scale.data.tokenizer import train_sentencepiece

    if args.input:
        bad = BadRecords(skip=False)
        texts = (t for p in resolve_inputs(args.input) for t in iter_texts(p, args.text_key, bad))
        texts = list(itertools.islice(texts, args.max_docs)) if args.max_docs else list(texts)
    else:
        texts = stdlib_docstrings()
    if not texts:
        raise CorpusError("no text to train on: the input is empty")
    model = train_sentencepiece(
        texts,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        seed=args.seed,
        input_sentence_size=args.sample_sentences,
    )
    logging.getLogger("sci_scale").info(
        "trained a %d-piece %s tokenizer (byte fallback, pad/unk/bos/eos and the pair tokens) "
        "on %d documents%s -> %s",
        args.vocab_size,
        args.model_type,
        len(texts),
        f" (a seeded sample of {args.sample_sentences} sentences)" if args.sample_sentences else "",
        model,
    )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from sci_scale.data.preprocess import PreprocessOptions, preprocess

    result = preprocess(
        PreprocessOptions(
            inputs=args.input,
            tokenizer=args.tokenizer,
            out=args.out,
            text_key=args.text_key,
            workers=args.workers,
            append_eod=args.append_eod,
            skip_bad=args.skip_bad,
            shard_docs=args.shard_docs,
        )
    )
    skipped = sum(result.skipped.values())
    print(
        f"{result.documents:,} documents, {result.tokens:,} tokens -> {result.prefix}.{{bin,idx}} "
        f"in {result.seconds:.1f}s ({result.tokens_per_s:,.0f} tokens/s, {args.workers} "
        f"worker(s)); {result.bytes_on_disk / max(result.tokens, 1):.2f} bytes per token on disk"
        + (f"; {result.shards_reused} shard(s) reused" if result.shards_reused else "")
        + (f"; skipped {skipped}: {dict(result.skipped)}" if skipped else "")
    )
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from sci_scale.data.inspect import inspect_dataset

    print(inspect_dataset(args.prefix, args.tokenizer, args.config, args.blocks))
    return 0


def _gpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    def gpu_memory(text: str) -> int:
        from sci_scale.launch.memory_plan import parse_memory

        try:
            return parse_memory(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--gpu-memory",
        type=gpu_memory,
        default="80GB",
        help="memory of one GPU: 80GB, 80GiB, 141GB, or a number of GB (default 80GB)",
    )


def build_parser() -> argparse.ArgumentParser:
    from sci_scale import __version__
    from sci_scale.data.pairs import SCAN_SPLITS

    parser = argparse.ArgumentParser(
        prog="sci-scale",
        description="Megatron-core GPT pretraining with a structural (SCI) branch and SCL.",
    )
    parser.add_argument("--version", action="version", version=f"sci-scale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default config: configs/tiny.yaml)")
    train.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from run.dir's latest checkpoint"
    )
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the latest checkpoint if there is one, else start (for jobs)",
    )
    train.set_defaults(func=cmd_train)

    sbm = sub.add_parser(
        "submit", help="queue a training run on Slurm (renders slurm/train.sbatch)"
    )
    sbm.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    sbm.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    sbm.add_argument("--nodes", type=int, default=1)
    sbm.add_argument(
        "--gpus-per-node", type=int, default=8, help="one process per GPU; 0 for CPU nodes"
    )
    sbm.add_argument(
        "--tasks-per-node", type=int, help="processes per node (default: GPUs per node, or 1)"
    )
    sbm.add_argument("--cpus-per-task", type=int)
    sbm.add_argument("--mem", help="memory per node, e.g. 0 for all of it")
    sbm.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    sbm.add_argument("--partition")
    sbm.add_argument("--account")
    sbm.add_argument("--qos")
    sbm.add_argument("--constraint")
    sbm.add_argument("--job-name")
    sbm.add_argument("--no-exclusive", action="store_true", help="share nodes with other jobs")
    sbm.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue",
    )
    sbm.add_argument("--max-requeues", type=int, default=20)
    sbm.add_argument("--container-image", help="run the tasks in this image (pyxis)")
    sbm.add_argument("--container-mounts", help="pyxis mounts (default: the run directory)")
    sbm.add_argument("--launcher", help="the sci-scale command on the nodes")
    sbm.add_argument("--template", help="a batch script template (default: slurm/train.sbatch)")
    sbm.add_argument(
        "--sbatch", action="append", default=[], help="an extra #SBATCH directive (repeatable)"
    )
    sbm.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    _gpu_memory_argument(sbm)
    sbm.set_defaults(func=cmd_submit)

    plan = sub.add_parser(
        "plan", help="per-GPU memory of a config's layout; refuses one that does not fit"
    )
    plan.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=4")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    _gpu_memory_argument(plan)
    plan.add_argument("--json", help="write the plan to this JSON file")
    plan.set_defaults(func=cmd_plan)

    conv = sub.add_parser("convert", help="Hugging Face <-> sci-scale checkpoints")
    conv_sub = conv.add_subparsers(dest="convert_command", required=True)
    h2s = conv_sub.add_parser("hf-to-sci", help="import a Llama/Mistral/Qwen2/SmolLM2 model")
    h2s.add_argument("--hf", required=True, help="Hugging Face model directory")
    h2s.add_argument("--out", required=True, help="checkpoint directory to write")
    h2s.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train with")
    h2s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train with")
    h2s.add_argument("--seq-length", type=int, help="training sequence length to record")
    h2s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    h2s.set_defaults(func=cmd_convert)
    s2h = conv_sub.add_parser("sci-to-hf", help="export a checkpoint as a Hugging Face model")
    s2h.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. .../step_0000300)")
    s2h.add_argument("--out", required=True, help="Hugging Face model directory to write")
    s2h.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s2h.set_defaults(func=cmd_convert)
    ver = conv_sub.add_parser(
        "verify", help="compare a checkpoint's logits with transformers' at a TP/PP layout"
    )
    ver.add_argument("--ckpt", required=True)
    ver.add_argument("--pp", type=int, default=1, help="pipeline stages (TP = processes / pp)")
    ver.add_argument("--hf", required=True)
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--tolerance", type=float, default=1e-4)
    ver.add_argument(
        "--trust-remote-code", action="store_true", help="allow the HF directory's model code"
    )
    ver.set_defaults(func=cmd_convert)

    ev = sub.add_parser(
        "eval", help="held-out perplexity, SCAN / COGS exact match, structural probe"
    )
    ev.add_argument("ckpt", help="checkpoint directory (e.g. RUN_DIR/checkpoints/step_0000300)")
    ev.add_argument(
        "--task",
        nargs="+",
        choices=["ppl", "scan", "cogs", "probe"],
        required=True,
        help="one or more: held-out perplexity, SCAN or COGS exact match, structural probe",
    )
    ev.add_argument("--split", default="length", help="SCAN split (length, simple, ...)")
    ev.add_argument("--part", choices=["train", "test"], default="test")
    ev.add_argument("--cogs-path", help="COGS TSV (e.g. the in-distribution test.tsv)")
    ev.add_argument(
        "--corpus", help="ppl: a JSONL file to score (default: the run's held-out corpus share)"
    )
    ev.add_argument(
        "--ppl-blocks",
        type=int,
        default=64,
        help="ppl: at most this many blocks (one pass at most)",
    )
    ev.add_argument("--probe-templates", type=int, default=128, help="probe: templates (x2)")
    ev.add_argument("--limit", type=int, help="evaluate the first N examples only")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument(
        "--max-new-tokens", type=int, help="default: the longest gold output's tokens + 2"
    )
    ev.add_argument("--json", help="write the figures to this JSON file")
    ev.set_defaults(func=cmd_eval)

    exp = sub.add_parser("experiment", help="studies made of several training runs")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    abl = exp_sub.add_parser(
        "ablation",
        help="train vanilla / pairs / SCI joint / SCI frozen variants over seeds and pair "
        "rates, evaluate them alike, write REPORT.md with plots",
    )
    abl.add_argument(
        "config", help="YAML config with an experiment section, e.g. configs/ablation.yaml"
    )
    abl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. experiment.seeds=[1,2]")
    abl.add_argument("--out", help="study directory (default: the config's run.dir)")
    abl.add_argument(
        "--reevaluate",
        action="store_true",
        help="score finished runs' checkpoints again (new eval settings); retrains nothing",
    )
    abl.set_defaults(func=cmd_experiment)

    st = sub.add_parser("status", help="a run's step, losses, throughput, checkpoint, Slurm job")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--finished",
        action="store_true",
        help="print nothing; exit 0 if train.steps is reached, 3 if not (for job scripts)",
    )
    st.set_defaults(func=cmd_status)

    bench = sub.add_parser(
        "bench", help="tokens/s of a config and the step-time cost of its SCI branch"
    )
    bench.add_argument("config", nargs="?", help="YAML config (default: configs/tiny.yaml)")
    bench.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.seq_length=512")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    bench.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain transformers Llama step of the same shape (default: yes)",
    )
    bench.add_argument("--json", help="write every figure to this JSON file")
    bench.add_argument("--markdown", help="write the figures as a markdown table to this file")
    bench.set_defaults(func=cmd_bench)

    pairs = sub.add_parser("pairs", help="structural pair data")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True)
    scan = pairs_sub.add_parser(
        "scan", help="print a SCAN split as 'IN: <command> OUT: <actions>' lines"
    )
    scan.add_argument("--split", required=True, choices=[*SCAN_SPLITS, "all"])
    scan.add_argument("--part", choices=["train", "test"], default="train")
    scan.add_argument("--seed", type=int, default=0, help="seed of the simple split and order")
    scan.set_defaults(func=cmd_pairs_scan)

    tok = sub.add_parser("tokenizer", help="tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser(
        "train", help="train a sentencepiece tokenizer (default corpus: stdlib docstrings)"
    )
    tok_train.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="files or globs as for preprocess (default: the built-in corpus)",
    )
    tok_train.add_argument("--max-docs", type=int, help="read at most this many documents")
    tok_train.add_argument(
        "--sample-sentences",
        type=int,
        default=0,
        help="train on a seeded random sample of this many sentences (0: all)",
    )
    tok_train.add_argument("--text-key", default="text")
    tok_train.add_argument("--out", required=True, help="output prefix; writes PREFIX.model")
    tok_train.add_argument("--vocab-size", type=int, default=2048)
    tok_train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tok_train.add_argument("--seed", type=int, default=0)
    tok_train.set_defaults(func=cmd_tokenizer_train)

    pre = sub.add_parser(
        "preprocess", help="corpus files -> megatron indexed dataset (.bin/.idx), in parallel"
    )
    pre.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files or globs: .jsonl .json .parquet .arrow, or saved datasets directories",
    )
    pre.add_argument("--text-key", default="text")
    pre.add_argument("--tokenizer", required=True, help="sentencepiece .model or HF model dir")
    pre.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx")
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    pre.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's eod (default: yes)",
    )
    pre.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    pre.add_argument("--shard-docs", type=int, default=4096, help="documents per resumable shard")
    pre.set_defaults(func=cmd_preprocess)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    ins = data_sub.add_parser(
        "inspect", help="counts, lengths and a sample of an indexed dataset; a config's blend"
    )
    ins.add_argument("prefix", nargs="?", help="indexed dataset prefix (PREFIX.bin/.idx)")
    ins.add_argument("--tokenizer", help="to decode a sample (.model or HF directory)")
    ins.add_argument("--config", help="a training config: print its realised blend")
    ins.add_argument("--blocks", type=int, default=10000, help="blocks to count for the blend")
    ins.set_defaults(func=cmd_data_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (`submit CONFIG --nodes 4 train.steps=9`):
    # argparse stops filling a positional list at the first option.
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.parse_args(argv)  # reports the unknown arguments argparse's way, and exits
        args.overrides = [*args.overrides, *extra]
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"sci-scale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sci-scale: interrupted", file=sys.stderr)
        return 130
