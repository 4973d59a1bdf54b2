#!/usr/bin/env python3
"""Turns the raw output of tests/bench/run.sh into the Markdown report and
the PNG chart.

  report.py --raw DIR --md OUT.md [--png OUT.png]

DIR holds results.tsv (system, metric, round, value), kms.jsonl (one JSON
object per KMS measurement), machine.txt (key=value) and notes.txt. Standard
library only, except matplotlib (python3-matplotlib) for the chart; without
it the chart is skipped with a note.
"""
import argparse
import collections
import json
import os
import statistics
import sys

SYSTEM_NAMES = {
    "backing": "backing store (no FUSE)",
    "bindfs": "bindfs (FUSE passthrough)",
    "kmsfs": "kmsfs",
    "kmsfs-kmsd": "kmsfs via kmsd",
    "gocryptfs": "gocryptfs",
    "securefs": "securefs (lite)",
    "cryfs": "CryFS",
}
SYSTEM_ORDER = ["kmsfs", "kmsfs-kmsd", "gocryptfs", "securefs", "cryfs", "bindfs", "backing"]
PEERS = ["gocryptfs", "securefs", "cryfs"]

# metric, label, unit, higher_is_better
FS_METRICS = [
    ("seq_write", "Sequential write", "MB/s", True),
    ("seq_read", "Sequential read (cold)", "MB/s", True),
    ("rand_read", "Random 4 KiB read (O_DIRECT, QD1)", "IOPS", True),
    ("rand_write", "Random 4 KiB write (O_DIRECT, QD1)", "IOPS", True),
    ("untar", "Untar Linux source subset", "s", False),
    ("ls_lR", "ls -lR (cold)", "s", False),
    ("read_all", "Read every file (cold)", "s", False),
    ("rm_rf", "rm -rf", "s", False),
    ("sqlite_delete", "SQLite inserts, rollback journal", "s", False),
    ("sqlite_wal", "SQLite inserts, WAL", "s", False),
    ("git", "git add + commit + fsck", "s", False),
    ("rss_untar", "Peak RSS of the FUSE server during untar", "MiB", False),
]
METRIC = {m[0]: m for m in FS_METRICS}


def load(raw):
    results = collections.defaultdict(list)  # (system, metric) -> [values]
    with open(os.path.join(raw, "results.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4 or parts[3] in ("", "NA"):
                continue
            try:
                results[(parts[0], parts[1])].append(float(parts[3]))
            except ValueError:
                continue
    kms = collections.defaultdict(list)  # (via, op, threads) -> [records]
    path = os.path.join(raw, "kms.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    kms[(r["via"], r["op"], r["threads"])].append(r)
    machine = {}
    with open(os.path.join(raw, "machine.txt")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                machine[k] = v
    notes = []
    path = os.path.join(raw, "notes.txt")
    if os.path.exists(path):
        with open(path) as f:
            notes = list(dict.fromkeys(l.strip() for l in f if l.strip()))
    return results, kms, machine, notes


def med(values):
    return statistics.median(values) if values else None


def fmt(v, unit=""):
    if v is None:
        return "—"
    if unit == "IOPS" or abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(values, unit):
    if not values:
        return "—"
    m = med(values)
    if len(values) == 1:
        return fmt(m, unit)
    return f"{fmt(m, unit)} ({fmt(min(values), unit)}–{fmt(max(values), unit)})"


def speed_ratio(metric, value, reference):
    """> 1 means faster (or smaller) than the reference."""
    if value is None or reference in (None, 0) or value == 0:
        return None
    higher = METRIC[metric][3]
    return value / reference if higher else reference / value


def fs_tables(results, systems, out):
    out.append("### Filesystems: median (min–max) over the rounds\n")
    out.append("| workload | unit | " + " | ".join(SYSTEM_NAMES.get(s, s) for s in systems) + " |")
    out.append("|---|---|" + "---:|" * len(systems))
    for metric, label, unit, _ in FS_METRICS:
        if not any(results.get((s, metric)) for s in systems):
            continue
        row = [label, unit] + [cell(results.get((s, metric), []), unit) for s in systems]
        out.append("| " + " | ".join(row) + " |")
    out.append("")

    if "gocryptfs" in systems:
        out.append("### Relative to gocryptfs (medians; > 1 = faster than gocryptfs, for RSS: smaller)\n")
        out.append("| workload | " + " | ".join(SYSTEM_NAMES.get(s, s) for s in systems) + " |")
        out.append("|---|" + "---:|" * len(systems))
        for metric, label, unit, _ in FS_METRICS:
            ref = med(results.get(("gocryptfs", metric), []))
            if ref is None:
                continue
            row = [label]
            for s in systems:
                r = speed_ratio(metric, med(results.get((s, metric), [])), ref)
                row.append("—" if r is None else f"{r:.2f}×")
            out.append("| " + " | ".join(row) + " |")
        out.append("")


def best_peer(results, metric, systems):
    best = None
    for s in PEERS:
        if s not in systems:
            continue
        v = med(results.get((s, metric), []))
        if v is None:
            continue
        if best is None or speed_ratio(metric, v, best[1]) > 1:
            best = (s, v)
    return best


def kms_median(kms, via, op, threads):
    recs = kms.get((via, op, threads), [])
    return med([r["ops_per_s"] for r in recs]) if recs else None


def targets_table(results, kms, systems, out):
    out.append("### The issue's targets (kmsfs in the same run)\n")
    out.append("| target | kmsfs | reference | kmsfs ÷ reference | required | result |")
    out.append("|---|---:|---|---:|---:|:---:|")

    def row(label, value, unit, ref_label, ratio, required):
        if value is None or ratio is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if ratio >= required else "FAIL"
        out.append(
            f"| {label} | {fmt(value, unit)} {unit} | {ref_label} | "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} | ≥ {required:g}× | {verdict} |"
        )

    peer_targets = [
        ("seq_write", 2.0), ("seq_read", 1.3), ("rand_read", 1.1), ("rand_write", 1.1),
        ("untar", 1.0), ("ls_lR", 1.0), ("read_all", 1.0), ("rm_rf", 1.0),
    ]
    for metric, required in peer_targets:
        _, label, unit, _ = METRIC[metric]
        k = med(results.get(("kmsfs", metric), []))
        bp = best_peer(results, metric, systems)
        if bp is None:
            row(label, k, unit, "no peer measured", None, required)
            continue
        ratio = speed_ratio(metric, k, bp[1])
        if required == 1.0 and ratio is not None:
            # "faster than the best peer": strictly ahead.
            verdict_ratio = ratio
        else:
            verdict_ratio = ratio
        row(label, k, unit, f"best peer: {SYSTEM_NAMES[bp[0]]} {fmt(bp[1], unit)} {unit}", verdict_ratio,
            required)

    # SQLite and git: kmsfs time at most 2x the backing store's.
    for metric in ("sqlite_delete", "sqlite_wal", "git"):
        _, label, unit, _ = METRIC[metric]
        k = med(results.get(("kmsfs", metric), []))
        b = med(results.get(("backing", metric), []))
        ratio = None if (k is None or b is None or k == 0) else b / k  # speed relative to backing
        out.append(
            f"| {label} | {fmt(k, unit)} {unit} | backing store {fmt(b, unit)} {unit} | "
            f"{'—' if k is None or b is None else f'{k / b:.2f}× the time'} | ≤ 2× the time | "
            f"{'n/a' if ratio is None else ('PASS' if ratio >= 0.5 else 'FAIL')} |"
        )

    # KMS through kmsd vs the HSM's raw AES-GCM, at the largest thread count.
    threads = sorted({t for (_, _, t) in kms})
    if threads:
        t = threads[-1]
        for op, raw_op in (("GenerateDataKey", "EncryptGCM"), ("Decrypt", "DecryptGCM")):
            k = kms_median(kms, "kmsd", op, t)
            h = kms_median(kms, "hsm-raw", raw_op, t)
            ratio = None if (k is None or h in (None, 0)) else k / h
            row(f"KMS {op} through kmsd ({t} threads)", k, "op/s",
                f"HSM raw AES-GCM {fmt(h)} op/s", ratio, 0.8)

    rss = results.get(("kmsfs", "rss_untar"), [])
    if rss:
        m = max(rss)
        out.append(f"| kmsfs peak RSS during untar (max over rounds) | {fmt(m)} MiB | limit 100 MiB | — | < 100 MiB | "
                   f"{'PASS' if m < 100 else 'FAIL'} |")
    out.append("")


def kms_table(kms, results, out):
    if not kms:
        return
    out.append("### KMS and crypto limits: median (min–max) over the rounds\n")
    out.append("| path | operation | threads | op/s | p50 latency | p99 latency |")
    out.append("|---|---|---:|---:|---:|---:|")
    order = {"hsm-raw": 0, "embedded": 1, "kmsd": 2}
    names = {"hsm-raw": "HSM raw (Pkcs11Hsm, SoftHSM2)", "embedded": "KMS embedded (in process)",
             "kmsd": "KMS through kmsd (Unix socket)"}
    for key in sorted(kms, key=lambda k: (k[2], order.get(k[0], 9), k[1])):
        recs = kms[key]
        rates = [r["ops_per_s"] for r in recs]
        p50 = med([r["p50_us"] for r in recs])
        p99 = med([r["p99_us"] for r in recs])
        errors = sum(r.get("errors", 0) for r in recs)
        op = key[1] + (f" ({errors} errors)" if errors else "")
        out.append(f"| {names.get(key[0], key[0])} | {op} | {key[2]} | {cell(rates, 'IOPS')} | "
                   f"{fmt(p50)} µs | {fmt(p99)} µs |")
    for metric, label in (("aes_gcm_4k", "4 KiB"), ("aes_gcm_16k", "16 KiB")):
        v = results.get(("openssl", metric), [])
        if v:
            out.append(f"| `openssl speed -evp aes-256-gcm` ({label} buffers, one core, per CPU-second) | "
                       f"encrypt | 1 | {cell(v, 'MB/s')} MB/s | | |")
    out.append("")


def chart(results, kms, systems, png, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (apt-get install python3-matplotlib): no chart"

    metrics = [m for m in FS_METRICS if m[0] != "rss_untar" and med(results.get(("gocryptfs", m[0]), []))]
    shown = [s for s in systems if any(results.get((s, m[0])) for m in metrics)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 1.2]})
    ax = axes[0]
    width = 0.8 / max(1, len(shown))
    for i, s in enumerate(shown):
        ys, lo, hi = [], [], []
        for metric, *_ in metrics:
            ref = med(results[("gocryptfs", metric)])
            vals = results.get((s, metric), [])
            r = speed_ratio(metric, med(vals), ref) if vals else None
            ys.append(r or 0)
            rs = [speed_ratio(metric, v, ref) or 0 for v in vals] or [0]
            lo.append(max(0, (r or 0) - min(rs)))
            hi.append(max(0, max(rs) - (r or 0)))
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, ys, width, label=SYSTEM_NAMES.get(s, s), yerr=[lo, hi], capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m[1].replace(" (", "\n(") for m in metrics], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speed relative to gocryptfs (> 1 = faster), log scale")
    ax.set_yscale("log")
    if shown:
        ax.legend(fontsize=8)
    ax.set_title("Filesystems (median, whiskers = min–max)")

    ax = axes[1]
    threads = sorted({t for (_, _, t) in kms})
    if threads:
        t = threads[-1]
        bars = [("hsm-raw", "EncryptGCM", "HSM raw\nencrypt"), ("embedded", "GenerateDataKey", "embedded\nGenerateDataKey"),
                ("kmsd", "GenerateDataKey", "kmsd\nGenerateDataKey"), ("hsm-raw", "DecryptGCM", "HSM raw\ndecrypt"),
                ("embedded", "Decrypt", "embedded\nDecrypt"), ("kmsd", "Decrypt", "kmsd\nDecrypt")]
        ys = [kms_median(kms, v, o, t) or 0 for v, o, _ in bars]
        ax.bar(range(len(bars)), ys, color=["#888", "#1f77b4", "#ff7f0e"] * 2)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[2] for b in bars], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("operations per second")
        ax.set_title(f"KMS, {t} threads")
    else:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--png")
    a = ap.parse_args()
    results, kms, machine, notes = load(a.raw)
    present = {s for (s, _) in results}
    systems = [s for s in SYSTEM_ORDER if s in present]

    short = machine.get("profile") == "short"
    out = []
    out.append("# kmsfs benchmark — " + ("SHORT profile" if short else "full profile"))
    out.append("")
    out.append("Generated by `tests/bench/run.sh` (see [docs/performance.md](../performance.md)); "
               "raw values in `" + os.path.basename(a.raw.rstrip("/")) + "/`.")
    out.append("")
    if short:
        out.append("> **Short profile:** small sizes, few rounds. Use it to check the harness and to see "
                   "large differences, not for small ones.")
        out.append("")
    load_start = machine.get("load_at_start", "")
    try:
        if float(load_start.split()[0]) > 0.5 * float(machine.get("nproc", "1")):
            out.append(f"> **Noisy machine:** load average {load_start} at the start and "
                       f"{machine.get('load_at_end', '?')} at the end (other jobs were running). "
                       "Compare systems within this run only; absolute figures are low and spread is wide.")
            out.append("")
    except (ValueError, IndexError):
        pass

    out.append("## Machine and configuration\n")
    out.append("| | |")
    out.append("|---|---|")
    for k in ("date", "cpu", "nproc", "memory", "kernel", "os", "load_at_start", "load_at_end", "kmsfs_commit",
              "kmsfs_opts", "kms_state", "profile", "repeat", "backing", "seq_mb", "fio_mb", "fio_seconds", "untar_files",
              "sqlite_rows", "sqlite_batch", "kms_seconds", "kms_threads", "duration_s"):
        if k in machine:
            out.append(f"| {k} | {machine[k]} |")
    versions = ", ".join(f"{k[8:]} {v}" for k, v in sorted(machine.items()) if k.startswith("version_") and v)
    if versions:
        out.append(f"| versions | {versions} |")
    out.append("")

    chart_error = None
    if a.png:
        title = (f"kmsfs benchmark ({'SHORT, noisy' if short else 'full'}; {machine.get('date', '')}; "
                 f"{machine.get('nproc', '?')} CPUs, {machine.get('backing', '')} backing)")
        chart_error = chart(results, kms, systems, a.png, title)
        if chart_error:
            out.append(f"(no chart: {chart_error})")
        else:
            out.append(f"![chart]({os.path.basename(a.png)})")
        out.append("")
    out.append("## Results\n")
    targets_table(results, kms, systems, out)
    fs_tables(results, systems, out)
    kms_table(kms, results, out)

    out.append("Units: MB/s = 10^6 bytes per second; times in seconds (wall clock); p50/p99 = latency "
               "percentiles of single calls. Sequential: `dd bs=1M` of zeros with `conv=fsync`, read back with "
               "`dd` after `drop_caches` and a remount. Random: fio, psync, 4 KiB, O_DIRECT, queue depth 1. "
               "Untar, ls -lR, read-all (`find -type f -exec cat {} +`), rm -rf and git each start on a "
               "freshly mounted filesystem after `drop_caches`; untar and rm -rf include `sync -f`.")
    out.append("")
    if notes:
        out.append("## Notes from the run\n")
        for n in notes:
            out.append(f"- {n}")
        out.append("")

    with open(a.md, "w") as f:
        f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
