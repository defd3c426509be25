"""What the content hashes of a checkpoint's manifest cost: hashing its files when a save writes them, and checking
them when a model folder or a checkpoint is read, against only reading the same bytes, measured in one process.

    python benchmarks/checkpoint_hash.py --json                              # the full-size checkpoint's sizes
    python benchmarks/checkpoint_hash.py --model-mb 4 --state-mb 8 --json    # a quick run (tests)

Files of the sizes a full-size checkpoint has (``model.safetensors`` of the 257.5 M-parameter architecture in
float32, 989 MB, and its AdamW training state, 1,965 MB; see ``benchmarks/checkpoint_io.py``), of random bytes,
are written into a temporary folder and flushed. Then, each from the page cache (``warm``: just written, as a save
hashes them) and from the disk (``cold``: the folder's pages dropped with ``posix_fadvise(DONTNEED)``, as a load
after a while finds them):

* ``read``: every byte read in 8 MiB chunks and thrown away, the baseline (a load reads them anyway);
* ``hash``: :func:`granite_docling.atomic_folders.file_records`, what a save adds (size and XXH3-128 of every file);
* ``check``: :func:`granite_docling.atomic_folders.damaged_files` against those records, what ``resume`` adds
  (all files) and what loading the model adds (``model.safetensors`` alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MB = 2**20
CHUNK = 8 * MB


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)
    with open(path, "wb") as file:
        for start in range(0, size, CHUNK):
            file.write(block[: min(CHUNK, size - start)])
        file.flush()
        os.fsync(file.fileno())


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def read_all(folder: Path, names: list[str]) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    for name in names:
        with open(folder / name, "rb", buffering=0) as file:
            while read := file.readinto(buffer):
                total += read
    return total


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def measure(model_mb: float, state_mb: float, work: Path) -> dict:
    from granite_docling.atomic_folders import damaged_files, file_records

    folder = work / "checkpoint_step_1"
    sizes = {"model.safetensors": int(model_mb * MB), "training_state/tensors.safetensors": int(state_mb * MB)}
    for name, size in sizes.items():
        write_random(folder / name, size)
    everything = list(sizes)
    model = ["model.safetensors"]
    result = {"model_mb": model_mb, "state_mb": state_mb}
    records = file_records(folder)  # once before timing, so that warm means warm for every line
    for cache in ("warm", "cold"):
        seconds_of = {}  # unrounded: a warm read of the quick mode's few MB rounds to 0.000 s
        for label, names, work_of in (
            ("read_all", everything, lambda: read_all(folder, everything)),
            ("hash_all", everything, lambda: file_records(folder)),
            ("check_all", everything, lambda: damaged_files(folder, records)),
            ("read_model", model, lambda: read_all(folder, model)),
            ("check_model", model, lambda: damaged_files(folder, records, set(model))),
        ):
            if cache == "cold":
                drop_from_page_cache(folder)
            seconds = seconds_of[label] = timed(work_of)
            result[f"{cache}_{label}_s"] = round(seconds, 3)
            result[f"{cache}_{label}_gb_s"] = round(sum(sizes[n] for n in names) / seconds / 1e9, 2)
        ratio = seconds_of["check_all"] / seconds_of["read_all"]
        result[f"{cache}_ratio_check_to_read"] = round(ratio, 2)
    assert not damaged_files(folder, records), "the files were not changed"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=989.0, help="size of model.safetensors, MiB")
    parser.add_argument("--state-mb", type=float, default=1965.0, help="size of the training state, MiB")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="checkpoint_hash_", dir=args.work))
    try:
        result = measure(args.model_mb, args.state_mb, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"model.safetensors {args.model_mb:.0f} MiB + training state {args.state_mb:.0f} MiB")
    for cache in ("warm", "cold"):
        print(
            f"  {cache}: read {result[f'{cache}_read_all_s']} s, hash {result[f'{cache}_hash_all_s']} s, "
            f"check {result[f'{cache}_check_all_s']} s ({result[f'{cache}_ratio_check_to_read']}x the read); "
            f"model alone: read {result[f'{cache}_read_model_s']} s, check {result[f'{cache}_check_model_s']} s"
        )


if __name__ == "__main__":
    main()
