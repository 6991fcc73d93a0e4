"""Megatron distributed checkpoints written and read a few tensors at a time.

Conversions of 8B-70B models must not hold the model. megatron's own writer
(``FileSystemWriterAsync``) stages every tensor of a rank in host memory before writing, and
a whole-model load needs the whole model. Both directions here start from the model's
*sharded state dict built on the meta device* (``SCIGPTModel(..., device=meta)``): exactly the
keys, global shapes, offsets and replica ids a real model of that config saves, with no
storage behind them.

- :func:`save_streaming` writes that structure through megatron's ``dist_checkpointing.save``
  (so ``metadata.json``, ``common.pt`` and the integrity checks are megatron's), with a save
  strategy that hands the shards to torch's plain ``FileSystemWriter`` instead: its serial
  loader asks the planner for one chunk at a time, writes it and drops it. The planner
  computes each chunk on demand from ``produce(param_name)``.
- :func:`load_group` reads the tensors of some parameters (one layer, say) from any
  checkpoint, whatever layout it was written at: megatron reads just their byte ranges.

The result is an ordinary checkpoint: it loads, and reshards, like one a training run wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from sci_scale.checkpoint.safe_load import restricted_checkpoint_reads

log = logging.getLogger(__name__)
Produce = Callable[[str], Tensor]  # a parameter's state-dict name -> its whole (TP=1) tensor
STORED_CHUNK_BYTES = 64 << 20  # the largest piece of a tensor stored as one chunk


class Progress:
    """A log line every ``every_s`` seconds (and at the end) of a long conversion: done/total
    and bytes, so a 70B import or export shows it is moving."""

    def __init__(self, total: int, what: str, every_s: float = 10.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.done, self.bytes = 0, 0
        self.start = self.last = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e9
            log.info(
                "%d/%d %s, %.2f GB (%.2f GB/s)", self.done, self.total, self.what,
                self.bytes / 1e9, rate,
            )  # fmt: skip


class _Chunks:
    """Turns a write request (checkpoint key, global offsets, sizes) into the tensor to write.

    The skeleton's global tensor of a key is the whole parameter with the layer axis in
    front (megatron's global layout is the TP=1 layout: fused SwiGLU is ``[gate; up]``, the
    vocabulary padded as at TP=1), so every chunk is a slice of one parameter. The last
    parameter is kept, since megatron writes a fused SwiGLU weight as two chunks."""

    def __init__(self, skeleton: dict, produce: Produce, dtype: torch.dtype) -> None:
        self.produce, self.dtype = produce, dtype
        # (checkpoint key, offsets on the prepended axes: the layer) -> parameter name
        self.sources: dict[tuple[str, tuple[int, ...]], str] = {}
        self.prepended: dict[str, int] = {}
        for name, value in skeleton.items():
            for sh in value if isinstance(value, list) else [value]:
                if isinstance(sh, ShardedTensor):
                    n = sh.prepend_axis_num
                    self.prepended[sh.key] = n
                    self.sources[(sh.key, tuple(sh.global_offset[:n]))] = name
        self._last: tuple[str, Tensor] | None = None
        self.progress = Progress(len(set(self.sources.values())), "tensors")

    def _param(self, name: str) -> Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous parameter before making the next
            self._last = (name, self.produce(name))
            self.progress.advance(self._last[1].nbytes)
        return self._last[1]

    def __call__(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Tensor:
        n = self.prepended[key]
        name = self.sources[(key, tuple(offsets[:n]))]
        whole = self._param(name)
        window = tuple(slice(o, o + s) for o, s in zip(offsets[n:], sizes[n:], strict=True))
        chunk = whole[window]
        if chunk.dtype != self.dtype:  # cast a piece at a time: the parameter is held once
            chunk = chunk.to(self.dtype)
        elif chunk.numel() != whole.numel():
            chunk = chunk.clone()  # a view would be written with its whole storage
        return chunk.reshape(sizes)


def _split(item: WriteItem, max_bytes: int) -> list[WriteItem]:
    """A tensor write request as pieces of at most ``max_bytes`` along its first axis longer
    than one (rows of an embedding, of one layer's weight). Each piece is stored as a chunk of
    its own, so a reader holds one piece at a time beside its target: torch's reader
    deserialises a whole stored chunk before copying the part it needs, and a rank of a
    tensor-parallel run reads only the pieces that overlap its shard."""
    data = item.tensor_data
    if item.type == WriteItemType.BYTE_IO or data is None:
        return [item]
    sizes, offsets = list(data.chunk.sizes), list(data.chunk.offsets)
    total = math.prod(sizes) * data.properties.dtype.itemsize
    axis = next((i for i, n in enumerate(sizes) if n > 1), None)
    if total <= max_bytes or axis is None:
        return [item]
    per_row = total // sizes[axis]
    step = max(1, max_bytes // per_row)
    pieces = []
    for start in range(0, sizes[axis], step):
        piece_offsets, piece_sizes = list(offsets), list(sizes)
        piece_offsets[axis] += start
        piece_sizes[axis] = min(step, sizes[axis] - start)
        chunk = ChunkStorageMetadata(torch.Size(piece_offsets), torch.Size(piece_sizes))
        pieces.append(
            WriteItem(
                index=MetadataIndex(item.index.fqn, piece_offsets),
                type=item.type,
                tensor_data=TensorWriteData(chunk, data.properties, data.size),
            )
        )
    return pieces


class _ProducingPlanner(MCoreSavePlanner):
    def __init__(self, chunks: _Chunks) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.chunks = chunks

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [piece for item in plan.items for piece in _split(item, STORED_CHUNK_BYTES)]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Tensor | object:
        if write_item.type == WriteItemType.BYTE_IO or write_item.tensor_data is None:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        return self.chunks(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))


class _Writer(FileSystemWriter):
    """torch's writer without the storage metadata, which holds the save path as a
    ``PathLike``: megatron's writer leaves it out too, and the restricted reader of
    ``safe_load`` refuses any class a checkpoint's metadata does not need."""

    def storage_meta(self) -> None:
        return None


class _StreamingStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written by torch's serial filesystem writer."""

    def __init__(self, chunks: _Chunks) -> None:
        super().__init__("torch_dist", 1)
        self.chunks = chunks

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        renamed, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        dcp_save(
            mcore_to_pyt_state_dict(renamed, False),
            storage_writer=_Writer(str(checkpoint_dir), thread_count=1),
            planner=_ProducingPlanner(self.chunks),
        )

    def async_save(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise NotImplementedError("a streaming save is synchronous")


def weight_names(skeleton: dict) -> list[str]:
    """The parameters of a sharded state dict, in order (not the extra-state objects)."""
    return [name for name, value in skeleton.items() if not isinstance(value, ShardedObject)]


def save_streaming(
    skeleton: dict, checkpoint_dir: Path, produce: Produce, dtype: torch.dtype
) -> None:
    """Write the checkpoint whose structure is ``skeleton`` (a meta model's sharded state
    dict), each parameter made by ``produce`` when its first chunk is written (collective
    over the current process group; conversions run it in one process)."""
    apply_factories(skeleton)
    dist_checkpointing.save(
        skeleton,
        str(checkpoint_dir),
        sharded_strategy=_StreamingStrategy(_Chunks(skeleton, produce, dtype)),
    )


def _unstacked(sh: ShardedTensor) -> ShardedTensor:
    """The same chunk with the layer axis made an ordinary axis of length 1 (a view of the
    same storage). megatron reads prepended-axis tensors through torch's ShardedTensor, which
    insists on every layer being present; an ordinary chunk may be read alone."""
    n = sh.prepend_axis_num
    if n == 0:
        return sh
    data = sh.data.reshape((1,) * n + tuple(sh.data.shape))
    return dataclasses.replace(sh, data=data, local_shape=tuple(data.shape), prepend_axis_num=0)


def load_group(skeleton: dict, names: Iterable[str], checkpoint_dir: Path) -> dict[str, Tensor]:
    """The whole (TP=1) tensors of parameters ``names`` (one layer, say) from a megatron
    checkpoint of any layout: only their bytes are read. ``skeleton`` (a meta model's sharded
    state dict, factories not applied) is left as it was."""
    params: dict[str, Tensor] = {}
    group: dict[str, object] = {}
    for name in names:
        value = skeleton[name]
        if isinstance(value, ShardedObject):
            continue  # extra state (Transformer Engine's FP8 metadata): not a weight
        assert isinstance(value, ShardedTensor | ShardedTensorFactory), type(value)
        params[name] = torch.empty(value.data.shape, dtype=value.data.dtype)
        entry = copy.copy(value)
        entry.data = params[name]
        group[name] = entry
    apply_factories(group)  # e.g. SwiGLU's [gate; up] as two chunks: views of the parameter
    flat = {
        f"{name}/{i}": _unstacked(sh)
        for name, value in group.items()
        for i, sh in enumerate(value if isinstance(value, list) else [value])
    }
    with restricted_checkpoint_reads():
        # Reading one layer of tensors stacked over layers is partial by design; the chunks
        # are read into the parameters' storage.
        dist_checkpointing.load(flat, str(checkpoint_dir), validate_access_integrity=False)
    return params
