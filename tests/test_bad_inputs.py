"""Every bad input a user can give ends in one line naming the problem and exit status 2.

Each case goes through the command line (``sci_scale.cli.main.main``) as a user meets it; none
runs a training step: the problem is found while the config loads or the data is prepared.
A signal that comes before the trainer listens stops the run cleanly (``train.stopping``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import small_overrides
from launchers import REPO

from sci_scale.cli.main import main
from sci_scale.data.corpus import stdlib_docstrings, write_jsonl_texts
from sci_scale.data.indexed import IndexedDatasetError, check_split_shares, write_indexed_dataset
from sci_scale.data.tokenizer import load_tokenizer, train_sentencepiece


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A failed set-up leaves the process group of its trainer behind; the next test starts
    without one, as a new command would."""
    yield
    from sci_scale.runtime.distributed import destroy_distributed

    destroy_distributed()


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], command: str = "train") -> str:
    """Run the command; it must exit 2 with exactly one line on stderr, which is returned."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"sci-scale {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_docstrings(max_docs=200)


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    return train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "tok", vocab_size=400)


def indexed(prefix: Path, texts: list[str], spm: Path) -> Path:
    tok = load_tokenizer(spm)
    write_indexed_dataset(([*tok.tokenize(t), tok.eod] for t in texts), prefix, tok.vocab_size)
    return prefix


def train_argv(tmp_path: Path, *overrides: str) -> list[str]:
    base = small_overrides(tmp_path / "run", tmp_path / "cache")
    return ["train", *base, "data.pair_sources=[]", "data.pair_rate=0", *overrides]


# -- config values that cannot make sense: refused at load, key named ---------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("data.split=abc", "data.split must be one to three comma-separated non-negative"),
        ("model.hidden_dropout=1.5", "model.hidden_dropout must be in [0, 1), got 1.5"),
        ("train.eval_batches=0", "train.eval_batches must be positive, got 0"),
        ("train.adam_beta2=1", "train.adam_beta2 must be in [0, 1), got 1.0"),
        ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be > 1"),
    ],
)
def test_config_values_that_cannot_make_sense(capsys, override: str, expected: str) -> None:
    assert one_line_error(capsys, ["train", override]).startswith(expected)


# -- data -----------------------------------------------------------------------------------------


def test_truncated_bin_names_the_file_and_both_sizes(capsys, tmp_path, texts, spm) -> None:
    prefix = indexed(tmp_path / "corpus", texts, spm)
    bin_path = prefix.with_suffix(".bin")
    size = bin_path.stat().st_size
    with open(bin_path, "r+b") as stream:
        stream.truncate(size - 10)
    message = one_line_error(capsys, ["data", "inspect", str(prefix)], "data")
    assert message.startswith(f"{bin_path}: {size - 10} bytes, but {prefix}.idx describes {size}")
    # the same file behind a training config
    argv = train_argv(tmp_path, "data.corpus=indexed", f"data.corpus_paths=[{prefix}]",
                      f"data.tokenizer={spm}")  # fmt: skip
    assert one_line_error(capsys, argv) == message


def test_truncated_idx_names_the_file_and_both_sizes(capsys, tmp_path, texts, spm) -> None:
    prefix = indexed(tmp_path / "corpus", texts, spm)
    idx_path = prefix.with_suffix(".idx")
    size = idx_path.stat().st_size
    with open(idx_path, "r+b") as stream:
        stream.truncate(size - 8)
    message = one_line_error(capsys, ["data", "inspect", str(prefix)], "data")
    assert message.startswith(f"{idx_path}: {size - 8} bytes, but its header")
    assert f"implies {size}" in message


def test_an_empty_preprocessed_dataset(capsys, tmp_path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "empty"
    IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16).finalize(f"{prefix}.idx")
    message = one_line_error(capsys, ["data", "inspect", str(prefix)], "data")
    assert message.startswith(f"indexed dataset {prefix} is empty (0 documents, no tokens)")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "the file holds no records"),
        ("\n  \n\n", "the file holds no records"),
        ('{"text": ""}\n{"text": "  "}\n', "is empty: 2 documents, every one blank"),
    ],
    ids=["no bytes", "blank lines", "empty texts"],
)
def test_an_empty_jsonl_corpus(capsys, tmp_path, content: str, expected: str) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(content)
    message = one_line_error(
        capsys, train_argv(tmp_path, "data.corpus=jsonl", f"data.corpus_paths=[{corpus}]")
    )
    assert str(corpus) in message and message.endswith(expected)


def test_preprocessing_an_empty_corpus(capsys, tmp_path, spm) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n\n")
    argv = ["preprocess", "--input", str(corpus), "--tokenizer", str(spm), "--out",
            str(tmp_path / "out")]  # fmt: skip
    assert one_line_error(capsys, argv, "preprocess") == f"{corpus}: no documents to write"


def test_malformed_jsonl_lines_keep_their_file_and_line(capsys, tmp_path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": oops}\n')
    message = one_line_error(
        capsys, train_argv(tmp_path, "data.corpus=jsonl", f"data.corpus_paths=[{corpus}]")
    )
    assert message.startswith(f"{corpus}:2: not valid JSON")


def test_a_corpus_too_small_for_a_validation_share_is_refused_not_a_hang(
    capsys, tmp_path, texts
) -> None:
    """20 documents at 98,1,1: megatron's split leaves validation and test no document, and
    its GPTDataset would add empty epochs forever."""
    corpus = tmp_path / "small.jsonl"
    write_jsonl_texts(texts[:20], corpus)
    argv = train_argv(tmp_path, "data.corpus=jsonl", f"data.corpus_paths=[{corpus}]",
                      "data.tokenizer_vocab_size=400", "data.max_docs=null")  # fmt: skip
    message = one_line_error(capsys, argv)
    assert message.startswith(f"the corpus data.corpus=jsonl ({corpus}) has 20 documents (")
    assert "too few for data.split='98,1,1': its validation share gets none" in message
    assert message.endswith("use at least 76 documents or a larger validation share")


def test_a_blend_with_one_corpus_too_small_names_it(capsys, tmp_path, texts, spm) -> None:
    big = indexed(tmp_path / "big", texts, spm)
    small = indexed(tmp_path / "small", texts[:2], spm)
    argv = train_argv(tmp_path, "data.corpus=indexed", f"data.corpus_paths=[{big}, {small}]",
                      f"data.tokenizer={spm}", "data.split='90,10,0'")  # fmt: skip
    message = one_line_error(capsys, argv)
    assert message.startswith(f"indexed dataset {small} has 2 documents (")
    assert "its validation share gets none" in message and "at least 5 documents" in message


@pytest.mark.parametrize("split", ["98,1,1", "99,1,0", "1,1,1", "90,10,0"])
def test_the_share_check_passes_exactly_where_megatron_builds(tmp_path, split) -> None:
    """Against megatron's own builder: refused below the document count the check names, and
    built (finitely) at it."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Tok:
        eod, pad, vocab_size, unique_identifiers = 0, 0, 8, {"class": "Tok"}

    def documents(n: int) -> Path:
        prefix = tmp_path / f"docs{n}"
        write_indexed_dataset([[1, 2, 3, 4, 0]] * n, prefix, vocab_size=8)
        return prefix

    with pytest.raises(IndexedDatasetError) as info:
        check_split_shares([documents(2)], split)
    needed = int(str(info.value).rsplit("at least ", 1)[1].split()[0])
    with pytest.raises(IndexedDatasetError):
        check_split_shares([documents(needed - 1)], split)
    prefix = documents(needed)
    check_split_shares([prefix], split)
    config = GPTDatasetConfig(random_seed=1, sequence_length=4, blend=([str(prefix)], None),
                              split=split, path_to_cache=None, tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False)  # fmt: skip
    built = BlendedMegatronDatasetBuilder(GPTDataset, [8, 2, 0], lambda: True, config).build()
    assert len(built[0]) >= 8 and len(built[1]) >= 2


# -- conversion -----------------------------------------------------------------------------------


def hf_dir(root: Path) -> Path:
    from hf_models import COMMON

    root.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **COMMON}
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_a_truncated_safetensors_file_is_named(capsys, tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    model = hf_dir(tmp_path / "hf")
    weights = model / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    argv = ["convert", "hf-to-sci", "--hf", str(model), "--out", str(tmp_path / "out")]
    message = one_line_error(capsys, argv, "convert")
    assert message.startswith(f"{weights}: not a readable safetensors file (")
    assert f"{len(data) // 2} bytes" in message
    weights.write_bytes(b"\xff" * 64)  # "header too large"
    assert "header too large" in one_line_error(capsys, argv, "convert")


def test_a_config_json_that_is_not_json_is_named(capsys, tmp_path) -> None:
    model = hf_dir(tmp_path / "hf")
    text = '{"architectures": ["LlamaForCausalLM"],'
    (model / "config.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(text)
    argv = ["convert", "hf-to-sci", "--hf", str(model), "--out", str(tmp_path / "out")]
    message = one_line_error(capsys, argv, "convert")
    assert message.startswith(f"{model / 'config.json'}: not valid JSON (")
    assert f"line 1, column {parsed.value.colno})" in message


# -- signals --------------------------------------------------------------------------------------


def test_a_signal_held_before_the_trainer_listens_stops_it() -> None:
    from sci_scale.train.stopping import StopConditions, hold_early_signals, release_early_signals

    before = signal.getsignal(signal.SIGUSR1)
    held = hold_early_signals()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # noted, not fatal
        stops = StopConditions(max_wall_minutes=1e-9, is_main=True, world_size=1)
        with stops:
            assert stops.reason(wall_clock=False) == "signal SIGUSR1"
        assert release_early_signals(held) is None  # taken over, so nothing is left pending
    finally:
        release_early_signals(held)
    assert signal.getsignal(signal.SIGUSR1) is before
    # without a signal, the pre-step check ignores the wall clock: each job makes progress
    with StopConditions(max_wall_minutes=1e-9, is_main=True, world_size=1) as stops:
        assert stops.reason(wall_clock=False) is None
        assert stops.reason() == "train.max_wall_minutes=1e-09 reached"


# A trainer whose data build is interrupted by a signal, as a preempted Slurm job's would be.
SIGNAL_DURING_SETUP = textwrap.dedent(
    """
    import os, signal, sys
    import sci_scale.train.trainer as trainer
    build_data = trainer.build_data

    def build_data_signalled(cfg, run_dir):
        os.kill(os.getpid(), signal.Signals[sys.argv[1]])
        return build_data(cfg, run_dir)

    trainer.build_data = build_data_signalled
    from sci_scale.cli.main import main
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_during_set_up_stops_cleanly_before_the_first_step(
    tmp_path, data_cache, name: str
) -> None:
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_DURING_SETUP)
    run_dir = tmp_path / "run"
    argv = ["train", *small_overrides(run_dir, data_cache), "train.steps=3"]
    proc = subprocess.run([sys.executable, str(script), name, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"received {name} during set-up: stopping before the first step" in out
    assert f"stopping before step 1 (signal {name}): nothing new to save" in out
    assert "Traceback" not in out
    assert (run_dir / "metrics.jsonl").read_text() == ""  # no step ran
    assert not (run_dir / "checkpoints").exists()


def test_other_commands_keep_the_default_signal_handling(tmp_path) -> None:
    """Only ``train`` holds the signals: a signal to another command ends it as before."""
    code = (
        "import os, signal, sys\n"
        "import sci_scale.cli.data as data\n"
        "data.cmd_pairs_scan = lambda args: os.kill(os.getpid(), signal.SIGTERM) or 0\n"
        "from sci_scale.cli.main import main\n"
        "sys.exit(main(['pairs', 'scan', '--split', 'simple']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGTERM, proc.stderr
