"""Checkpoint manifests: the size and hash of every file, written when a checkpoint is sealed
and checked before it is loaded.

Megatron's distributed checkpoint loads a shard with a zeroed block in it without complaint
(different weights, no error), and a truncated shard or ``.metadata`` fails deep inside
``torch.distributed.checkpoint``. ``manifest.json`` lists every file of the checkpoint
(``model/`` shards and metadata, ``rank_*.pt``, ``deepspeed/``, ``run_state.pt``) with its size
and xxh3-128 hash, so damage is found, and named, before anything is read.

Both directions are collective when a process group exists: rank 0 lists the files (or reads
the manifest) and shares the list, each rank hashes its share (balanced by bytes), and every
rank gets the same answer, so all ranks take the same decision. Without a process group one
process does all of it.

Files the manifest does not list (something added beside a checkpoint after it was written)
are not checked and do not make it damaged: nothing sci-scale loads depends on them.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

from sci_scale.checkpoint.index import RUN_STATE, CheckpointError
from sci_scale.runtime import collectives

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_MANIFEST = f".{MANIFEST}.tmp"
# What an async save's writer process hashed of its own files, merged into the manifest
_PARTIAL = ".manifest-rank_{rank:05d}.json"
_PARTIAL_GLOB = ".manifest-rank_*.json"
FORMAT_VERSION = 1
HASH_NAME = "xxh3_128"
# The files every checkpoint has (megatron's distributed checkpoint writes the last three).
REQUIRED_FILES = (RUN_STATE, "model/.metadata", "model/metadata.json", "model/common.pt")
CHUNK_BYTES = 16 << 20  # large reads: hashing runs at memory speed, the disk is the limit


@dataclass(frozen=True)
class Entry:
    """One file of a checkpoint: its path relative to the checkpoint, size and hash."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class Damage:
    """What is wrong with a checkpoint: the first bad file (relative; "" for the directory
    itself) and why."""

    checkpoint: Path
    file: str
    reason: str

    def __str__(self) -> str:
        where = self.checkpoint / self.file if self.file else self.checkpoint
        return f"{where}: {self.reason}"


# -- one process -------------------------------------------------------------------------
def list_files(directory: Path) -> list[tuple[str, int]]:
    """Every regular file under ``directory`` (recursive, hidden ones such as megatron's
    ``.metadata`` included) but the manifest itself, sorted, with its size."""
    found = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        hidden = rel in (MANIFEST, _TMP_MANIFEST) or path.match(_PARTIAL_GLOB)
        if path.is_file() and not path.is_symlink() and not hidden:
            found.append((rel, path.stat().st_size))
    return sorted(found)


def hash_file(path: Path, chunk_bytes: int = CHUNK_BYTES, sync: bool = False) -> tuple[int, str]:
    """(bytes read, xxh3-128 hex digest) of a file, read in ``chunk_bytes`` pieces into one
    reused buffer. ``sync`` also flushes the file to stable storage (what a save wants)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            total += n
        if sync:
            os.fsync(handle.fileno())
    return total, digest.hexdigest()


def shares(sizes: list[int], world: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``world`` shares of about equal bytes (largest first
    to the least loaded rank; ties to the lower rank), the same on every rank."""
    heap = [(0, rank) for rank in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(heap)
        out[rank].append(i)
        heapq.heappush(heap, (load + sizes[i], rank))
    return [sorted(share) for share in out]


def check_entries(directory: Path, entries: list[Entry]) -> Damage | None:
    """The first of ``entries`` (in their order) that is missing, has another size or other
    contents. Sizes are checked for all of them before anything is hashed."""
    for entry in entries:
        path = directory / entry.path
        try:
            size = path.stat().st_size
        except OSError:
            return Damage(directory, entry.path, f"missing (listed in {MANIFEST})")
        if size != entry.size:
            how = "truncated" if size < entry.size else "grown"
            return Damage(
                directory, entry.path, f"{how}: {size} bytes, {MANIFEST} says {entry.size}"
            )
    for entry in entries:
        try:
            size, digest = hash_file(directory / entry.path)
        except OSError as exc:
            return Damage(directory, entry.path, f"unreadable ({exc.strerror or exc})")
        if size != entry.size or digest != entry.digest:
            return Damage(
                directory, entry.path, f"contents differ from {MANIFEST} ({HASH_NAME} mismatch)"
            )
    return None


def write_manifest_file(directory: Path, entries: list[Entry]) -> None:
    """``manifest.json`` atomically (a temporary file, synced, renamed, directory synced)."""
    body = {
        "format_version": FORMAT_VERSION,
        "hash": HASH_NAME,
        "files": [{"path": e.path, "size": e.size, HASH_NAME: e.digest} for e in entries],
    }
    tmp = directory / _TMP_MANIFEST
    with open(tmp, "w") as handle:
        json.dump(body, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def read_manifest(directory: Path) -> list[Entry] | Damage | None:
    """The entries of a checkpoint's manifest; None when it has none (an older sci-scale
    wrote it), a :class:`Damage` naming the manifest when it cannot be read."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        if body.get("format_version") != FORMAT_VERSION or body.get("hash") != HASH_NAME:
            raise ValueError(f"format {body.get('format_version')}, hash {body.get('hash')}")
        return [Entry(str(f["path"]), int(f["size"]), str(f[HASH_NAME])) for f in body["files"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Damage(directory, MANIFEST, f"unreadable ({type(exc).__name__}: {exc})")


# -- every rank --------------------------------------------------------------------------
def write_partial_manifest(directory: Path, rank: int, files: list[Path]) -> None:
    """Hash ``files`` (this rank's, just written by an async save's writer process) and leave
    their entries for :func:`write_manifest`, which then need not read them again."""
    entries = []
    for path in files:
        size, digest = hash_file(path, sync=True)
        entries.append({"path": path.relative_to(directory).as_posix(), "size": size,
                        HASH_NAME: digest})  # fmt: skip
    partial = directory / _PARTIAL.format(rank=rank)
    with open(partial, "w") as handle:
        json.dump(entries, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _partial_entries(directory: Path) -> dict[str, Entry]:
    known = {}
    for partial in directory.glob(_PARTIAL_GLOB):
        for e in json.loads(partial.read_text()):
            known[e["path"]] = Entry(e["path"], int(e["size"]), str(e[HASH_NAME]))
    return known


def write_manifest(directory: Path) -> list[Entry]:
    """Hash every file of a complete checkpoint directory and write its manifest (collective:
    every rank calls it once all files are written; rank 0 writes the file). Each file is also
    synced to stable storage as it is hashed. Files an async save's writers hashed already (their
    partial manifests, of the same size now) are taken as they are. Returns the entries on
    every rank."""
    rank, world = _rank_world()
    known = _from_rank0(_partial_entries(directory) if rank == 0 else None)
    listing = _from_rank0(list_files(directory) if rank == 0 else None)
    todo = [(rel, size) for rel, size in listing if known.get(rel, Entry("", -1, "")).size != size]
    mine = shares([size for _, size in todo], world)[rank]
    hashed = []
    for i in mine:
        size, digest = hash_file(directory / todo[i][0], sync=True)
        hashed.append(Entry(todo[i][0], size, digest))
    fresh = {e.path: e for e in _gather_flat(hashed)}
    entries = [fresh.get(rel) or known[rel] for rel, _ in listing]
    if rank == 0:
        write_manifest_file(directory, entries)
        for partial in directory.glob(_PARTIAL_GLOB):
            partial.unlink()
    collectives.barrier()
    return entries


def find_damage(directory: Path) -> Damage | None:
    """The first damaged file of a checkpoint, or None when it matches its manifest
    (collective when a process group exists; every rank gets the same answer).

    A checkpoint without a manifest (from an older sci-scale) cannot be checked: a warning,
    and None if its run state is there."""
    rank, world = _rank_world()
    found = _from_rank0(_read_for_check(directory) if rank == 0 else None)
    if isinstance(found, Damage):
        return found
    if found is None:
        if rank == 0:
            log.warning(
                "%s has no %s (written by an older sci-scale): its files cannot be verified",
                directory,
                MANIFEST,
            )
        return None
    mine = shares([e.size for e in found], world)[rank]
    damage = check_entries(directory, [found[i] for i in mine])
    reports = _gather_flat([] if damage is None else [damage])
    if not reports:
        return None
    order = {e.path: i for i, e in enumerate(found)}
    return min(reports, key=lambda d: order.get(d.file, -1))


def require_intact(directory: Path) -> None:
    """A :class:`CheckpointError` naming the damaged file, for checkpoints loaded on their
    own (``checkpoint.init_from``, evaluation, export), where there is nothing to fall back to."""
    damage = find_damage(directory)
    if damage is not None:
        raise CheckpointError(f"damaged checkpoint: {damage}")


def is_main_rank() -> bool:
    return _rank_world()[0] == 0


def _read_for_check(directory: Path) -> list[Entry] | Damage | None:
    if not directory.is_dir():
        return Damage(directory, "", "no such checkpoint directory")
    found = read_manifest(directory)
    if found is None:  # nothing to verify against: at least every file a load opens is there
        for required in REQUIRED_FILES:
            if not (directory / required).is_file():
                return Damage(directory, required, "missing (not a complete sci-scale checkpoint)")
    return found


def _rank_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: one listing of the directory, so that ranks on other
    nodes never act on a stale view of a shared file system."""
    if _rank_world()[1] == 1:
        return obj
    return collectives.broadcast_object(obj)


def _gather_flat(items: list[Any]) -> list[Any]:
    if _rank_world()[1] == 1:
        return list(items)
    return [item for part in collectives.all_gather_object(items) for item in part]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
