"""Exported models, loaded by the client tools users load them with.

``test_convert`` proves the exported tensors and logits; a user, though, never reads logits: they
point ``transformers`` (``from_pretrained``, ``generate``, ``AutoTokenizer``) or
lm-evaluation-harness (``lm_eval --model hf``) at the directory. These tests run those clients, in
process and offline, on what ``sci_to_hf`` writes:

* lm-eval scores a local multiple-choice task (``tests/data/lm_eval_task``) on a model exported
  after HF -> sci-scale -> HF exactly as on the original: same accuracy, same log-likelihood for
  every request, over every example; a model with other weights scores differently, so the
  comparison can fail.
* A plain export (Llama- and SmolLM2-shaped) loads with no remote code, greedy ``generate`` gives
  the original's tokens and scores, and its tokenizer loads and round-trips text.
* An export with the SCI branch fused loads only with ``trust_remote_code=True``; then greedy
  ``generate`` runs, is deterministic, and decodes with the logits of the model's own full forward
  pass (its key/value cache must not cut the SCI branch's view of the text), and lm-eval scores
  it over every example.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import small_overrides
from hf_models import build_hf_model
from launchers import REPO

from sci_scale.config import load_config
from sci_scale.convert import hf

TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_task"
TASK = "sci_scale_words_mc"
PLAIN = ("llama", "smollm2")  # separate and tied embeddings
FUSED_TOLERANCE = 1e-5  # fp32, max |logits difference| of cached and full decoding


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Each plain family: the original HF directory and its HF -> sci-scale -> HF export."""
    root = tmp_path_factory.mktemp("clients")
    out = {}
    for name in PLAIN:
        src = build_hf_model(name, root / name)
        ckpt = hf.hf_to_sci(src, root / f"{name}-ckpt")
        out[name] = {"hf": src, "export": hf.sci_to_hf(ckpt, root / f"{name}-out", dtype="keep")}
    return out


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """A tiny sci-scale model trained a few steps with its SCI branch fused, exported."""
    from sci_scale.train.trainer import train

    root = tmp_path_factory.mktemp("fused")
    cfg = load_config(None, [*small_overrides(root / "run", data_cache), "train.steps=6",
                             "sci.fuse=true"])  # fmt: skip
    return hf.sci_to_hf(train(cfg).checkpoint, root / "export", dtype="keep")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Hugging Face libraries told they are offline, and every socket to a host other than
    this one refused and recorded: the test asserts the returned list stays empty."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # Both libraries read these at import: set what they read too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    attempts: list[str] = []

    def local(host: Any) -> bool:
        host = host.decode() if isinstance(host, bytes) else host
        if host is None or host == "localhost":
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(f"getaddrinfo {host}")
            raise OSError(f"test is offline: no lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            attempts.append(f"connect {address}")
            raise OSError(f"test is offline: no connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def local_task(directory: Path) -> Path:
    """The task YAML, copied into ``directory`` with its data file's path made absolute.

    datasets resolves a relative ``data_files`` against the current directory (not the YAML's),
    so the committed YAML's repository-relative path only works from the repository root. The
    datasets cache goes to ``directory`` too, so the JSONL is read afresh by every test.
    """
    spec = yaml.safe_load((TASK_DIR / f"{TASK}.yaml").read_text())
    data = REPO / spec["dataset_kwargs"]["data_files"]["test"]
    assert data.is_file(), data
    spec["dataset_kwargs"] = {
        "data_files": {"test": str(data)},
        "cache_dir": str(directory / "datasets-cache"),
    }
    directory.mkdir(parents=True)
    (directory / f"{TASK}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return directory


def task_lines() -> int:
    return len((TASK_DIR / f"{TASK}.jsonl").read_text().splitlines())


def lm_eval_run(model_dir: Path, task_dir: Path, **model_args: Any) -> dict[str, Any]:
    """``lm_eval --model hf --model_args pretrained=DIR,... --tasks TASK --include_path ...``
    on CPU, through lm-eval's Python API; the task's accuracy and its samples by doc id."""
    lm_eval = pytest.importorskip("lm_eval", reason="the test extra installs lm-eval[hf]")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs lm-eval[hf]")

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32", **model_args},
        tasks=[TASK],
        # The local task only: lm-eval's own catalogue takes seconds to index and is not used.
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
        device="cpu",
        batch_size=8,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = results["samples"][TASK]
    by_doc = {s["doc_id"]: s for s in samples}
    assert len(by_doc) == len(samples)
    return {
        "acc": results["results"][TASK]["acc,none"],
        "n_samples": results["n-samples"][TASK],
        "samples": by_doc,
    }


def loglikelihoods(run: dict[str, Any]) -> dict[tuple[int, int], float]:
    """Every (doc, choice) request's log-likelihood, as lm-eval logged it."""
    out = {}
    for doc_id, sample in run["samples"].items():
        assert len(sample["resps"]) == len(sample["doc"]["choices"])
        for choice, (resp,) in enumerate(sample["resps"]):
            out[doc_id, choice] = resp[0]
    return out


def assert_scored_every_example(run: dict[str, Any]) -> None:
    lines = task_lines()
    assert run["n_samples"] == {"original": lines, "effective": lines}
    assert sorted(run["samples"]) == list(range(lines))
    acc = run["acc"]
    assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0, acc
    # The accuracy is the mean of the per-example scores (each 0 or 1), over every example.
    per_example = [s["acc"] for s in run["samples"].values()]
    assert set(per_example) <= {0.0, 1.0}
    assert acc == pytest.approx(sum(per_example) / lines, abs=1e-12)


@pytest.mark.parametrize("name", PLAIN)
def test_lm_eval_scores_the_export_exactly_as_the_original(
    exports: dict, name: str, tmp_path: Path, offline: list[str]
) -> None:
    task_dir = local_task(tmp_path / "task")
    original = lm_eval_run(exports[name]["hf"], task_dir)
    exported = lm_eval_run(exports[name]["export"], task_dir)
    other = lm_eval_run(build_hf_model(name, tmp_path / "other", seed=1), task_dir)
    for run in (original, exported, other):
        assert_scored_every_example(run)

    assert exported["acc"] == original["acc"]
    for doc_id, sample in original["samples"].items():
        twin = exported["samples"][doc_id]
        assert twin["doc"] == sample["doc"]
        assert twin["resps"] == sample["resps"], doc_id
        assert twin["filtered_resps"] == sample["filtered_resps"], doc_id

    # Not a degenerate comparison: the log-likelihoods vary with the text, and other weights
    # change every one of them (so identical weights, not a constant model, made them equal).
    ll, other_ll = loglikelihoods(original), loglikelihoods(other)
    assert all(math.isfinite(v) for v in ll.values())
    assert len(set(ll.values())) > len(ll) // 2
    assert all(other_ll[k] != v for k, v in ll.items())
    assert offline == []


@pytest.mark.parametrize("name", PLAIN)
def test_plain_export_generates_the_originals_tokens(exports: dict, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = exports[name]["hf"], exports[name]["export"]
    assert not list(out.glob("*.py"))  # nothing for trust_remote_code to run
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    reference = AutoModelForCausalLM.from_pretrained(src)
    assert type(model) is type(reference)
    assert next(model.parameters()).dtype == torch.float32

    tok, reference_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(src)
    prompts = ["w5 w17 w3 w99 w120 w42", "w180 w0 w61 w7 w33 w150"]
    batch = tok(prompts, return_tensors="pt")
    assert torch.equal(batch.input_ids, reference_tok(prompts, return_tensors="pt").input_ids)

    def greedy(m):
        return m.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )

    got, expected = greedy(model), greedy(reference)
    assert got.sequences.shape == (2, batch.input_ids.shape[1] + 8)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 8
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores, strict=True))
    # Equal scores say something: they vary over the vocabulary, and with the prompt.
    new = got.sequences[:, batch.input_ids.shape[1] :]
    assert not torch.equal(new[0], new[1])
    assert all(float(s.std(dim=-1).min()) > 0 for s in got.scores)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_export_tokenizer_loads_and_round_trips(exports: dict, name: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports[name]["export"])
    reference = AutoTokenizer.from_pretrained(exports[name]["hf"])
    text = "w1 w2 w30 w195 w7"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [5, 6, 34, 199, 11]  # w<i> is id i + 4 in the test tokenizer
    assert ids == reference(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(tok, s) for s in specials] == [1, 2, 3, 0]


def test_fused_export_needs_trust_remote_code(fused_export: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert json.loads((fused_export / "config.json").read_text())["architectures"] == [
        "SciScaleForCausalLM"
    ]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(fused_export)


def fused_model_and_prompt(export: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    assert type(model).__name__ == "SciScaleForCausalLM"
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    return model, tok(["walk twice and jump left"], return_tensors="pt")


def test_fused_export_generates_with_remote_code(fused_export: Path) -> None:
    model, batch = fused_model_and_prompt(fused_export)
    prompt = batch.input_ids.shape[1]

    def greedy() -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    first, second = greedy(), greedy()
    assert first.shape == (1, prompt + 4)
    assert torch.equal(first[:, :prompt], batch.input_ids)
    assert torch.equal(first, second)


def test_fused_export_left_padded_batch_scores_each_row_as_alone(fused_export: Path) -> None:
    """Batched generation pads on the left: a padded row's logits (backbone and SCI branch:
    padding never attended to, positions counted from its first token) equal the row's alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        fused_export, trust_remote_code=True, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(fused_export, trust_remote_code=True)
    tok.padding_side = "left"
    texts = ["walk twice and jump left after run", "jump"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert int(batch.attention_mask[1].sum()) < batch.input_ids.shape[1]  # row 1 is padded
    inputs = model.prepare_inputs_for_generation(**batch)
    with torch.no_grad():
        padded = model(**inputs).logits
        for row, text in enumerate(texts):
            alone = tok([text], return_tensors="pt")
            logits = model(**model.prepare_inputs_for_generation(**alone)).logits[0]
            kept = batch.attention_mask[row].bool()
            assert torch.allclose(padded[row][kept], logits, atol=1e-5), row
    greedy = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for row, text in enumerate(texts):
        alone = model.generate(**tok([text], return_tensors="pt"), max_new_tokens=3,
                               min_new_tokens=3, do_sample=False)  # fmt: skip
        assert torch.equal(greedy[row, -3:], alone[0, -3:]), row


def test_fused_export_generate_is_greedy_decoding_of_its_own_forward(fused_export: Path) -> None:
    """``generate`` (with its key/value cache, as users call it) sees at each step the logits of
    the model's full forward pass over the whole text: the SCI branch must see all of it too.

    Logits, not only tokens: after a few training steps the gate is small (below 1e-2), so a
    branch that sees only the newest token moves the logits by about 1e-3, rarely the argmax."""
    model, batch = fused_model_and_prompt(fused_export)
    prompt = batch.input_ids.shape[1]
    out = model.generate(
        **batch,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (1, prompt + 4)
    with torch.no_grad():
        full = model(input_ids=out.sequences, use_cache=False).logits
    eos = model.generation_config.eos_token_id  # kept out by min_new_tokens
    assert len(out.logits) == 4
    for step, logits in enumerate(out.logits):
        expected = full[:, prompt - 1 + step]
        assert (logits - expected).abs().max() <= FUSED_TOLERANCE, step
        # Each token generate chose is the one the full forward pass ranks first.
        ranked = expected.clone()
        if eos is not None:
            ranked[:, eos] = -math.inf
        assert int(out.sequences[0, prompt + step]) == int(ranked.argmax(-1)), step


def test_fused_export_runs_under_lm_eval_with_remote_code(
    fused_export: Path, tmp_path: Path, offline: list[str]
) -> None:
    task_dir = local_task(tmp_path / "task")
    run = lm_eval_run(fused_export, task_dir, trust_remote_code=True)
    assert_scored_every_example(run)
    assert all(math.isfinite(v) for v in loglikelihoods(run).values())
    assert offline == []
