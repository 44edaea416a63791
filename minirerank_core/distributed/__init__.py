"""Distributed indexing on Ray (the ``[ray]`` extra). Nothing here is imported by ``import minirerank_core``, and
this package imports Ray only when a job runs, so a plain ``minirerank index`` never loads it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ray_index import RayIndexReport


def index_with_ray(*args: Any, **kwargs: Any) -> RayIndexReport:
    """See :func:`minirerank_core.distributed.ray_index.index_with_ray`."""
    from .ray_index import index_with_ray as run

    return run(*args, **kwargs)


__all__ = ["index_with_ray"]
