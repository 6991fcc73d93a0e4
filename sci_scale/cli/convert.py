"""``sci-scale convert`` (Hugging Face -> sci-scale, and a logits check) and ``sci-scale export``
(sci-scale -> Hugging Face; also ``convert sci-to-hf``).

transformers and torch load inside the handler, so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sci_scale.cli.common import add_trust_argument

EXPORT_DTYPES = ("bf16", "fp16", "fp32", "keep")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        nargs="?",
        help="checkpoint directory (e.g. RUN_DIR/checkpoints/step_0000300), or a run directory "
        "(its latest checkpoint)",
    )
    parser.add_argument("--ckpt", help="the same as CHECKPOINT")
    parser.add_argument("--out", required=True, help="Hugging Face model directory to write")
    parser.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default="bf16",
        help="weights' dtype in the export (keep: the checkpoint's own; default bf16)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (transformers' default 5GB)",
    )
    add_trust_argument(parser)
    parser.set_defaults(handler=cmd_export)


def register(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="Hugging Face <-> sci-scale checkpoints")
    conv_sub = conv.add_subparsers(dest="convert_command", required=True)
    h2s = conv_sub.add_parser(
        "hf-to-sci", help="import a Llama/Mistral/Qwen2/Qwen3/SmolLM2 model (streamed)"
    )
    h2s.add_argument("--hf", required=True, help="Hugging Face model directory")
    h2s.add_argument("--out", required=True, help="checkpoint directory to write")
    h2s.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train with")
    h2s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train with")
    h2s.add_argument("--seq-length", type=int, help="training sequence length to record")
    h2s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    h2s.set_defaults(handler=cmd_convert)
    _export_arguments(
        conv_sub.add_parser("sci-to-hf", help="export a checkpoint (the same as sci-scale export)")
    )
    _export_arguments(
        sub.add_parser(
            "export",
            help="a checkpoint as a Hugging Face model directory (sharded safetensors, config, "
            "tokenizer, model card)",
        )
    )
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
    add_trust_argument(ver)
    ver.set_defaults(handler=cmd_convert)


def cmd_export(args: argparse.Namespace) -> int:
    from sci_scale.convert.export import export_source, sci_to_hf
    from sci_scale.convert.safetensors_out import ExportOptionError, parse_shard_size

    if (args.checkpoint is None) == (args.ckpt is None):
        raise ExportOptionError("name the checkpoint once: CHECKPOINT or --ckpt")
    parse_shard_size(args.max_shard_size)  # a clear error before anything is read
    ckpt = export_source(Path(args.checkpoint or args.ckpt))
    sci_to_hf(ckpt, args.out, args.dtype, args.max_shard_size)
    print(f"Hugging Face model {args.out} (from {ckpt})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sci_scale.convert import hf

    if args.convert_command == "hf-to-sci":
        hf.hf_to_sci(args.hf, args.out, args.tp, args.pp, args.seq_length, args.dtype)
        print(
            f"sci-scale checkpoint {args.out}; train from it with checkpoint.init_from={args.out}"
        )
        return 0
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
