"""Images stored inside a container rather than as files: a member of a tar shard, a row of a dataset.

    name = member_name("shards/train-000000.tar", "000012.jpg")   # 'shards/train-000000.tar#000012.jpg'
    data = member_bytes(name)                                    # its bytes; None for a plain file name

A sample of an ImageSet is named by such a string, so every part that reads samples by name (the
loaders, the caches, audit's checks, the reports) reads containers too: utils.data.decode.load_image
opens what `member_bytes` returns. A container kind is one row of KINDS: whether a container name is
of that kind, and the module whose `read_member(container, member) -> bytes` reads it (imported when
first needed, so a process that reads only files never imports it).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

SEP = "#"


@dataclass(frozen=True)
class ContainerKind:
    """One kind of container.

    Attributes:
        name: how it is called in messages.
        matches: whether a container name (the part before the last '#') is of this kind.
        module: the module holding `read_member(container: str, member: str) -> bytes`.
    """

    name: str
    matches: Callable[[str], bool]
    module: str


KINDS: tuple[ContainerKind, ...] = (
    ContainerKind("tar shard", lambda container: container.endswith(".tar"), "utils.data.shards"),
    ContainerKind("Hugging Face dataset", lambda container: container.startswith("hf:"), "utils.data.hf"),
)


def member_name(container: str, member: str) -> str:
    """The name of `member` inside `container`, as samples carry it."""
    return f"{container}{SEP}{member}"


def split_member(name: str) -> tuple[ContainerKind, str, str] | None:
    """(kind, container, member) of a member's name; None for a plain file name (an existing file
    whose name happens to hold a '#' included)."""
    container, sep, member = name.rpartition(SEP)
    if not sep or not member:
        return None
    kind = next((k for k in KINDS if k.matches(container)), None)
    if kind is None or os.path.exists(name):
        return None
    return kind, container, member


def sample_exists(name: str) -> bool:
    """Whether a sample's name names something here: a file, or a member of an existing container
    (the member itself is checked when it is read)."""
    found = split_member(name)
    return os.path.isfile(name) if found is None else os.path.exists(found[1])


def member_bytes(name: str) -> bytes | None:
    """The bytes of a container's member; None when `name` names a plain file.

    Raises:
        OSError: the member cannot be read (the container's reader says why, naming the container).
    """
    found = split_member(name)
    if found is None:
        return None
    kind, container, member = found
    return importlib.import_module(kind.module).read_member(container, member)
