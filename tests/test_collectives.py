"""Collectives that cannot be wrong on NCCL, and a checker that makes a wrong one fail on CPU.

A tensor made without an explicit device lands on the CPU of a GPU node, and an NCCL collective
given it raises: the first-GPU-step failure no CPU test sees. ``collective_check`` marks such
tensors and rejects them at every ``torch.distributed`` collective; the parallel-layout tests
(tests/test_parallel.py) run the whole trainer under it. Here: the checker itself, in a real
two-process gloo group, catches the old trainer's patterns and passes the collectives module's;
and a trainer's parameters, buffers, batches and loss all sit on ``runtime.device`` and were all
placed there explicitly.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from launchers import REPO, torchrun_script

from sci_scale.runtime import collective_check
from sci_scale.runtime.collective_check import DefaultDeviceTracker, made_at

CHECKER_SCRIPT = """
import json, os
import torch
import torch.distributed as dist
from sci_scale.runtime import collective_check, collectives
from sci_scale.runtime.collective_check import CollectiveDeviceError

collective_check.install()
dist.init_process_group("gloo")
results = {}

def attempt(name, fn):
    try:
        fn()
        results[name] = "ok"
    except CollectiveDeviceError as exc:
        results[name] = "rejected: " + str(exc)

# what the trainer did before collectives.py: each is an NCCL error on a GPU node
attempt("stop_flags", lambda: dist.all_reduce(torch.tensor([1, 0], dtype=torch.int32)))
attempt("derived", lambda: dist.all_reduce(torch.tensor([3.0]) * 2))
attempt("count_gather", lambda: dist.all_gather(
    [torch.zeros(1, device="cpu") for _ in range(2)], torch.tensor([5.0])))
attempt("p2p", lambda: dist.batch_isend_irecv([dist.P2POp(
    dist.isend if dist.get_rank() == 0 else dist.irecv, torch.zeros(2),
    1 - dist.get_rank())])[0].wait())
# the collectives module and explicitly placed tensors
attempt("values", lambda: collectives.all_reduce_values([1, 2], op=collectives.ReduceOp.MAX))
attempt("placed", lambda: dist.all_reduce(torch.zeros(3, device="cpu")))
attempt("moved", lambda: dist.all_reduce(torch.tensor([1.0]).to(torch.device("cpu"))))
attempt("gather", lambda: collectives.all_gather(torch.ones(2, device="cpu")))
attempt("object", lambda: collectives.all_gather_object({"rank": dist.get_rank()}))
attempt("barrier", lambda: collectives.barrier())
if dist.get_rank() == 0:
    print("RESULT" + json.dumps(results))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def checker_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    script = tmp_path_factory.mktemp("checker") / "check.py"
    script.write_text(textwrap.dedent(CHECKER_SCRIPT))
    return torchrun_script(script)


@pytest.mark.parametrize("name", ["stop_flags", "derived", "count_gather", "p2p"])
def test_checker_rejects_default_device_tensors(checker_results: dict, name: str) -> None:
    outcome = checker_results[name]
    assert outcome.startswith("rejected"), outcome
    assert "made without an explicit device at " in outcome
    assert "check.py:" in outcome  # where it was made, in the user's file


@pytest.mark.parametrize("name", ["values", "placed", "moved", "gather", "object", "barrier"])
def test_checker_passes_placed_tensors(checker_results: dict, name: str) -> None:
    assert checker_results[name] == "ok"


def test_marks_follow_storage_and_moves_copy() -> None:
    with DefaultDeviceTracker():
        made = torch.tensor([1.0, 2.0])
        view = made[1:]
        placed = torch.zeros(2, device="cpu")
        mixed = made + placed
        moved = made.to("cpu")
        param = torch.nn.Parameter(torch.empty(3))
        module = torch.nn.Linear(2, 2)
        module.to(torch.device("cpu"))
        assert made_at(made) and made_at(view) and made_at(param)
        assert "test_collectives.py" in made_at(made)
        assert made_at(placed) is None and made_at(mixed) is None
        assert made_at(moved) is None and moved is not made  # a GPU move would copy
        assert all(made_at(p) is None for p in module.parameters())


def test_trainer_places_everything_on_the_runtime_device(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the checker, no parameter, buffer, batch or loss of a training step was made on
    the default device: on a GPU node each would otherwise be a CPU tensor."""
    from sci_scale.runtime.device import current_device
    from sci_scale.train import step as step_module
    from sci_scale.train.trainer import Trainer

    monkeypatch.setenv(collective_check.ENV_VAR, "1")
    seen: dict[str, list] = {"batches": [], "losses": []}
    make_forward_step = step_module.make_forward_step

    def recording_forward_step(counter):
        forward_step = make_forward_step(counter)

        def forward(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)
            seen["losses"].append(output)
            seen["batches"].append(loss_func.args[0])  # the loss mask the step moved
            return output, loss_func

        return forward

    monkeypatch.setattr("sci_scale.train.schedule.make_forward_step", recording_forward_step)
    trainer = Trainer(make_config("train.steps=1", "runtime.device=cpu"))
    try:
        trainer.setup()
        trainer.train_step()
        device = current_device()
        assert device == torch.device("cpu")
        tensors = {
            **{f"parameter {n}": p for n, p in trainer.model.named_parameters()},
            **{f"buffer {n}": b for n, b in trainer.model.named_buffers()},
            **{f"batch {i}": b for i, b in enumerate(seen["batches"])},
            **{f"loss {i}": t for i, t in enumerate(seen["losses"])},
        }
        assert seen["batches"] and seen["losses"]
        for name, tensor in tensors.items():
            assert tensor.device == device, name
            assert made_at(tensor) is None, f"{name} made without a device at {made_at(tensor)}"
    finally:
        collective_check.uninstall()
        from sci_scale.runtime.distributed import destroy_distributed

        destroy_distributed()


def test_env_var_name_is_documented() -> None:
    text = (Path(REPO) / "docs" / "parallel.md").read_text()
    assert collective_check.ENV_VAR in text
