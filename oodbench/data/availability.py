"""Is a benchmark's data here? Checked before any work, so a run never fails halfway for a
missing dataset, and the error lists everything missing at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oodbench.data.base import DataContext
from oodbench.data.folders import get_dataset
from oodbench.errors import OodbenchError

if TYPE_CHECKING:
    from oodbench.config import BenchmarkConfig


def benchmark_datasets(bench: BenchmarkConfig) -> list[str]:
    """The in-distribution set and every OOD set, each once, in benchmark order."""
    return list(dict.fromkeys([bench.dataset, *(o.dataset for o in bench.ood)]))


def require_benchmark_data(bench: BenchmarkConfig, ctx: DataContext) -> None:
    """Raise one error naming every missing dataset, its missing files and how to get it.
    With `ctx.download`, datasets that can be downloaded are fetched first."""
    problems = []
    for name in benchmark_datasets(bench):
        source = get_dataset(name)
        gone = source.missing(ctx)
        if gone and ctx.download and getattr(source, "can_download", False):
            source.download(ctx)
            gone = source.missing(ctx)
        if gone:
            problems.append(f"{name}: missing {', '.join(str(p) for p in gone)}\n"
                            f"      get it: {source.how_to_get()}")
    if problems:
        raise OodbenchError(
            f"benchmark {bench.name!r} needs data missing under data root {ctx.root}:\n  - "
            + "\n  - ".join(problems),
            "get the datasets above (`oodbench data` shows what is present), or point "
            "--data-root / $OODBENCH_DATA at the folder that holds them")
