"""Training memory and start-up against dataset size, for a folder of JSON annotations and for hub parquet.

    python benchmarks/scale.py                      # hub 500 / 8,000, folder 500 / 8,000 / 100,000 samples
    python benchmarks/scale.py --quick              # hub 50, folder 50 / 200: a smoke test of a few minutes
    python benchmarks/scale.py --json               # one JSON object
    python benchmarks/scale.py --plan folder:500,folder:100000 --work /data/scale   # a plan of your own
    python benchmarks/scale.py --repo OTHER_CHECKOUT --cache-key training.length_cache_dir   # older code
    python benchmarks/scale.py --build-only         # build (or find) the datasets, train nothing

``make bench`` calls it. The datasets are made of the real-docs fixture pages (``tests/fixtures/real_docs``,
rendered once by ``prepare_dataset``: 9 pages, ~0.3 MB PNG each), 1-3 consecutive pages per sample with the pages'
DocTags joined by ``<page_break>`` (the DoclingMatix form), so lengths vary as in a real multi-page set:

* ``folder``: ``ROOT/anns/train/000000.json ...``, one annotation per sample; all of them point at the same 9
  page images, so 100,000 samples take ~0.6 GB (0.8 GB of disk blocks), almost all of it annotation files.
* ``hub``: ``ROOT/train-0000S-of-0000T.parquet``, 1,000 rows a shard, row groups of 64, ``images`` (a list of
  ``{bytes, path}``, the PNG bytes in every row, no dictionary encoding) and ``texts`` (a list of ``{user,
  assistant, source}``), as HuggingFaceM4/DoclingMatix; 8,000 samples are ~5 GB. Written shard by shard.

They are built once under ``--work`` and reused by later calls. Each (layout, samples) is then trained twice,
exactly as a user would, with ``train.py model=tiny dataset=[folder] dataset.folder.path=ROOT``, 3 optimizer
steps of batch 2, 2 DataLoader workers, ``val_ratio=0.05``, ``HF_HUB_OFFLINE=1``; both runs share one cache
folder (``--cache-key``, wiped before the first run), so the first run builds what the code caches (index,
lengths) and the second is the cached figure. Per run:

* ``memory_mb``: peak PSS (``/proc/PID/smaps_rollup``) summed over train.py and all its descendants (DataLoader
  workers, index-building pools), from launch until the third optimizer step; PSS shares each page among the
  processes that map it, so the sum counts forked copy-on-write memory once. Sampled every 0.2 s, less often when
  the tree is large (a read costs ~15 ms of CPU per resident GB; sampling keeps under a quarter of a core). The
  peak includes a step's activations and logits (~2 GB with the tiny model and real pages), which come and go
  between samples; ``steady_mb``, the lowest sample between the first and the third step, is what stays resident
  (model, optimizer, the dataset as the code holds it, workers) and moves less from run to run.
* ``startup_s``: seconds from launch to the first ``train/loss`` line in the run's ``metrics.jsonl`` (Python
  imports, config, reading the data, index / lengths, model, first step; 0.2 s resolution).
* ``ready_s``: seconds from launch to the loop's ``N optimizer steps (...)`` log line: imports, config, data
  (sources, index, split, sampler) and model ready, before any step is computed. ``startup_s`` minus ``ready_s``
  is the first step itself, whose time varies with the lengths of the first batch.
* ``index_s`` / ``index_processes``: what the code logs when it builds its index (``data index NAME: rank R
  built N records (...) in S s with P processes``), summed over sources; null when it logs no such line.

The run is stopped (SIGTERM, then SIGKILL) once it has logged its third step. The growth lines at the end give
the cached memory and start-up of each larger dataset minus those of the smallest of its layout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL_DOCS = REPO / "tests" / "fixtures" / "real_docs"
DEFAULT_PLAN = "hub:500,hub:8000,folder:500,folder:8000,folder:100000"
QUICK_PLAN = "hub:50,folder:50,folder:200"
CACHE_KEY = "data.index_cache_dir"  # training.index_cache_dir before the data section, length_cache_dir before that
LAYOUTS = ("hub", "folder")
MAX_PAGES_PER_SAMPLE = 3
ROWS_PER_SHARD = 1000
ROW_GROUP_SIZE = 64
STEPS = 3
SAMPLE_EVERY_S = 0.2
SAMPLER_SHARE = 0.25  # the most of one core that memory sampling may take
STOP_GRACE_S = 20.0
TRAIN_OVERRIDES = (
    "model=tiny", "dataset=[folder]", f"training.max_steps={STEPS}", "training.batch_size=2",
    "training.gradient_accumulation_steps=1", "data.num_workers=2", "data.val_ratio=0.05",
    "training.log_interval=1", "training.save_interval=0", "training.gradient_checkpointing=false",
)  # fmt: skip
INDEX_BUILT = re.compile(r"data index (?P<name>\S+?):? .*?built (?P<records>\d+) records.*? in (?P<seconds>[\d.]+) ?s\b"
                         r".*? with (?P<processes>\d+) process")  # fmt: skip
READY_LINE = re.compile(r"^\[(?P<time>[\d-]+ [\d:,]+)\]\[granite_docling\.train_loop\]\[INFO\] - \d+ optimizer steps",
                        re.MULTILINE)  # fmt: skip
INDEX_REUSED = re.compile(r"data index \S+ .*?reused")


@dataclass(frozen=True)
class Page:
    """One rendered real-docs page and its single-page annotation."""

    name: str
    png: bytes
    user: str
    answer: str
    source: str | None


@dataclass
class RunResult:
    """One training launch."""

    returncode: int | None = None
    startup_s: float | None = None  # launch -> first optimizer step logged
    ready_s: float | None = None  # launch -> the loop's "optimizer steps" line (everything but the first step)
    steps: int = 0  # optimizer steps seen in metrics.jsonl before the stop
    memory_mb: float | None = None  # peak PSS of the process tree, MB (10^6 bytes)
    steady_mb: float | None = None  # the lowest PSS sampled between the first and the last step, MB
    max_processes: int = 0  # the most processes of the tree seen at once
    sample_every_s: float | None = None  # mean interval between memory samples
    sampler_cpu_s: float | None = None  # CPU seconds this script spent sampling
    index_s: float | None = None  # index build seconds the run logged, summed over sources; None: no such line
    index_processes: int | None = None  # processes the build logged (the most over sources)
    index_reused: bool = False  # the run logged that it reused a cached index
    error: str | None = None
    log: str = ""


@dataclass
class Case:
    """One (layout, samples) of the plan: its dataset and its two runs."""

    layout: str
    samples: int
    data: str = ""
    data_bytes: int = 0
    build_s: float | None = None
    built_now: bool = False
    runs: dict[str, RunResult] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def real_pages(work: Path) -> list[Page]:
    """The 9 real-docs pages, rendered by ``prepare_dataset`` into ``work/pages`` the first time."""
    out = work / "pages"
    if not out.is_dir():
        from granite_docling.tools.prepare import prepare_dataset

        partial = work / "pages.partial"
        shutil.rmtree(partial, ignore_errors=True)
        prepare_dataset(sorted(REAL_DOCS.glob("*.pdf")), partial, unit="page")
        partial.rename(out)
    pages = []
    for ann in sorted((out / "anns" / "train").glob("*.json")):
        record = json.loads(ann.read_text(encoding="utf-8"))
        turn = record["anns"][0] if isinstance(record["anns"], list) else record["anns"]
        image = record["img_pth"][0] if isinstance(record["img_pth"], list) else record["img_pth"]
        pages.append(Page(ann.stem, (out / image).read_bytes(), turn["user"], turn["assistant"], turn.get("source")))
    return pages


def pages_of(index: int, count: int, max_pages: int) -> list[int]:
    """Which pages (indices into the page list) sample ``index`` holds: 1 to ``max_pages`` consecutive ones,
    wrapping around."""
    rng = random.Random(index)
    size, start = rng.randint(1, max_pages), rng.randrange(count)
    return [(start + k) % count for k in range(size)]


def joined_answer(pages: list[Page]) -> str:
    """One ``<doctag>`` with the pages' bodies joined by ``<page_break>``: one segment per image."""
    if len(pages) == 1:
        return pages[0].answer
    bodies = [p.answer.removeprefix("<doctag>").removesuffix("</doctag>") for p in pages]
    return "<doctag>" + "<page_break>".join(bodies) + "</doctag>"


def sample_turn(pages: list[Page]) -> dict:
    return {"user": pages[0].user, "assistant": joined_answer(pages), "source": pages[0].source or "real_docs"}


def write_folder(root: Path, samples: int, pages: list[Page], max_pages: int) -> None:
    """``root/anns/train/NNNNNN.json``, all pointing at the 9 page PNGs written once into ``root/images/train``."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "anns" / "train").mkdir(parents=True)
    paths = []
    for page in pages:
        paths.append(f"images/train/{page.name}.png")
        (root / paths[-1]).write_bytes(page.png)
    for index in range(samples):
        chosen = pages_of(index, len(pages), max_pages)
        record = {"img_pth": [paths[i] for i in chosen], "anns": [sample_turn([pages[i] for i in chosen])]}
        (root / "anns" / "train" / f"{index:06d}.json").write_text(json.dumps(record), encoding="utf-8")


def hub_schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    text = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    return pa.schema([("images", pa.list_(image)), ("texts", pa.list_(text))])


def hub_row(index: int, pages: list[Page], max_pages: int) -> dict:
    chosen = [pages[i] for i in pages_of(index, len(pages), max_pages)]
    return {"images": [{"bytes": p.png, "path": f"{p.name}.png"} for p in chosen], "texts": [sample_turn(chosen)]}


def write_hub(root: Path, samples: int, pages: list[Page], max_pages: int) -> None:
    """``root/train-0000S-of-0000T.parquet``: ``ROWS_PER_SHARD`` rows a shard, written ``ROW_GROUP_SIZE`` rows at a
    time so that memory stays at one row group (~40 MB) whatever ``samples`` is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    schema, shards = hub_schema(), -(-samples // ROWS_PER_SHARD)
    for shard in range(shards):
        rows = range(shard * ROWS_PER_SHARD, min(samples, (shard + 1) * ROWS_PER_SHARD))
        # No dictionary encoding: real datasets hold distinct images, and a dictionary would store ours once.
        with pq.ParquetWriter(root / f"train-{shard:05d}-of-{shards:05d}.parquet", schema, use_dictionary=False) as out:
            for start in range(rows.start, rows.stop, ROW_GROUP_SIZE):
                batch = [hub_row(i, pages, max_pages) for i in range(start, min(rows.stop, start + ROW_GROUP_SIZE))]
                out.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP_SIZE)


def disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def dataset(work: Path, layout: str, samples: int, pages: list[Page], max_pages: int) -> tuple[Path, dict, bool]:
    """(root, {seconds, bytes}, built now) of one dataset, built into a temporary folder and renamed into place
    the first time; a later call finds it complete or not at all."""
    name = f"{layout}-{samples}" if max_pages == MAX_PAGES_PER_SAMPLE else f"{layout}-{samples}-{max_pages}p"
    root, meta_file = work / "data" / name, work / "data" / f"{name}.build.json"
    if root.is_dir() and meta_file.is_file():
        return root, json.loads(meta_file.read_text()), False
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    (write_hub if layout == "hub" else write_folder)(partial, samples, pages, max_pages)
    seconds = time.perf_counter() - started
    partial.rename(root)
    meta = {"seconds": round(seconds, 2), "bytes": disk_bytes(root)}
    meta_file.write_text(json.dumps(meta))
    return root, meta, True


# ---------------------------------------------------------------------------------------------------------------
# Runs


def tree_pss_kb(pid: int) -> tuple[int, int]:
    """(PSS in kB summed over ``pid`` and its descendants, number of processes read); vanished ones are skipped."""
    import psutil

    try:
        pids = [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = read = 0
    for member in pids:
        try:
            with open(f"/proc/{member}/smaps_rollup") as rollup:
                pss = next(line for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue  # exited between the listing and the read, or a zombie
        total, read = total + int(pss.split()[1]), read + 1
    return total, read


def logged_steps(metrics: Path) -> int:
    """Optimizer steps written to ``metrics.jsonl`` so far (lines with ``train/loss``; a half-written line is not
    one)."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    steps = 0
    for line in lines:
        try:
            steps += "train/loss" in json.loads(line)
        except json.JSONDecodeError:
            pass
    return steps


def stop(process: subprocess.Popen) -> int:
    """SIGTERM to train.py (it stops after its step), then SIGKILL to its whole process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers or pools left behind
    except ProcessLookupError:
        pass
    return process.wait()


def scrape_index(log: str, result: RunResult) -> None:
    """Index build seconds (summed over sources and ranks) and processes (the most used) from the run's log."""
    built = [m.groupdict() for m in INDEX_BUILT.finditer(log)]
    if built:
        result.index_s = round(sum(float(m["seconds"]) for m in built), 2)
        result.index_processes = max(int(m["processes"]) for m in built)
    result.index_reused = bool(INDEX_REUSED.search(log))


def train_command(repo: Path, data: Path, run_dir: Path, cache_key: str, cache_dir: Path) -> list[str]:
    return [sys.executable, str(repo / "train.py"), *TRAIN_OVERRIDES, f"dataset.folder.path={data}",
            f"{cache_key}={cache_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip


def train_env(repo: Path) -> dict[str, str]:
    """The user's environment, offline, with ``repo`` first on the path (so another checkout runs its own code)."""
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def watch(process: subprocess.Popen, metrics: Path, started: float, timeout: float, result: RunResult) -> None:
    """Sample the tree's PSS every ``SAMPLE_EVERY_S`` until the ``STEPS``-th step, the exit or ``timeout``.

    Reading smaps_rollup walks the page tables, ~15 ms of CPU per GB resident: the interval grows so that the
    sampler keeps under ``SAMPLER_SHARE`` of a core (on 2 cores it competes with the run it measures)."""
    peak_kb, floor_kb, cpu, ticks = 0, None, time.process_time(), 0
    while True:
        tick, steps_before = time.perf_counter(), result.steps
        pss, members = tree_pss_kb(process.pid)
        peak_kb, result.max_processes, ticks = max(peak_kb, pss), max(result.max_processes, members), ticks + 1
        if 1 <= steps_before and members:  # between steps: what stays resident, without a step's activations
            floor_kb = pss if floor_kb is None else min(floor_kb, pss)
        result.steps = logged_steps(metrics)
        if result.steps and result.startup_s is None:
            result.startup_s = round(time.perf_counter() - started, 2)
        if result.steps >= STEPS or process.poll() is not None:
            break
        if time.perf_counter() - started > timeout:
            result.error = f"timed out after {timeout:.0f} s at step {result.steps}"
            break
        took = time.perf_counter() - tick
        time.sleep(max(SAMPLE_EVERY_S - took, took * (1 / SAMPLER_SHARE - 1)))
    result.memory_mb = round(peak_kb * 1024 / 1e6, 1)
    result.steady_mb = None if floor_kb is None else round(floor_kb * 1024 / 1e6, 1)
    result.sample_every_s = round((time.perf_counter() - started) / ticks, 3)
    result.sampler_cpu_s = round(time.process_time() - cpu, 2)


def launch(command: list[str], repo: Path, run_dir: Path, timeout: float) -> RunResult:
    """Run ``command`` until its ``STEPS``-th optimizer step (or its exit, or ``timeout``), sampling memory."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.with_suffix(".log")
    result = RunResult(log=str(log_path))
    with open(log_path, "wb") as log:
        started, launched_at = time.perf_counter(), time.time()
        process = subprocess.Popen(command, cwd=repo, env=train_env(repo), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            watch(process, run_dir / "metrics.jsonl", started, timeout, result)
        finally:
            result.returncode = stop(process)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    scrape_index(text, result)
    ready = READY_LINE.search(text)
    if ready:
        stamp = datetime.datetime.strptime(ready["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        result.ready_s = round(stamp - launched_at, 2)
    if not result.steps and result.error is None:
        result.error = f"exit {result.returncode} before the first step:\n" + "\n".join(text.splitlines()[-15:])
    return result


def run_case(case: Case, args: argparse.Namespace, data: Path) -> None:
    """The first run (empty cache folder) and the cached run of one dataset."""
    name = f"{case.layout}-{case.samples}"
    cache_dir = args.work / "cache" / name
    shutil.rmtree(cache_dir, ignore_errors=True)
    for phase in ("first", "cached"):
        run_dir = args.work / "runs" / name / phase
        command = train_command(args.repo, data, run_dir, args.cache_key, cache_dir)
        case.runs[phase] = result = launch(command, args.repo, run_dir, args.timeout)
        if not args.json:
            print(f"  {name} {phase}: {describe(result)}", file=sys.stderr, flush=True)
        if result.error and not result.steps:
            break  # the cached run would fail the same way


def describe(result: RunResult) -> str:
    if result.error and not result.steps:
        return "FAILED " + result.error.splitlines()[0] + f" (log: {result.log})"
    return (f"peak {result.memory_mb:,.0f} MB ({cell(result.steady_mb, ',.0f')} MB between steps), first step after "
            f"{result.startup_s} s (ready after {result.ready_s} s), {result.steps} steps")  # fmt: skip


def package_of(repo: Path) -> str:
    """The granite_docling that ``repo``'s train.py imports, as seen from a subprocess like the training runs."""
    code = "import granite_docling; print(granite_docling.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=train_env(repo), capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


# ---------------------------------------------------------------------------------------------------------------
# Report


def parse_plan(plan: str) -> list[tuple[str, int]]:
    cases = []
    for item in filter(None, (part.strip() for part in plan.split(","))):
        layout, _, samples = item.partition(":")
        if layout not in LAYOUTS or not samples.isdigit() or int(samples) < 1:
            raise SystemExit(f"--plan: {item!r} is not LAYOUT:SAMPLES with LAYOUT one of {', '.join(LAYOUTS)}")
        cases.append((layout, int(samples)))
    return cases


def figure(case: Case, key: str) -> float | None:
    """The cached run's ``key``, or the first run's when there is no cached figure."""
    for phase in ("cached", "first"):
        value = getattr(case.runs.get(phase), key, None)
        if value is not None:
            return value
    return None


def growth(cases: list[Case]) -> list[dict]:
    """Each larger dataset against the smallest of its layout: cached memory and start-up differences."""
    rows = []
    for layout in LAYOUTS:
        ok = sorted((c for c in cases if c.layout == layout and figure(c, "startup_s") is not None),
                    key=lambda c: c.samples)  # fmt: skip
        for case in ok[1:]:
            base = ok[0]
            rows.append({"layout": layout, "from": base.samples, "to": case.samples,
                         "memory_mb": round(figure(case, "memory_mb") - figure(base, "memory_mb"), 1),
                         "steady_mb": difference(figure(case, "steady_mb"), figure(base, "steady_mb")),
                         "startup_s": round(figure(case, "startup_s") - figure(base, "startup_s"), 2),
                         "ready_s": difference(figure(case, "ready_s"), figure(base, "ready_s"))})  # fmt: skip
    return rows


def difference(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else round(value - base, 1)


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_row(texts: tuple[str, ...]) -> str:
    """The layout left-aligned, then the other columns right-aligned in their widths."""
    widths = (9, 8, 10, 10, 8, 8, 8, 8, 8)
    return f"{texts[0]:<7}" + "".join(f"{text:>{width}}" for text, width in zip(texts[1:], widths, strict=True))


def print_table(cases: list[Case], header: dict) -> None:
    print(f"{header['repo']} ({header['package']}), cache key {header['cache_key']}, {header['cpus']} CPUs")
    print(f"{'':<16}{'data':>8}{'peak memory, MB':>20}{'steady':>8}{'start-up, s':>16}{'index build':>16}")
    print(table_row(("layout", "samples", "MB", "first", "cached", "MB", "first", "cached", "s", "procs")))
    for case in cases:
        first, cached = case.runs.get("first", RunResult()), case.runs.get("cached", RunResult())
        print(table_row((case.layout, f"{case.samples:,}", f"{case.data_bytes / 1e6:,.0f}",
                         cell(first.memory_mb, ",.0f"), cell(cached.memory_mb, ",.0f"), cell(cached.steady_mb, ",.0f"),
                         cell(first.startup_s, ".1f"), cell(cached.startup_s, ".1f"), cell(first.index_s, ".1f"),
                         cell(first.index_processes, "d"))))  # fmt: skip
        for phase, run in case.runs.items():
            if run.error:
                print(f"    {phase}: {run.error}")
    for row in growth(cases):
        steady = "" if row["steady_mb"] is None else f" ({row['steady_mb']:+,.0f} MB between steps)"
        ready = "" if row["ready_s"] is None else f" ({row['ready_s']:+.1f} s before the first step)"
        print(f"{row['layout']}: {row['memory_mb']:+,.0f} MB peak{steady} and {row['startup_s']:+.1f} s "
              f"start-up{ready} from {row['from']:,} to {row['to']:,} samples, cached")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"LAYOUT:SAMPLES,... (default {DEFAULT_PLAN})")
    parser.add_argument("--quick", action="store_true", help=f"the plan {QUICK_PLAN}: a smoke test")
    parser.add_argument("--work", type=Path, default=Path("/tmp/granite_scale"),
                        help="datasets (kept and reused), caches, run folders and logs")  # fmt: skip
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose train.py runs (default: this one)")
    parser.add_argument("--cache-key", default=CACHE_KEY, help=f"cache folder override (default {CACHE_KEY})")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take to reach its 3rd step")
    pages_help = "most real pages in one sample (1 keeps a smoke test's heaviest first step short)"
    parser.add_argument("--max-pages", type=int, default=MAX_PAGES_PER_SAMPLE, help=pages_help)
    parser.add_argument("--build-only", action="store_true", help="build the plan's datasets, train nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    args.work, args.repo = args.work.resolve(), args.repo.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    header = {"repo": str(args.repo), "package": package_of(args.repo), "cache_key": args.cache_key,
              "cpus": os.cpu_count(), "work": str(args.work), "steps": STEPS}  # fmt: skip
    if not header["package"].startswith(str(args.repo)):
        print(f"warning: {args.repo}/train.py imports {header['package']}, not its own package", file=sys.stderr)
    pages, cases = real_pages(args.work), []
    for layout, samples in parse_plan(QUICK_PLAN if args.quick else args.plan):
        data, meta, built = dataset(args.work, layout, samples, pages, args.max_pages)
        case = Case(layout, samples, str(data), meta["bytes"], meta["seconds"], built)
        if not args.json:
            print(f"{layout}-{samples}: {'built' if built else 'reused'} {data} ({meta['bytes'] / 1e9:.2f} GB, "
                  f"{meta['seconds']:.1f} s to build)", file=sys.stderr, flush=True)  # fmt: skip
        if not args.build_only:
            run_case(case, args, data)
        cases.append(case)
    if args.json:
        print(json.dumps({**header, "cases": [asdict(c) for c in cases], "growth": growth(cases)}, indent=2))
    elif not args.build_only:
        print_table(cases, header)
    return 0 if all(r.steps for c in cases for r in c.runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
