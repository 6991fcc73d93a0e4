"""Corpus files -> megatron indexed datasets: exact, deterministic, resumable, hard to misuse."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hf_models import write_tokenizer
from launchers import REPO

from sci_scale.config import load_config
from sci_scale.data import preprocess as pre
from sci_scale.data.corpus import CorpusError, stdlib_docstrings, write_jsonl_texts
from sci_scale.data.indexed import open_indexed_dataset
from sci_scale.data.loader import MicroBatches
from sci_scale.data.preprocess import PreprocessOptions, preprocess
from sci_scale.data.tokenizer import load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_docstrings(max_docs=300)


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    root = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(texts, root / "tok", vocab_size=600)


def jsonl(path: Path, texts: list[str]) -> Path:
    write_jsonl_texts(texts, path)
    return path


def run(inputs: list[Path | str], tokenizer: Path, out: Path, **kw) -> pre.PreprocessResult:
    opts = PreprocessOptions([str(i) for i in inputs], str(tokenizer), str(out), **kw)
    return preprocess(opts, progress=False)


def decoded(prefix: Path, tokenizer) -> list[str]:
    data = open_indexed_dataset(prefix)
    out = []
    for i in range(len(data)):
        ids = data[i]
        assert ids[-1] == tokenizer.eod  # every document ends in eod
        out.append(tokenizer.detokenize(ids[:-1]))
    return out


def test_round_trip_with_sentencepiece(tmp_path: Path, texts: list[str], spm: Path) -> None:
    src = jsonl(tmp_path / "a.jsonl", texts)
    result = run([src], spm, tmp_path / "out", shard_docs=64)
    assert (result.documents, result.skipped) == (len(texts), {})
    assert decoded(tmp_path / "out", load_tokenizer(spm)) == texts
    assert not (tmp_path / "out.shards").exists()  # shards are gone once merged
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["documents"] == len(texts) and meta["tokenizer"]["sha256"]


def test_round_trip_with_a_hugging_face_tokenizer(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_tokenizer(hf_dir)
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 150, rng.integers(1, 60))) for _ in range(50)]
    src = jsonl(tmp_path / "a.jsonl", docs)
    run([src], hf_dir, tmp_path / "out", shard_docs=16)
    assert decoded(tmp_path / "out", load_tokenizer(hf_dir)) == docs


def test_one_and_two_workers_write_identical_files(
    tmp_path: Path, texts: list[str], spm: Path
) -> None:
    inputs = [jsonl(tmp_path / "a.jsonl", texts[:170]), jsonl(tmp_path / "b.jsonl", texts[170:])]
    run([str(tmp_path / "*.jsonl")], spm, tmp_path / "one", workers=1, shard_docs=40)
    run(inputs, spm, tmp_path / "two", workers=2, shard_docs=40)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one{suffix}").read_bytes()
        assert one == (tmp_path / f"two{suffix}").read_bytes(), suffix


def test_other_formats_give_the_same_dataset(tmp_path: Path, texts: list[str], spm: Path) -> None:
    import datasets

    reference = run([jsonl(tmp_path / "a.jsonl", texts)], spm, tmp_path / "ref")
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "array.json").write_text(json.dumps([{"text": t} for t in texts]))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    expected = (tmp_path / "ref.bin").read_bytes()
    for name, source in (
        ("parquet", tmp_path / "a.parquet"),
        ("saved", tmp_path / "saved"),
        ("arrow", arrow),
        ("json", tmp_path / "array.json"),
    ):
        result = run([source], spm, tmp_path / name, shard_docs=100)
        assert result.documents == reference.documents, name
        assert (tmp_path / f"{name}.bin").read_bytes() == expected, name


@pytest.mark.parametrize(
    ("content", "message", "kind"),
    [
        (b'{"text": "fine"}\n{"text": broken\n', r"a\.jsonl:2: not valid JSON", "not JSON"),
        (b'{"text": "fine"}\n{"body": "x"}\n', r"a\.jsonl:2: no 'text' key", "missing key"),
        (b'{"text": "fine"}\n{"text": "\xff\xfe"}\n', r"a\.jsonl:2: invalid UTF-8", "not UTF-8"),
    ],
)
def test_bad_record_names_file_and_line_or_is_counted(
    tmp_path: Path, spm: Path, content: bytes, message: str, kind: str
) -> None:
    src = tmp_path / "a.jsonl"
    src.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        run([src], spm, tmp_path / "out")
    assert not (tmp_path / "out.idx").exists()
    result = run([src], spm, tmp_path / "out", skip_bad=True)
    assert result.documents == 1 and result.skipped == {kind: 1}


def test_empty_file_is_an_error_or_a_counted_skip(tmp_path: Path, spm: Path) -> None:
    empty, good = tmp_path / "empty.jsonl", jsonl(tmp_path / "good.jsonl", ["some text"])
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"empty\.jsonl: the file is empty"):
        run([good, empty], spm, tmp_path / "out")
    assert run([good, empty], spm, tmp_path / "out", skip_bad=True).skipped == {"empty file": 1}


def test_missing_column_names_the_columns(tmp_path: Path, spm: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(CorpusError, match=r"no 'text' column \(columns: body\)"):
        run([tmp_path / "a.parquet"], spm, tmp_path / "out")


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_truncated_files_are_detected_at_load(
    tmp_path: Path, texts: list[str], spm: Path, suffix: str
) -> None:
    run([jsonl(tmp_path / "a.jsonl", texts)], spm, tmp_path / "out")
    path = tmp_path / f"out{suffix}"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        open_indexed_dataset(tmp_path / "out")


def test_interrupted_run_resumes_to_the_same_files(
    tmp_path: Path, texts: list[str], spm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = jsonl(tmp_path / "a.jsonl", texts)
    run([src], spm, tmp_path / "straight", shard_docs=50)

    real, calls = pre._write_shard, []

    def interrupted(task):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during shard 3
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(pre, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([src], spm, tmp_path / "resumed", shard_docs=50)
    monkeypatch.undo()
    assert not (tmp_path / "resumed.idx").exists()  # nothing that looks finished
    result = run([src], spm, tmp_path / "resumed", shard_docs=50)
    assert result.shards_reused == 3
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"resumed{suffix}").read_bytes() == (
            tmp_path / f"straight{suffix}"
        ).read_bytes()


def test_changed_input_discards_old_shards(tmp_path: Path, texts: list[str], spm: Path) -> None:
    shards = tmp_path / "out.shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # shards of some other input
    (shards / "shard_000000.idx").write_bytes(b"stale")
    result = run([jsonl(tmp_path / "a.jsonl", texts)], spm, tmp_path / "out")
    assert result.shards_reused == 0
    assert decoded(tmp_path / "out", load_tokenizer(spm)) == texts


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory: pytest.TempPathFactory, texts: list[str], spm: Path):
    root = tmp_path_factory.mktemp("corpora")
    run([jsonl(root / "a.jsonl", texts[:150])], spm, root / "a")
    run([jsonl(root / "b.jsonl", texts[150:])], spm, root / "b")
    return root


def blend_config(root: Path, spm: Path, seed: int, cache: Path):
    return load_config(
        None,
        [
            f"run.dir={root / 'run'}",
            f"data.cache_dir={cache}",
            "data.corpus=indexed",
            f"data.corpus_paths=[{root / 'a'}, {root / 'b'}]",
            "data.corpus_weights=[0.7, 0.3]",
            f"data.tokenizer={spm}",
            "data.pair_rate=0.05",
            "data.arithmetic_per_template=8",
            "model.seq_length=64",
            "train.steps=625",
            "train.global_batch_size=16",
            "train.micro_batch_size=16",
            f"train.seed={seed}",
        ],
    )


def test_blend_of_two_corpora_and_pairs_is_realised_and_deterministic(
    two_corpora: Path, spm: Path, tmp_path: Path
) -> None:
    from sci_scale.data.inspect import realised_blend
    from sci_scale.data.pipeline import build_data

    prefixes = [str(two_corpora / "a"), str(two_corpora / "b")]
    cfg = blend_config(two_corpora, spm, 1234, tmp_path / "cache")
    bundle = build_data(cfg, tmp_path)
    blend = realised_blend(bundle, prefixes, 10_000)
    assert blend["pairs"] == pytest.approx(0.05, abs=0.01)
    assert blend[prefixes[0]] == pytest.approx(0.95 * 0.7, abs=0.01)
    assert blend[prefixes[1]] == pytest.approx(0.95 * 0.3, abs=0.01)
    assert sum(blend.values()) == pytest.approx(1.0)

    def order(bundle) -> np.ndarray:
        return np.stack([bundle.train[i]["tokens"] for i in range(0, 10_000, 97)])

    again = build_data(blend_config(two_corpora, spm, 1234, tmp_path / "cache2"), tmp_path)
    other = build_data(blend_config(two_corpora, spm, 99, tmp_path / "cache3"), tmp_path)
    assert np.array_equal(order(bundle), order(again))  # same seed, fresh cache: same blocks
    assert not np.array_equal(order(bundle), order(other))


def test_indexed_corpus_from_another_tokenizer_is_refused(
    two_corpora: Path, texts: list[str], tmp_path: Path
) -> None:
    from sci_scale.data.pipeline import build_data

    other = train_sentencepiece(texts, tmp_path / "other", vocab_size=700)
    cfg = blend_config(two_corpora, other, 1, tmp_path / "cache")
    with pytest.raises(CorpusError, match="preprocess it again with this tokenizer"):
        build_data(cfg, tmp_path)


def test_data_parallel_layouts_read_the_same_global_batches(two_corpora: Path, spm: Path) -> None:
    """Resuming at another DP size (same global batch) continues with the same blocks."""
    from sci_scale.data.pipeline import build_data

    bundle = build_data(blend_config(two_corpora, spm, 1234, two_corpora / "cache"), two_corpora)
    gbs, consumed = 16, 160  # a resume after 10 steps

    def step_blocks(dp: int, mbs: int) -> list[bytes]:
        blocks = []
        for rank in range(dp):
            source = MicroBatches(bundle.train, consumed, mbs, rank, dp)
            for _ in range(gbs // (mbs * dp)):
                blocks += [row.numpy().tobytes() for row in next(source)["tokens"]]
        return sorted(blocks)

    reference = step_blocks(1, 16)
    assert step_blocks(2, 8) == reference
    assert step_blocks(4, 2) == reference


@pytest.mark.slow
def test_cli_preprocess_and_inspect(tmp_path: Path, texts: list[str], spm: Path) -> None:
    src = jsonl(tmp_path / "a.jsonl", texts)

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "sci_scale", *args], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    out = cli("preprocess", "--input", str(src), "--tokenizer", str(spm), "--out",
              str(tmp_path / "c"), "--workers", "2", "--shard-docs", "100")  # fmt: skip
    assert f"{len(texts):,} documents" in out.stdout and "bytes per token" in out.stdout
    shown = cli("data", "inspect", str(tmp_path / "c")).stdout
    assert f"documents   {len(texts):,}" in shown and "length histogram" in shown
    assert repr(texts[0][:40])[1:-1] in shown  # the decoded sample


def test_training_reads_preprocessed_corpora(two_corpora: Path, spm: Path, tmp_path: Path) -> None:
    from sci_scale.train.trainer import train

    cfg = load_config(
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.corpus=indexed",
            f"data.corpus_paths=[{two_corpora / 'a'}, {two_corpora / 'b'}]",
            "data.corpus_weights=[0.7, 0.3]",
            f"data.tokenizer={spm}",
            "data.arithmetic_per_template=8",
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.seq_length=64",
            "sci.hidden_size=32",
            "sci.num_layers=1",
            "train.steps=3",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "logging.wandb_mode=disabled",
        ],
    )
    result = train(cfg)
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert all(np.isfinite(r["lm_loss"]) for r in result.history)


def test_inspect_describes_what_was_written(tmp_path: Path, texts: list[str], spm: Path) -> None:
    from sci_scale.data.inspect import describe_dataset, inspect_dataset

    docs = [texts[0], "x", "a few words", *texts[1:60]]  # short ones fill the low buckets
    run([jsonl(tmp_path / "a.jsonl", docs)], spm, tmp_path / "c", shard_docs=25)
    tok = load_tokenizer(spm)
    lengths = [len(tok.tokenize(d)) + 1 for d in docs]  # every document ends in eod
    shown = inspect_dataset(str(tmp_path / "c"), None, None, 100).splitlines()
    assert shown[:3] == [
        f"dataset     {tmp_path / 'c'}",
        f"documents   {len(docs):,}",
        f"tokens      {sum(lengths):,}",
    ]
    assert shown[3] == (
        f"length      min {min(lengths)}, median {int(statistics.median(lengths))}, "
        f"mean {statistics.mean(lengths):.1f}, max {max(lengths)} tokens"
    )
    bytes_per_token = (tmp_path / "c.bin").stat().st_size / sum(lengths)
    assert bytes_per_token == 2.0 and shown[4] == "on disk     2.00 bytes per token (uint16)"

    # power-of-two buckets: a length n falls in [2**(b-1), 2**b) with b = n.bit_length()
    buckets = Counter(n.bit_length() for n in lengths)
    peak = max(buckets.values())
    histogram = shown[shown.index("length histogram (tokens: documents)") + 1 : -2]
    parsed = [re.fullmatch(r"\s+(\d+)-(\d+)\s+([\d,]+) (#*)", line) for line in histogram]
    assert all(parsed), histogram
    assert [(int(m[1]), int(m[2]), int(m[3].replace(",", ""))) for m in parsed] == [
        (2 ** (b - 1), 2**b - 1, buckets[b]) for b in sorted(buckets)
    ]
    assert [len(m[4]) for m in parsed] == [round(40 * buckets[b] / peak) for b in sorted(buckets)]

    # the sample is document 0, decoded with the tokenizer the metadata names
    assert shown[-2:] == [f"document 0, decoded with {spm}:", f"  {docs[0][:300] + ' ...'!r}"]
    (tmp_path / "c.meta.json").unlink()
    bare = describe_dataset(str(tmp_path / "c"))  # no metadata, no tokenizer: no sample
    assert bare.splitlines() == shown[:-2]
    given = describe_dataset(str(tmp_path / "c"), str(spm), sample_chars=4000).splitlines()
    assert given[:-2] == shown[:-2]
    # shorter than sample_chars: the whole document, no " ..."
    assert given[-2:] == [f"document 0, decoded with {spm}:", f"  {docs[0]!r}"]


def test_inspect_of_a_missing_dataset_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sci_scale.cli.main import main
    from sci_scale.data.inspect import inspect_dataset

    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"indexed dataset {missing}: missing"):
        inspect_dataset(str(missing), None, None, 100)
    assert main(["data", "inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    files = f"{missing}.bin, {missing}.idx"
    assert err == f"sci-scale data: error: indexed dataset {missing}: missing {files}\n"
    assert main(["data", "inspect"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give an indexed dataset PREFIX, --config CONFIG" in err


def test_inspect_with_a_config_prints_its_realised_blend(
    two_corpora: Path, spm: Path, tmp_path: Path
) -> None:
    import yaml

    from sci_scale.config.loader import config_to_dict, override_config
    from sci_scale.data.inspect import describe_blend, inspect_dataset
    from sci_scale.data.pipeline import build_data

    # arithmetic pairs only and 2,000 training blocks: the blend at a fraction of the cost
    small = ["train.steps=125", "data.pair_sources=[arithmetic]", "model.seq_length=128"]
    cfg = override_config(blend_config(two_corpora, spm, 1234, tmp_path / "cache"), small)
    config = tmp_path / "blend.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    prefix = str(two_corpora / "a")
    dataset, blend = inspect_dataset(prefix, None, str(config), 2000).split("\n\n")
    assert dataset.startswith(f"dataset     {prefix}\ndocuments   150\n")
    lines = blend.splitlines()
    assert lines[0] == f"realised blend over the first 2,000 training blocks of {config}:"
    targets = {prefix: 0.95 * 0.7, str(two_corpora / "b"): 0.95 * 0.3, "pairs": 0.05}
    shares = {}
    for line, (name, target) in zip(lines[1:], targets.items(), strict=True):
        m = re.fullmatch(rf"  {re.escape(name)}: (\d\.\d{{4}}) \(target (\d\.\d{{4}})\)", line)
        assert m, line
        shares[name] = float(m[1])
        assert float(m[2]) == round(target, 4)
        assert shares[name] == pytest.approx(target, abs=0.01)
    assert sum(shares.values()) == pytest.approx(1.0, abs=2e-4)
    available = len(build_data(cfg, tmp_path).train)
    more = describe_blend(str(config), 10**9).splitlines()[0]  # more blocks than there are
    assert more == f"realised blend over the first {available:,} training blocks of {config}:"
