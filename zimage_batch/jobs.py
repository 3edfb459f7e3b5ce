"""Reading and checking the jobs file (CSV or JSONL), so every bad row is reported before anything is sent.

One job is one row: prompt (required), negative, seed, width, height, count, steps, cfg, filename_prefix.
A blank or absent value keeps the template's own value, except count, which defaults to 1.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("prompt", "negative", "seed", "width", "height", "count", "steps", "cfg", "filename_prefix")
MULTIPLE = 16                  # the model's latent is 1/8 of the image, patchified 2x2: sides must divide by 16
MAX_SIDE = 16384               # ComfyUI's MAX_RESOLUTION for the empty-latent nodes
MAX_COUNT = 64                 # images per job go out as one batch; more would rarely fit in memory
MAX_SEED = 2**64 - 1           # ComfyUI's seed widget range
MAX_STEPS = 10000              # KSampler's limit; the turbo sampler's own (50) is checked by the server


@dataclass(frozen=True)
class Job:
    where: str                 # "jobs.csv line 3": how errors and the log name this job
    line: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    count: int = 1
    steps: int | None = None
    cfg: float | None = None
    filename_prefix: str | None = None


class JobsError(ValueError):
    """One or more bad rows; the message lists every one of them, each naming its line and column."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_jobs(path: str | Path) -> list[Job]:
    path = Path(path)
    if not path.is_file():
        raise JobsError([f"{path}: no such file"])
    rows = read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else read_csv(path)
    jobs, problems = [], []
    for line, row in rows:
        where = f"{path.name} line {line}"
        if isinstance(row, str):                        # the reader could not even split this line
            problems.append(f"{where}: {row}")
            continue
        job, errors = parse_row(where, line, row)
        problems += errors
        if job:
            jobs.append(job)
    if not problems and not jobs:
        problems.append(f"{path}: no jobs in the file")
    if problems:
        raise JobsError(problems)
    return jobs


def read_csv(path: Path) -> list[tuple[int, dict | str]]:
    # utf-8-sig: spreadsheets save CSV with a byte-order mark that would otherwise stick to the first column
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [normal(h) for h in reader.fieldnames or []]
        unknown = [h for h in header if h not in COLUMNS]
        if "prompt" not in header or unknown:
            missing = "" if "prompt" in header else "no 'prompt' column; "
            extra = f"unknown columns {unknown}; " if unknown else ""
            return [(1, f"{missing}{extra}the columns are {', '.join(COLUMNS)}")]
        reader.fieldnames = header
        rows = []
        for row in reader:
            if None in row:                             # DictReader files surplus cells under the key None
                rows.append((reader.line_num, f"{len(header) + len(row[None])} cells for {len(header)} columns"))
            elif any((v or "").strip() for v in row.values()):   # skip empty lines between jobs
                rows.append((reader.line_num, row))
        return rows


def read_jsonl(path: Path) -> list[tuple[int, dict | str]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append((line, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            rows.append((line, "each line must be a JSON object like {\"prompt\": \"...\", \"seed\": 1}"))
            continue
        row = {normal(k): v for k, v in row.items()}
        unknown = [k for k in row if k not in COLUMNS]
        rows.append((line, f"unknown keys {unknown}; the keys are {', '.join(COLUMNS)}") if unknown else (line, row))
    return rows


def normal(name: str) -> str:
    return name.strip().lower()


def parse_row(where: str, line: int, row: dict) -> tuple[Job | None, list[str]]:
    errors: list[str] = []

    def bad(column: str, value, why: str) -> None:
        errors.append(f"{where}, column '{column}': {value!r} {why}")

    values = {k: blank_to_none(v) for k, v in row.items()}
    prompt = values.get("prompt")
    if prompt is None:
        errors.append(f"{where}, column 'prompt': missing (every job needs a prompt)")
    elif not isinstance(prompt, str):
        bad("prompt", prompt, "is not text")
    negative = values.get("negative")
    if negative is not None and not isinstance(negative, str):
        bad("negative", negative, "is not text")

    def integer(column: str, low: int, high: int) -> int | None:
        value = values.get(column)
        if value is None:
            return None
        number = as_int(value)
        if number is None:
            bad(column, value, "is not a whole number")
        elif not low <= number <= high:
            bad(column, value, f"is out of range {low}..{high}")
        else:
            return number
        return None

    seed = integer("seed", 0, MAX_SEED)
    width, height = integer("width", MULTIPLE, MAX_SIDE), integer("height", MULTIPLE, MAX_SIDE)
    for column, side in (("width", width), ("height", height)):
        if side is not None and side % MULTIPLE:
            bad(column, side, f"is not a multiple of {MULTIPLE} (the model needs sides in steps of 16; "
                              f"try {round(side / MULTIPLE) * MULTIPLE or MULTIPLE})")
    if (values.get("width") is None) != (values.get("height") is None):
        errors.append(f"{where}, columns 'width'/'height': give both or neither (neither keeps the template's size)")
    count = integer("count", 1, MAX_COUNT)
    steps = integer("steps", 1, MAX_STEPS)
    cfg = values.get("cfg")
    if cfg is not None:
        number = as_float(cfg)
        if number is None or not 0 < number <= 100:
            bad("cfg", cfg, "is not a number in (0, 100]")
        cfg = number
    prefix = values.get("filename_prefix")
    if prefix is not None:
        parts = str(prefix).replace("\\", "/").split("/")
        if not isinstance(prefix, str) or prefix.startswith(("/", "\\")) or ".." in parts or "" in parts:
            bad("filename_prefix", prefix, "must be a relative name like 'shop/mug' (no '..', no leading '/')")
    if errors:
        return None, errors
    return Job(where, line, prompt, negative, seed, width, height, count or 1, steps, cfg, prefix), []


def blank_to_none(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def as_int(value) -> int | None:
    if isinstance(value, bool):                         # JSON true is an int in Python, never a seed
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    if text.lstrip("+-").isdigit():
        return int(text)
    return None


def as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
