"""Multi-turn chat (or a burst of users sharing a system prompt) with and without prefix caching: time to
first token, same run.

A conversation of --turns turns (a long system prompt, then user messages of --user-words words, replies of
--reply-tokens tokens, greedy, streamed) is played --conversations times against Lanner serving the bench
model, first with `--no-prefix-caching` (the baseline: every turn prefills its whole conversation), then
with prefix caching (default: a turn continues from the previous turn's KV slot). Each conversation has its
own system prompt, so nothing is shared between conversations. The two servers never run at once.

Reported per turn: prompt tokens, cached tokens (`usage.prompt_tokens_details`), TTFT median of the
conversations for each mode, and the ratio off/on. With `--burst N`, each round is N users sending their
own question at once under one system prompt, and row k is the k-th user to get a first token. Writes
--out.{json,md,png}.

    python bench/prefix_cache.py --quantize int8                     # TinyLlama-1.1B shape (~5 min)
    python bench/prefix_cache.py --burst 4 --out bench/results/prefix-cache/burst   # shared system prompt
    python bench/prefix_cache.py --quick                             # demo-llama, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

from loadgen import machine_info  # noqa: E402
from run_load import DEFAULT_CACHE, REPO_ROOT, log, stop, wait_ready  # noqa: E402

WORDS = ("river stone garden window market letter engine silver forest question evening harbor "
         "pattern library morning bridge thunder candle island mirror").split()


def words(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + i * i) % len(WORDS)] for i in range(n))


def conversation(client: Any, model: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Play one conversation; per turn: prompt and cached tokens, TTFT and total seconds."""
    messages = [{"role": "system", "content": f"Conversation {seed}. " + words(args.system_words, seed)}]
    turns = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": words(args.user_words, seed * 100 + turn)})
        t0 = time.perf_counter()
        ttft, text, usage = None, [], None
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.reply_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None)
        turns.append({"turn": turn + 1, "prompt_tokens": usage.prompt_tokens,
                      "cached_tokens": getattr(details, "cached_tokens", 0) or 0,
                      "ttft_s": ttft, "total_s": time.perf_counter() - t0})
        messages.append({"role": "assistant", "content": "".join(text)})
    return turns


def burst(client: Any, model: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """--burst users at once, one shared system prompt, each their own question; per user: TTFT."""
    from concurrent.futures import ThreadPoolExecutor

    system = {"role": "system", "content": f"Shop {seed}. " + words(args.system_words, seed)}

    def one(user: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        ttft, usage = None, None
        stream = client.chat.completions.create(
            model=model, messages=[system, {"role": "user", "content": words(args.user_words, seed * 100 + user)}],
            max_tokens=args.reply_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None)
        return {"turn": user + 1, "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": getattr(details, "cached_tokens", 0) or 0, "ttft_s": ttft,
                "total_s": time.perf_counter() - t0}

    with ThreadPoolExecutor(args.burst) as pool:
        users = list(pool.map(one, range(args.burst)))
    return sorted(users, key=lambda u: u["ttft_s"])  # row k: the k-th user to get a first token


def run_mode(name: str, extra: list[str], model_dir: Path, args: argparse.Namespace) -> list[list[dict]]:
    from openai import OpenAI

    port = args.port
    cmd = [sys.executable, "-m", "app", "serve", "--model", str(model_dir), "--model-id", "bench",
           "--port", str(port), "--max-num-seqs", "4", *args.lanner_arg, *extra]
    log_path = args.out.parent / f"{args.out.name}-{name}-server.log"
    log(f"starting {name}: {' '.join(cmd)} (log: {log_path})")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}/ready", proc, args.ready_timeout)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
            play = burst if args.burst else conversation
            play(client, "bench", args, seed=10_000)  # warm-up (kernels, allocator), not reported
            return [play(client, "bench", args, seed) for seed in range(args.conversations)]
        finally:
            stop(proc)


def summarize_burst(runs: dict[str, list[list[dict]]]) -> list[dict[str, Any]]:
    """Per round: the users' prompt and cached tokens, and their mean and last TTFT in each mode."""
    rows = []
    for i, (off, on) in enumerate(zip(runs["off"], runs["on"])):
        row: dict[str, Any] = {"round": i + 1, "prompt_tokens": sum(u["prompt_tokens"] for u in on),
                               "cached_on": sum(u["cached_tokens"] for u in on)}
        for mode, users in (("off", off), ("on", on)):
            row[f"ttft_mean_{mode}_s"] = statistics.mean(u["ttft_s"] for u in users)
            row[f"ttft_last_{mode}_s"] = max(u["ttft_s"] for u in users)
        row["ttft_last_ratio_off_on"] = row["ttft_last_off_s"] / row["ttft_last_on_s"]
        rows.append(row)
    return rows


def summarize(runs: dict[str, list[list[dict]]]) -> list[dict[str, Any]]:
    rows = []
    for t in range(len(runs["off"][0])):
        row: dict[str, Any] = {"turn": t + 1,
                               "prompt_tokens": statistics.median(c[t]["prompt_tokens"] for c in runs["on"])}
        for mode, convs in runs.items():
            row[f"ttft_{mode}_s"] = statistics.median(c[t]["ttft_s"] for c in convs)
            row[f"cached_{mode}"] = statistics.median(c[t]["cached_tokens"] for c in convs)
        row["ttft_ratio_off_on"] = row["ttft_off_s"] / row["ttft_on_s"]
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    if result.get("burst"):
        lines = ["# Prefix caching on vs off: users sharing a system prompt", "",
                 f"CPU: {m['cpu_model']} ({m['usable_cpus']} usable); torch {m['torch']}; commit {m['git_commit']}.",
                 f"Model: {result['model']} ({' '.join(result['lanner_args'])}); {result['conversations']} rounds of "
                 f"{result['burst']} users sending their own question at once under one {result['system_words']}-word "
                 f"system prompt; replies of {result['reply_tokens']} tokens, greedy, streamed.", "",
                 "| round | prompt tokens (all users) | cached (on) | mean TTFT off | mean TTFT on | last TTFT off "
                 "| last TTFT on | last: off / on |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rounds_summary"]:
            lines.append(f"| {r['round']} | {r['prompt_tokens']} | {r['cached_on']} | {r['ttft_mean_off_s']:.2f} s "
                         f"| {r['ttft_mean_on_s']:.2f} s | {r['ttft_last_off_s']:.2f} s | {r['ttft_last_on_s']:.2f} s "
                         f"| {r['ttft_last_ratio_off_on']:.2f}x |")
        return "\n".join(lines) + "\n"
    what = (f"{result['burst']} users at once with one system prompt (row k: the k-th first token)"
            if result.get("burst") else f"{result['turns']} turns")
    lines = ["# Prefix caching on vs off: " + ("shared system prompt" if result.get("burst") else "multi-turn chat"), "",
             f"CPU: {m['cpu_model']} ({m['usable_cpus']} usable); torch {m['torch']}; commit {m['git_commit']}.",
             f"Model: {result['model']} ({' '.join(result['lanner_args']) or 'no extra args'}); "
             f"{result['conversations']} rounds of {what}, replies of "
             f"{result['reply_tokens']} tokens, greedy, streamed; TTFT, prompt and cached tokens = medians over the conversations.", "",
             f"| {'user' if result.get('burst') else 'turn'} | prompt tokens | cached (on) | TTFT off | TTFT on "
             "| off / on |", "|---|---|---|---|---|---|"]
    for r in result["turns_summary"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']:.0f} | {r['cached_on']:.0f} | {r['ttft_off_s'] * 1e3:.0f} ms "
                     f"| {r['ttft_on_s'] * 1e3:.0f} ms | {r['ttft_ratio_off_on']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["turns_summary"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if result.get("burst"):  # each user's TTFT, first to last, every round
        for mode in ("off", "on"):
            for i, users in enumerate(result["runs"][mode]):
                ax.plot(range(1, len(users) + 1), [u["ttft_s"] * 1e3 for u in users], "o-",
                        color="C0" if mode == "off" else "C1", alpha=0.8,
                        label=f"prefix caching {mode}" if i == 0 else None)
    else:
        turns = [r["turn"] for r in rows]
        ax.plot(turns, [r["ttft_off_s"] * 1e3 for r in rows], "o-", label="prefix caching off")
        ax.plot(turns, [r["ttft_on_s"] * 1e3 for r in rows], "o-", label="prefix caching on")
    ax.set_xlabel("k-th user to get a first token" if result.get("burst") else "turn")
    ax.set_ylabel("time to first token (ms)" if result.get("burst") else "time to first token (ms, median)")
    ax.set_title(f"{'Shared system prompt' if result.get('burst') else 'Multi-turn chat'}, {result['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="demo-llama, 2 conversations of 3 turns")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--bench-model", default="tinyllama-1.1b", choices=["tinyllama-1.1b", "falcon-7b-layout"])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--lanner-arg", action="append", default=[], help="extra `lanner serve` argument (repeatable)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="int8")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--burst", type=int, default=0,
                   help="instead of conversations: this many users at once sharing one system prompt")
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--user-words", type=int, default=40)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "prefix-cache" / "multi-turn")
    p.add_argument("--render", action="store_true", help="rewrite --out.{md,png} from --out.json")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["turns_summary"] = summarize(result["runs"])
        if result.get("burst"):
            result["rounds_summary"] = summarize_burst(result["runs"])
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))
        plot(result, args.out.with_suffix(".png"))
        print(markdown(result))
        return 0
    if args.quick:
        args.turns, args.conversations, args.system_words, args.reply_tokens = 3, 2, 60, 8
    if args.model_dir is None:
        if args.quick:
            sys.path.insert(0, str(REPO_ROOT))
            from app.models.demo import ensure_demo_models

            args.model_dir = ensure_demo_models(args.cache_dir / "bench-demo", progress=log)["demo-llama"]
        else:
            from make_models import ensure_model

            args.model_dir, _ = ensure_model(args.bench_model, args.cache_dir / "bench-models")
    args.lanner_arg = [*args.lanner_arg, f"--quantize={args.quantize}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {"off": run_mode("off", ["--no-prefix-caching"], args.model_dir, args),
            "on": run_mode("on", [], args.model_dir, args)}
    result = {"machine": machine_info(), "model": args.model_dir.name, "lanner_args": args.lanner_arg,
              "turns": args.turns, "burst": args.burst, "conversations": args.conversations,
              "reply_tokens": args.reply_tokens,
              "system_words": args.system_words, "user_words": args.user_words, "runs": runs,
              "turns_summary": summarize(runs)}
    if args.burst:
        result["rounds_summary"] = summarize_burst(runs)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
