"""Each megatron-core CPU shim: the need for it (unpatched megatron fails without CUDA) and the fix.

Shims patch process-globally, so every check runs in a fresh interpreter: it first drives the
megatron code path unpatched and records the failure, then applies that one shim alone and
drives the same path again. When a megatron-core upgrade removes a need, the ``*_is_needed``
test fails and the shim can be deleted (see the ``cpu_compat`` module docstring).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sci_scale.runtime import cpu_compat
from sci_scale.runtime.cpu_compat import SHIMS

REPO = Path(__file__).resolve().parents[1]

needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CUDA is available here, so unpatched megatron-core does not fail; the need for a "
    "CPU shim can only be shown on a CPU-only torch",
)

PRELUDE = """
import json, sys, traceback, warnings
warnings.simplefilter("ignore")
import torch
from sci_scale.runtime.cpu_compat import SHIMS

result = {}

def attempt(key, fn):
    try:
        result[key] = {"ok": True, "value": fn()}
    except BaseException as exc:  # record the failure, whatever it is
        result[key] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(),
        }
"""


def run_script(body: str, timeout: int = 240) -> dict:
    """Run PRELUDE + body in a fresh interpreter; the body fills ``result``, printed as JSON."""
    code = PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(result))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"script failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def _failed_on_cuda(outcome: dict) -> bool:
    text = outcome.get("trace", "") + outcome.get("error", "")
    return not outcome["ok"] and ("CUDA" in text or "cuda" in text)


# --- 1. rng_tracker ------------------------------------------------------------------------------

RNG_SCRIPT = """
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mrandom

def seed_and_draw():
    tensor_parallel.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    return True

attempt("unpatched_seed", seed_and_draw)
attempt("unpatched_add", lambda: mrandom.CudaRNGStatesTracker().add("x", 7))

SHIMS["rng_tracker"]()

def forked_draws():
    tensor_parallel.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(99)
    outer_before = torch.get_rng_state().clone()
    with tracker.fork():
        inside = torch.rand(4)
        device = str(inside.device)
    outer_restored = bool(torch.equal(torch.get_rng_state(), outer_before))
    with tracker.fork():
        inside_next = torch.rand(4)  # the tracked state advanced: a new draw
    # a fresh tracker with the same seed gives the same stream: reproducible
    fresh = mrandom.CudaRNGStatesTracker()
    fresh.add("model-parallel-rng", 1234 + 2718)
    with fresh.fork():
        again = torch.rand(4)
    return {
        "tracker_class": type(tracker).__name__,
        "inside": inside.tolist(),
        "inside_next": inside_next.tolist(),
        "again": again.tolist(),
        "device": device,
        "outer_restored": outer_restored,
        "outer_draw": torch.rand(2).tolist(),
    }

attempt("patched", forked_draws)
torch.manual_seed(99)
result["reference_outer_draw"] = torch.rand(2).tolist()
"""


@pytest.fixture(scope="module")
def rng_result() -> dict:
    return run_script(RNG_SCRIPT)


@needs_cpu_only
@pytest.mark.slow
def test_rng_tracker_is_needed(rng_result):
    # megatron's tracker stores CUDA generator states: without CUDA, seeding it fails.
    assert _failed_on_cuda(rng_result["unpatched_seed"]), rng_result["unpatched_seed"]
    assert _failed_on_cuda(rng_result["unpatched_add"]), rng_result["unpatched_add"]


@pytest.mark.slow
def test_rng_tracker_shim_forks_the_cpu_generator(rng_result):
    patched = rng_result["patched"]
    assert patched["ok"], patched.get("trace")
    value = patched["value"]
    assert value["tracker_class"] == "CPURNGStatesTracker"
    assert value["device"] == "cpu"
    # reproducible: a tracker seeded the same way draws the same numbers
    assert value["inside"] == value["again"]
    # the tracked state advances across forks
    assert value["inside_next"] != value["inside"]
    # the outer (default) generator is untouched by what happens inside the fork
    assert value["outer_restored"]
    assert value["outer_draw"] == rng_result["reference_outer_draw"]


# --- 2. current_device ---------------------------------------------------------------------------

DEVICE_SCRIPT = """
from megatron.core.utils import GlobalMemoryBuffer

def buffer_tensor():
    t = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    return {"device": str(t.device), "shape": list(t.shape)}

attempt("unpatched_current_device", lambda: str(torch.cuda.current_device()))
attempt("unpatched_buffer", buffer_tensor)
SHIMS["current_device"]()
attempt("patched_current_device", lambda: str(torch.cuda.current_device()))
attempt("patched_buffer", buffer_tensor)
"""


@pytest.fixture(scope="module")
def device_result() -> dict:
    return run_script(DEVICE_SCRIPT)


@needs_cpu_only
@pytest.mark.slow
def test_current_device_is_needed(device_result):
    assert _failed_on_cuda(device_result["unpatched_current_device"])
    # megatron's global memory buffer allocates on torch.cuda.current_device()
    assert _failed_on_cuda(device_result["unpatched_buffer"])


@pytest.mark.slow
def test_current_device_shim_gives_the_cpu(device_result):
    assert device_result["patched_current_device"] == {"ok": True, "value": "cpu"}
    buf = device_result["patched_buffer"]
    assert buf["ok"], buf.get("trace")
    assert buf["value"] == {"device": "cpu", "shape": [2, 3]}


# --- 3. synchronize ------------------------------------------------------------------------------

SYNC_SCRIPT = """
import tempfile
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

def save_and_load():
    directory = tempfile.mkdtemp()
    weights = torch.arange(6.0).reshape(2, 3)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weights)}, directory)
    empty = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 3))}
    return dist_checkpointing.load(empty, directory)["w"].tolist()

def main():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    # saving also allocates on torch.cuda.current_device() (shim 2, tested above): patch that
    # first, so that what fails below is synchronize alone
    SHIMS["current_device"]()
    attempt("unpatched_synchronize", lambda: torch.cuda.synchronize())
    attempt("unpatched_save", save_and_load)
    SHIMS["synchronize"]()
    attempt("patched_synchronize", lambda: torch.cuda.synchronize())
    attempt("patched_save", save_and_load)
    dist.destroy_process_group()

if __name__ == "__main__":  # dist_checkpointing may start worker processes
    main()
"""


@pytest.fixture(scope="module")
def sync_result() -> dict:
    return run_script(SYNC_SCRIPT)


@needs_cpu_only
@pytest.mark.slow
def test_synchronize_is_needed(sync_result):
    assert _failed_on_cuda(sync_result["unpatched_synchronize"])
    # megatron's distributed checkpoint save calls torch.cuda.synchronize() after host copies
    save = sync_result["unpatched_save"]
    assert _failed_on_cuda(save), save
    assert "in synchronize" in save["trace"]


@pytest.mark.slow
def test_synchronize_shim_lets_dist_checkpointing_round_trip(sync_result):
    assert sync_result["patched_synchronize"] == {"ok": True, "value": None}
    save = sync_result["patched_save"]
    assert save["ok"], save.get("trace")
    assert save["value"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


# --- 4. cuda_literals ----------------------------------------------------------------------------

LITERALS_SCRIPT = """
import inspect
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import schedules
from megatron.core.transformer import TransformerConfig

result["literal_in_source"] = 'device="cuda"' in inspect.getsource(
    schedules.forward_backward_no_pipelining
)

def run_schedule():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model.config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    model.model_type = ModelType.encoder_or_decoder
    model.set_input_tensor = lambda tensor: None

    def step(data, module):
        out = module(next(data))
        return out, lambda o: (o.sum(), {"loss": o.sum().detach()})

    losses = schedules.forward_backward_no_pipelining(
        forward_step_func=step,
        data_iterator=iter([torch.ones(2, 3)] * 2),
        model=model,
        num_microbatches=2,
        seq_length=1,
        micro_batch_size=2,
    )
    grad = model.weight.grad
    return {"losses": len(losses), "grad_device": str(grad.device), "grad": grad.tolist()}

def module_level_zeros():
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    return {"device": str(t.device), "dtype": str(t.dtype)}

def main():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    attempt("unpatched_zeros", lambda: str(torch.zeros([], device="cuda").device))
    attempt("unpatched_schedule", run_schedule)
    SHIMS["cuda_literals"]()
    attempt("patched_zeros", module_level_zeros)
    attempt("patched_schedule", run_schedule)
    # the proxy affects the listed module only, not torch itself
    attempt("global_torch_zeros", lambda: str(torch.zeros([], device="cuda").device))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()

main()
"""


@pytest.fixture(scope="module")
def literals_result() -> dict:
    return run_script(LITERALS_SCRIPT)


@needs_cpu_only
@pytest.mark.slow
def test_cuda_literals_is_needed(literals_result):
    assert literals_result["literal_in_source"], "schedules no longer allocate on 'cuda'"
    assert _failed_on_cuda(literals_result["unpatched_zeros"])
    # megatron's no-pipelining schedule allocates its token counter with device="cuda"
    assert _failed_on_cuda(literals_result["unpatched_schedule"])


@pytest.mark.slow
def test_cuda_literals_shim_runs_the_schedule_on_cpu(literals_result):
    assert literals_result["patched_zeros"] == {
        "ok": True,
        "value": {"device": "cpu", "dtype": "torch.int32"},
    }
    run = literals_result["patched_schedule"]
    assert run["ok"], run.get("trace")
    assert run["value"]["losses"] == 2
    assert run["value"]["grad_device"] == "cpu"
    # d(sum(W x))/dW over 2 rows of ones is 2 per micro-batch; megatron averages micro-batches
    assert run["value"]["grad"] == [[2.0, 2.0, 2.0]]
    if not torch.cuda.is_available():
        assert not literals_result["global_torch_zeros"]["ok"]


# --- the registry itself -------------------------------------------------------------------------


# --- 5. tensor_cuda -------------------------------------------------------------------------------

TENSOR_CUDA_SCRIPT = """
def move():
    t = torch.arange(3.0)
    moved = t.cuda()
    return {"device": str(moved.device), "same": moved is t}

attempt("unpatched", move)
SHIMS["tensor_cuda"]()
attempt("patched", move)
"""


@pytest.fixture(scope="module")
def tensor_cuda_result() -> dict:
    return run_script(TENSOR_CUDA_SCRIPT)


@needs_cpu_only
def test_tensor_cuda_is_needed(tensor_cuda_result):
    # megatron's LanguageModule calls weight.data.cuda() on the last pipeline stage's tied
    # output weight; on a CPU build that raises.
    assert _failed_on_cuda(tensor_cuda_result["unpatched"])


def test_tensor_cuda_shim_is_the_identity(tensor_cuda_result):
    assert tensor_cuda_result["patched"] == {"ok": True, "value": {"device": "cpu", "same": True}}


def test_shims_and_docstring_agree():
    doc = cpu_compat.__doc__ or ""
    listed = re.findall(r"^(\d+)\. ``(\w+)``", doc, flags=re.MULTILINE)
    assert [int(n) for n, _ in listed] == list(range(1, len(listed) + 1))
    assert [name for _, name in listed] == list(SHIMS)
    assert all(callable(shim) for shim in SHIMS.values())


def test_every_shim_has_a_need_and_a_fix_test():
    names = [n for n in globals() if n.startswith("test_")]
    for shim in SHIMS:
        assert f"test_{shim}_is_needed" in names, shim
        assert any(n.startswith(f"test_{shim}_shim_") for n in names), shim


IDEMPOTENT_SCRIPT = """
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mrandom
from sci_scale.runtime.cpu_compat import apply_cpu_compat

result["first"] = apply_cpu_compat(force=True)
state = (torch.cuda.current_device, torch.cuda.synchronize, schedules.torch,
         mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker)
mrandom._CUDA_RNG_STATE_TRACKER.add("kept", 5)
result["second"] = apply_cpu_compat(force=True)
result["third"] = apply_cpu_compat()
again = (torch.cuda.current_device, torch.cuda.synchronize, schedules.torch,
         mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker)
result["same_objects"] = all(a is b for a, b in zip(state, again))
result["tracker_kept_state"] = "kept" in mrandom._CUDA_RNG_STATE_TRACKER.get_states()
"""


def test_apply_cpu_compat_is_idempotent():
    out = run_script(IDEMPOTENT_SCRIPT)
    assert out["first"] == list(SHIMS)
    assert out["second"] == []
    assert out["third"] == []
    # a second application must not replace the tracker (it would drop its seeded states)
    assert out["same_objects"]
    assert out["tracker_kept_state"]
