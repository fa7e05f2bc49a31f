"""Markdown tables and PNG charts from load-run result JSONs (as written by `loadgen.py`).

A result is a dict with `name`, `settings`, `machine` and `levels` (a list of `LevelSummary` dicts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.1f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def levels_by_concurrency(result: Result) -> dict[int, dict[str, Any]]:
    return {lv["concurrency"]: lv for lv in result["levels"]}


def machine_lines(result: Result) -> list[str]:
    m = result.get("machine", {})
    s = result.get("settings", {})
    isa = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.get("isa", {}).items())
    return [
        f"- CPU: {m.get('cpu_model', '?')} — {m.get('logical_cpus', '?')} logical CPUs "
        f"({m.get('usable_cpus', '?')} usable), {isa}",
        f"- RAM: {_num(m.get('mem_total_gib'), '.1f')} GiB; torch {m.get('torch', '?')}, "
        f"transformers {m.get('transformers', '?')}, python {m.get('python', '?')}",
        f"- git: {m.get('git_commit', '?')}; started {result.get('started_at', '?')}",
        f"- model `{s.get('model', '?')}` at {s.get('base_url', '?')}; prompt ~{s.get('prompt_tokens', '?')} "
        f"tokens, max_tokens {s.get('max_tokens', '?')}, ignore_eos {s.get('ignore_eos', '?')}, "
        f"{s.get('mode', '?')}" + (f", clients arriving over {s['ramp_s']:g} s" if s.get("ramp_s") else
                                   ", all clients starting at once"),
    ]


def level_table(result: Result, compare: Result | None = None) -> str:
    """One row per concurrency level; with `compare`, ratio columns (this / compare) at shared levels."""
    other = levels_by_concurrency(compare) if compare else {}
    head = ["conc", "reqs", "errors", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
            "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "TPOT p50 ms", "e2e p50 s", "e2e p99 s",
            "/health p50 ms", "/health p99 ms"]
    if compare:
        head += ["tok/s ×", "TTFT p50 ×", "TPOT p50 ×"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in result["levels"]:
        cells = [str(lv["concurrency"]), str(lv["num_requests"]), str(lv["num_errors"]),
                 _num(lv["output_tokens_per_s"], ".1f"), _num(lv["requests_per_s"], ".2f"),
                 _ms(lv["ttft_s"]["p50"]), _ms(lv["ttft_s"]["p90"]), _ms(lv["ttft_s"]["p99"]),
                 _ms(lv["itl_s"]["p50"]), _ms(lv["itl_s"]["p90"]), _ms(lv["itl_s"]["p99"]),
                 _ms(lv["tpot_s"]["p50"]), _num(lv["e2e_s"]["p50"]), _num(lv["e2e_s"]["p99"]),
                 _ms(lv["health_s"]["p50"]), _ms(lv["health_s"]["p99"])]
        if compare:
            o = other.get(lv["concurrency"])
            cells += [_num(ratio(lv["output_tokens_per_s"], o and o["output_tokens_per_s"])),
                      _num(ratio(lv["ttft_s"]["p50"], o and o["ttft_s"]["p50"])),
                      _num(ratio(lv["tpot_s"]["p50"], o and o["tpot_s"]["p50"]))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def result_markdown(result: Result, compare: Result | None = None) -> str:
    parts = [f"# Load run: {result['name']}", "", *machine_lines(result), "", level_table(result, compare)]
    if compare:
        parts += ["", f"Ratio columns: this run / `{compare['name']}` at the same concurrency "
                      "(tok/s: higher is better; TTFT, TPOT: lower is better)."]
    errors = [f"- c={lv['concurrency']}: {e}" for lv in result["levels"] for e in lv["errors"]]
    if errors:
        parts += ["", "Errors (first distinct messages per level):", *errors]
    return "\n".join(parts) + "\n"


def _tok_s(result: Result, concurrency: int) -> float | None:
    lv = levels_by_concurrency(result).get(concurrency)
    return lv["output_tokens_per_s"] if lv else None


def comparison_markdown(primary: Result, baseline: Result, focus: int = 16) -> str:
    """Headline ratios plus a side-by-side table over the union of concurrency levels."""
    p_levels, b_levels = levels_by_concurrency(primary), levels_by_concurrency(baseline)
    if focus not in p_levels:
        focus = max(p_levels)
    b_focus = focus if focus in b_levels else max(b_levels)
    p1 = _tok_s(primary, min(p_levels))
    lines = [
        f"# {primary['name']} vs {baseline['name']}", "", *machine_lines(primary), "",
        f"- {primary['name']} at {focus} streams vs {min(p_levels)} stream: "
        f"{_num(_tok_s(primary, focus), '.1f')} vs {_num(p1, '.1f')} tok/s = "
        f"**{_num(ratio(_tok_s(primary, focus), p1))}×**",
        f"- {primary['name']} at {focus} streams vs {baseline['name']} at {b_focus}: "
        f"{_num(_tok_s(primary, focus), '.1f')} vs {_num(_tok_s(baseline, b_focus), '.1f')} tok/s = "
        f"**{_num(ratio(_tok_s(primary, focus), _tok_s(baseline, b_focus)))}×**",
        "",
    ]
    p, b = primary["name"], baseline["name"]
    head = ["conc", f"{p} tok/s", f"{b} tok/s", "tok/s ×", f"{p} TTFT p50 ms", f"{b} TTFT p50 ms",
            f"{p} TTFT p99 ms", f"{b} TTFT p99 ms", f"{p} TPOT p50 ms", f"{b} TPOT p50 ms",
            f"{p} /health p99 ms", "errors"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(set(p_levels) | set(b_levels)):
        pl, bl = p_levels.get(c), b_levels.get(c)

        def get(lv: dict[str, Any] | None, key: str, q: str | None = None) -> float | None:
            if lv is None:
                return None
            return lv[key][q] if q else lv[key]

        lines.append("| " + " | ".join([
            str(c), _num(get(pl, "output_tokens_per_s"), ".1f"), _num(get(bl, "output_tokens_per_s"), ".1f"),
            _num(ratio(get(pl, "output_tokens_per_s"), get(bl, "output_tokens_per_s"))),
            _ms(get(pl, "ttft_s", "p50")), _ms(get(bl, "ttft_s", "p50")),
            _ms(get(pl, "ttft_s", "p99")), _ms(get(bl, "ttft_s", "p99")),
            _ms(get(pl, "tpot_s", "p50")), _ms(get(bl, "tpot_s", "p50")),
            _ms(get(pl, "health_s", "p99")),
            f"{get(pl, 'num_errors') or 0}/{get(bl, 'num_errors') or 0}",
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Sequence[Result], path: Path, title: str | None = None) -> None:
    """Throughput, TTFT p50/p99 and ITL p50/p99 vs concurrency; one colour per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for i, result in enumerate(results):
        color = f"C{i}"
        levels = result["levels"]
        xs = [lv["concurrency"] for lv in levels]
        axes[0].plot(xs, [lv["output_tokens_per_s"] for lv in levels], "o-", color=color, label=result["name"])
        for ax, key in ((axes[1], "ttft_s"), (axes[2], "itl_s")):
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ys = [lv[key][q] * 1000 if lv[key][q] is not None else float("nan") for lv in levels]
                ax.plot(xs, ys, style, color=color, label=f"{result['name']} {q}")
    all_x = sorted({lv["concurrency"] for r in results for lv in r["levels"]})
    labels = (("output tokens/s", "throughput"), ("ms", "time to first token"), ("ms", "inter-token latency"))
    for ax, (ylabel, name) in zip(axes, labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_x, [str(x) for x in all_x])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
