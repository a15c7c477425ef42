"""Markdown tables from pytest-benchmark JSON files written by the memcore benchmarks.

    pytest tests/bench --benchmark-only --benchmark-json bench.json
    python tests/bench/summarize.py bench.json [more.json ...]

One table per benchmark group: each entry's op and provider (``extra_info``), median and IQR in ms,
rounds, speed-up over the same op's ``reference`` provider in the group, the device-only time
(``kernel_ms``, and its speed-up over the reference's) where recorded, GB/s where recorded, and
the overhead over the group's baseline entry (``extra_info["baseline"]``): ``event_overhead_pct``
(paired device-timed rounds) or ``overhead_pct`` where the benchmark recorded it, else computed from
the medians (an entry marked ``adds_to_baseline`` runs in addition to the baseline, so its overhead
is its whole time; any other replaces the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.3g}"


def _label(bench: dict, single_op: bool) -> str:
    info = bench.get("extra_info", {})
    op, provider = info.get("op"), info.get("provider")
    if op is None or provider is None:
        return bench["name"]
    return provider if single_op else f"{op} / {provider}"


def _overhead(bench: dict, baseline: dict | None) -> str:
    info = bench.get("extra_info", {})
    if info.get("baseline"):
        return "baseline"
    if "event_overhead_pct" in info:
        pct = info["event_overhead_pct"]
    elif baseline is not None:
        ratio = bench["stats"]["median"] / baseline["stats"]["median"]
        pct = 100 * ratio if info.get("adds_to_baseline") else 100 * (ratio - 1)
    elif "overhead_pct" in info:
        pct = info["overhead_pct"]
    else:
        return "-"
    return f"{pct:+.1f}%"


def table(group: str, benches: list[dict]) -> str:
    infos = [b.get("extra_info", {}) for b in benches]
    single_op = len({i.get("op") for i in infos}) == 1
    reference = {i.get("op"): b["stats"]["median"] for b, i in zip(benches, infos) if i.get("provider") == "reference"}
    baseline = next((b for b, i in zip(benches, infos) if i.get("baseline")), None)
    kernel_ref = {i.get("op"): i["kernel_ms"] for i in infos if i.get("provider") == "reference" and "kernel_ms" in i}
    show_kernel = any("kernel_ms" in i for i in infos)
    show_gbps = any("gbps" in i for i in infos)
    show_overhead = baseline is not None or any("overhead_pct" in i for i in infos)

    header = ["provider" if single_op else "op / provider", "median (ms)", "IQR (ms)", "rounds", "vs reference"]
    header += ["kernel (ms)", "kernel vs reference"] * show_kernel + ["GB/s"] * show_gbps + ["overhead"] * show_overhead
    lines = [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench, info in zip(benches, infos):
        stats = bench["stats"]
        ref = reference.get(info.get("op"))
        speedup = f"{ref / stats['median']:.2f}x" if ref is not None else "-"
        row = [_label(bench, single_op), _ms(stats["median"]), _ms(stats["iqr"]), str(stats["rounds"]), speedup]
        if show_kernel:
            kernel = info.get("kernel_ms")
            kref = kernel_ref.get(info.get("op"))
            row.append("-" if kernel is None else _ms(kernel / 1e3))
            row.append(f"{kref / kernel:.2f}x" if kernel and kref is not None else "-")
        if show_gbps:
            row.append(f"{info['gbps']:.0f}" if "gbps" in info else "-")
        if show_overhead:
            row.append(_overhead(bench, baseline))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarize(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    devices = sorted({b.get("extra_info", {}).get("device", "?") for b in data["benchmarks"]})
    out = [f"## memcore benchmarks, {data.get('datetime', '?')}", "", f"device {', '.join(devices)}; CPU {cpu}; commit {commit}", ""]
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    for group, benches in groups.items():
        out += [table(group, benches), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    for path in args.json:
        with open(path, encoding="utf-8") as handle:
            print(summarize(json.load(handle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
