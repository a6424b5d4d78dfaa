"""What `oodbench data` shows: every registered dataset's status on this machine, its size on
disk and how to obtain it; and the explicit, opt-in download."""

from __future__ import annotations

from dataclasses import dataclass

from oodbench.data.base import DATASETS, DataContext
from oodbench.data.folders import get_dataset
from oodbench.errors import OodbenchError


@dataclass
class DatasetStatus:
    name: str
    status: str
    size_bytes: int
    how_to_get: str
    summary: str


def dataset_statuses(ctx: DataContext) -> list[DatasetStatus]:
    """Status of each registered dataset (checksums verified; memoised in the cache root)."""
    rows = []
    for name, source in DATASETS.items():
        status = source.status(ctx)
        size = source.size_on_disk(ctx) if status != "missing" else 0
        rows.append(DatasetStatus(name, status, size, source.how_to_get(), source.summary))
    return rows


def download(names: list[str], ctx: DataContext) -> None:
    """Fetch the named datasets into the data root (only those torchvision can download)."""
    for name in names:
        source = get_dataset(name)
        if not getattr(source, "can_download", False):
            raise OodbenchError(f"dataset {name!r} cannot be downloaded automatically",
                                source.how_to_get())
        if source.missing(ctx):
            source.download(ctx)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
