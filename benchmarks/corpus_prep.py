"""Preparing a corpus that does not fit in memory: peak memory, throughput, and a run's start-up.

    python benchmarks/corpus_prep.py --dir /tmp/corpus-bench --gb 1 --small-gb 0.25 --workers 1 2 \\
        --legacy-commit 98effe0 [--legacy-gb 0.25] [--keep]

Writes a corpus of shuffled Shakespeare lines (`--gb` of it: files of 1 MB for data=text_files, and the
same text as documents of 1-8 KB in JSON lines for data=hf_text with data.name=json), then prepares it in
a fresh process per row, in a cache of its own under --dir, and prints one row each:

  - the phases' wall times: the first pass (characters, the split), the tokenizer (sampling its text
    and training it), the encoding into shards, and MB/s of the encoding (corpus bytes / its time);
  - peak memory of the process and its encoding workers together, sampled every 0.2 s from
    /proc/PID/smaps_rollup: their resident sets summed (RSS; it counts the pages a forked worker shares
    with its parent once per process), their proportional sets summed (PSS: a page shared by n processes
    counts 1/n; it includes file pages mapped from the dataset's Arrow files), and the anonymous part of
    that (what the preparation itself holds).

Rows: text_files at --small-gb and at --gb with each of --workers (each size's first row trains its
tokenizer; the rows after it reuse the tokenizer and the survey, so they time the encoding alone);
hf_text with the largest --workers on the first JSON lines file (about 0.25 GB) and on all of them, as a
dataset (the first pass includes datasets' conversion of the JSON lines to Arrow files, which the
passes then memory-map) and streamed (data.streaming=true: read from the JSON lines each pass); and,
with --legacy-commit, the code of that commit (which reads the corpus into memory and encodes it in one
process) on the text_files corpus at --legacy-gb. Then a run's start-up on the prepared --gb cache
against one on the embedded Shakespeare: prepare_data() alone in a fresh process, and the time from the
command to the first training step (benchmarks/startup.py's measure, model=nano). --keep keeps --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- the corpus ------------------------------------------------------------------------------------

def shakespeare_lines() -> list[str]:
    from qknorm.config import DataConfig
    from qknorm.data import load_corpus

    corpus = load_corpus(DataConfig())
    return [line for doc in corpus.train + corpus.val for line in doc.split("\n") if line.strip()]


def write_corpus(folder: Path, gb: float, seed: int = 0) -> dict:
    """text/: files of about 1 MB; jsonl/: the same text as documents of 1-8 KB, 256 MB a file."""
    lines = shakespeare_lines()
    rng = random.Random(seed)
    text_dir, jsonl_dir = folder / "text", folder / "jsonl"
    text_dir.mkdir(parents=True)
    jsonl_dir.mkdir(parents=True)
    target = int(gb * 1e9)
    written = files = 0
    jsonl = None
    jsonl_bytes = 0
    while written < target:
        block = []
        size = 0
        while size < 1_000_000:
            line = rng.choice(lines)
            block.append(line)
            size += len(line.encode("utf-8")) + 1
        text = "\n".join(block) + "\n"
        (text_dir / f"part{files:05d}.txt").write_text(text, encoding="utf-8")
        if jsonl is None or jsonl_bytes > 256_000_000:
            if jsonl is not None:
                jsonl.close()
            jsonl = open(jsonl_dir / f"part{len(list(jsonl_dir.iterdir())):03d}.jsonl", "w", encoding="utf-8")
            jsonl_bytes = 0
        i = 0
        while i < len(block):  # documents of 1-8 KB of consecutive lines
            n = rng.randint(15, 120)
            row = json.dumps({"text": "\n".join(block[i:i + n]) + "\n"}) + "\n"
            jsonl.write(row)
            jsonl_bytes += len(row)
            i += n
        written += size
        files += 1
    if jsonl is not None:
        jsonl.close()
    return {"text_files": files, "bytes": written, "jsonl_files": sorted(str(p) for p in jsonl_dir.iterdir())}


def subset(folder: Path, name: str, files: int) -> Path:
    """The first `files` text files, hard-linked into their own folder (another corpus, another key)."""
    out = folder / name
    out.mkdir()
    for p in sorted((folder / "text").iterdir())[:files]:
        os.link(p, out / p.name)
    return out


# -- measuring a process tree ----------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int, int]:
    """(Rss, Pss, Pss_Anon) of a process in bytes. In the proportional sizes a page shared by n processes
    counts 1/n (the encoding workers are forked and share the parent's pages; their RSS counts them again)."""
    out = {"Rss:": 0, "Pss:": 0, "Pss_Anon:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                field = line.split(maxsplit=1)[0]
                if field in out:
                    out[field] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out["Rss:"], out["Pss:"], out["Pss_Anon:"]


def run_measured(cmd: list[str], env: dict, log_path: Path) -> tuple[dict, list[int]]:
    """Run `cmd`, sampling the memory of it and its children; returns (its last stdout line as JSON, the
    peaks of the tree's summed RSS, PSS and anonymous PSS, in bytes)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        peak = [0, 0, 0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                total = [0, 0, 0]
                for pid in _tree(proc.pid):
                    for k, v in enumerate(_memory(pid)):
                        total[k] += v
                peak[:] = [max(a, b) for a, b in zip(peak, total, strict=True)]
                done.wait(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        out, _ = proc.communicate()
        done.set()
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log_path}")
    return json.loads(out.strip().splitlines()[-1]), peak


# -- the child: one preparation --------------------------------------------------------------------

def child(spec: dict) -> None:
    """Prepare one corpus with the code under spec['src'] (this checkout, or an older commit's)."""
    sys.path.insert(0, spec["src"])
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from qknorm.config import DataConfig

    cfg = DataConfig(**spec["data"])
    times = {}
    if spec["legacy"]:  # imports first (this code's qknorm.data loads torch and Lightning): not timed
        from qknorm.data.corpora import load_corpus
        from qknorm.data.tokens import get_tokenized, get_tokenizer

        t = time.perf_counter()
        corpus = load_corpus(cfg)
        times["read_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenizer = get_tokenizer(corpus, cfg)
        times["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenized = get_tokenized(corpus, cfg, tokenizer)
        times["encode_s"] = time.perf_counter() - t
    else:
        from qknorm.data.corpora import open_source
        from qknorm.data.tokens import get_survey, get_tokenized, get_tokenizer

        t = time.perf_counter()
        source = open_source(cfg)
        get_survey(source, cfg)
        times["read_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenizer = get_tokenizer(source, cfg)
        times["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenized = get_tokenized(source, cfg, tokenizer)
        times["encode_s"] = time.perf_counter() - t
    tokens = len(tokenized.train_tokens()) + len(tokenized.val_tokens())
    print(json.dumps({**times, "tokens": tokens}))


def startup_child(spec: dict) -> None:
    from qknorm.config import DataConfig
    from qknorm.data import prepare_data

    t = time.perf_counter()
    data = prepare_data(DataConfig(**spec["data"]))
    print(json.dumps({"prepare_data_s": time.perf_counter() - t, "train_tokens": len(data.tokenized.train_tokens())}))


# -- the rows --------------------------------------------------------------------------------------

def prepare_row(name: str, data: dict, nbytes: int, bench: Path, src: Path, legacy: bool = False) -> dict:
    spec = {"data": data, "src": str(src), "legacy": legacy}
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    result, (rss, pss, anon) = run_measured(cmd, env, bench / f"{name}.log")
    row = {"row": name, "MB": nbytes / 1e6, **result, "peak_rss_MB": rss / 1e6, "peak_pss_MB": pss / 1e6,
           "peak_anon_MB": anon / 1e6}
    row["encode_MB_s"] = nbytes / 1e6 / result["encode_s"]
    row["total_s"] = result["read_s"] + result["tokenizer_s"] + result["encode_s"]
    print(f"{name:<34} {row['MB']:8.0f} MB  read {result['read_s']:7.1f} s  tokenizer {result['tokenizer_s']:7.1f} s  "
          f"encode {result['encode_s']:7.1f} s ({row['encode_MB_s']:5.2f} MB/s)  {result['tokens']:>12,} tokens  "
          f"peak RSS {row['peak_rss_MB']:5.0f} MB, PSS {row['peak_pss_MB']:5.0f} MB, anon {row['peak_anon_MB']:5.0f} MB", flush=True)
    return row


def reuse_tokenizer(cache: Path) -> None:
    """Drop the token shards, keep the tokenizer and the survey: the next row times the encoding alone."""
    shutil.rmtree(cache / "tokens", ignore_errors=True)


def startup_rows(data_1gb: dict, bench: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from startup import first_step_seconds

    shakespeare = {"cache_dir": str(bench / "cache-shakespeare")}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for name, data in (("shakespeare", shakespeare), ("text_files 1 GB", data_1gb)):
        times = []
        for _ in range(4):  # the first builds the Shakespeare cache (untimed)
            out = subprocess.run([sys.executable, __file__, "--startup-child", json.dumps({"data": data})], env=env,
                                 capture_output=True, text=True, check=True).stdout
            times.append(json.loads(out.strip().splitlines()[-1])["prepare_data_s"])
        times = times[1:]
        print(f"start-up, prepare_data() on a built cache, {name}: " + ", ".join(f"{t:.2f}" for t in times) + " s", flush=True)
    # validation capped, so that the run's last step does not validate on 5% of a gigabyte
    overrides = {"shakespeare": ["data.val_max_tokens=20000"],
                 "text_files 1 GB": ["data=text_files", f"data.paths=[{data_1gb['paths'][0]}]",
                                     f"data.vocab_size={data_1gb['vocab_size']}", "data.val_max_tokens=20000"]}
    caches = {"shakespeare": shakespeare["cache_dir"], "text_files 1 GB": data_1gb["cache_dir"]}
    for name, extra in overrides.items():
        os.environ["QKNORM_CACHE_DIR"] = caches[name]
        times = [first_step_seconds(extra) for _ in range(3)]
        print(f"start-up, command to first training step (model=nano), {name}: " + ", ".join(f"{t:.1f}" for t in times) + " s",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the corpus and caches go (default: a new temporary folder)")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--small-gb", type=float, default=0.25)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--legacy-commit", default=None, help="also prepare with this commit's code (held in memory)")
    ap.add_argument("--legacy-gb", type=float, default=None, help="the corpus size for the legacy row (default --small-gb)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["small", "text", "hf", "streamed", "legacy", "startup"])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--startup-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.startup_child:
        return startup_child(json.loads(args.startup_child))

    bench = args.dir or Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    bench.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; corpus and caches in {bench}", flush=True)
    try:
        made = json.loads((bench / "corpus.json").read_text()) if (bench / "corpus.json").exists() else None
        if made is None:
            t = time.perf_counter()
            made = write_corpus(bench, args.gb)
            (bench / "corpus.json").write_text(json.dumps(made))
            print(f"wrote {made['bytes'] / 1e9:.2f} GB ({made['text_files']} text files, {len(made['jsonl_files'])} jsonl files) "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        per_file = made["bytes"] / made["text_files"]
        src = ROOT / "src"
        common = {"vocab_size": args.vocab_size, "seq_len": 256}
        text_1gb = {"source": "text_files", "paths": [str(bench / "text")], "cache_dir": str(bench / "cache-text"), **common}
        # each size's first row trains its tokenizer (with one worker, the first of --workers); the rows
        # after it reuse the tokenizer and the survey and time the encoding alone
        sizes = []
        if "small" not in args.skip:
            n = round(args.small_gb * 1e9 / per_file)
            folder = bench / f"text-{args.small_gb}"
            if not folder.exists():
                subset(bench, folder.name, n)
            sizes.append((args.small_gb, folder, n * per_file, bench / "cache-small"))
        if "text" not in args.skip:
            sizes.append((args.gb, bench / "text", made["bytes"], bench / "cache-text"))
        for gb, folder, nbytes, cache in sizes:
            shutil.rmtree(cache, ignore_errors=True)
            for w in args.workers:
                reuse_tokenizer(cache)
                data = {"source": "text_files", "paths": [str(folder)], "cache_dir": str(cache), **common, "workers": w}
                prepare_row(f"text_files {gb} GB, {w} worker{'s' if w > 1 else ''}", data, nbytes, bench, src)
        if "hf" not in args.skip:  # the first JSON lines file (about 0.25 GB) and all of them; as a dataset, and streamed
            w = max(args.workers)
            jsonl_bytes = [Path(f).stat().st_size for f in made["jsonl_files"]]
            for streaming in (False, True) if "streamed" not in args.skip else (False,):
                for files in (made["jsonl_files"][:1], made["jsonl_files"]):
                    nbytes = sum(jsonl_bytes[:len(files)]) * made["bytes"] / sum(jsonl_bytes)  # their text's bytes
                    cache = bench / "cache-hf"
                    shutil.rmtree(cache, ignore_errors=True)
                    data = {"source": "hf_text", "name": "json", "data_files": files, "cache_dir": str(cache), "streaming": streaming,
                            "max_tokens": None, "val_fraction": 0.01, **common, "workers": w}
                    prepare_row(f"hf_text (json{', streaming' if streaming else ''}) {nbytes / 1e9:.2f} GB, {w} workers", data, nbytes,
                                bench, src)
        if args.legacy_commit and "legacy" not in args.skip:
            gb = args.legacy_gb or args.small_gb
            n = round(gb * 1e9 / per_file)
            folder = bench / f"text-{gb}"
            if not folder.exists():
                subset(bench, folder.name, n)
            old = bench / "legacy-src"
            if not old.exists():
                old.mkdir()
                archive = subprocess.run(["git", "archive", args.legacy_commit, "src"], cwd=ROOT, capture_output=True, check=True).stdout
                subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            data = {"source": "text_files", "paths": [str(folder)], "cache_dir": str(bench / f"cache-legacy-{gb}"), **common}
            prepare_row(f"{args.legacy_commit} (in memory) {gb} GB", data, n * per_file, bench, old / "src", legacy=True)
        if "startup" not in args.skip:
            startup_rows(text_1gb, bench)
        print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(bench, ignore_errors=True)


if __name__ == "__main__":
    main()
