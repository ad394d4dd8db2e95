"""Where preference data comes from → the list of files that Ray Data read tasks stream.

``resolve_source(data, split=None)``:
- a local file (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``, any of them ``.gz``) → that file;
- a folder saved by ``datasets`` (``save_to_disk``: ``state.json`` for a ``Dataset``,
  ``dataset_dict.json`` for a ``DatasetDict``) → ``datasets.load_from_disk``, then the split
  (``split``; needed when the folder holds more than one);
- another local folder → every data file under it (sorted);
- a Hugging Face hub id (``org/name``, not a local path) → ``datasets.load_dataset(id, split=)``
  (downloads and prepares into the ``datasets`` cache, or reuses it; offline with
  ``HF_HUB_OFFLINE=1`` when it is cached).

A loaded ``datasets`` split is read from its Arrow cache files, by path, one read task per file:
the rows are exactly those ``datasets`` loaded, and nothing passes through the driver. The
files must be readable where the read tasks run (the driver's disk on one machine, a shared
filesystem on a cluster). ``datasets`` is imported only on these paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".jsonl.gz", ".json.gz")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class Source:
    """``files``: what the read tasks stream; ``origin``: what the user gave (for messages);
    ``kind``: ``files`` | ``datasets`` (a loaded split); ``split``: the split read, if any."""

    files: list[str] = field(default_factory=list)
    origin: str = ""
    kind: str = "files"
    split: str | None = None

    @property
    def name(self) -> str:
        return Path(self.origin).name or self.origin


def list_files(path: str | Path) -> list[str]:
    """The data files behind ``path`` (a file, or a folder of data files)."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"data path {p} does not exist")
    files = sorted(str(f) for f in p.rglob("*") if f.is_file() and str(f).endswith(DATA_SUFFIXES)
                   and not f.name.startswith((".", "_")) and f.name not in ("dataset_info.json", "state.json"))
    if not files:
        raise FileNotFoundError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {p}")
    return files


def is_datasets_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def resolve_source(data: str | Path | Source, split: str | None = None) -> Source:
    """``data`` → :class:`Source` (see the module docstring). Raises ``FileNotFoundError`` for a path
    that is neither there nor a hub id, ``ValueError`` for a split that does not fit."""
    if isinstance(data, Source):
        return data
    p = Path(data)
    if p.exists():
        if is_datasets_folder(p):
            import datasets

            return _split_files(datasets.load_from_disk(str(p)), split, str(data))
        if split:
            raise ValueError(f"--split {split!r}: {data} is not a datasets folder or a hub id; a split applies "
                             "only to those (a file or a folder of files is read whole)")
        return Source(files=list_files(p), origin=str(data))
    if HUB_ID.match(str(data)):
        import datasets

        try:
            loaded = datasets.load_dataset(str(data), split=split) if split else datasets.load_dataset(str(data))
        except ValueError as e:  # e.g. an unknown split: the message lists the valid ones
            raise ValueError(f"--data {data}: {e}") from None
        except (OSError, ConnectionError) as e:  # not on the hub, not cached, no network
            raise FileNotFoundError(f"--data {data}: not a local path, and the datasets library could not "
                                    f"load it as a Hugging Face hub id ({type(e).__name__}: {e})") from None
        return _split_files(loaded, split, str(data))
    raise FileNotFoundError(f"data path {data} does not exist (nor is it a Hugging Face hub id like org/name)")


def _split_files(loaded, split: str | None, origin: str) -> Source:
    """A ``Dataset`` or ``DatasetDict`` → the Arrow files of the one split to read."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) != 1:
                raise ValueError(f"{origin} has the splits {', '.join(names)}: choose one with --split")
            split = names[0]
        elif split not in loaded:
            raise ValueError(f"--split {split!r}: {origin} has the splits {', '.join(names)}")
        ds = loaded[split]
    else:
        ds = loaded
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise ValueError(f"--split {split!r}: {origin} holds the split {ds.split!s} only")
    if getattr(ds, "_indices", None) is not None:  # a select/shuffle view: its files hold other rows
        raise ValueError(f"{origin}: the dataset is a filtered or shuffled view; save it with "
                         "save_to_disk() (which writes the rows themselves) and pass that folder")
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise ValueError(f"{origin}: the dataset lives in memory only; save it with save_to_disk() first")
    return Source(files=files, origin=origin, kind="datasets", split=str(ds.split) if ds.split else split)
