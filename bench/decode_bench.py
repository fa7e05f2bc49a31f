"""Single-stream decode and 128-token prefill: Lanner fp32/int8/int4 vs llama.cpp Q8_0/Q4_0, same weights, same run.

    python bench/decode_bench.py                                   # TinyLlama-1.1B shape, all five engines
    python bench/decode_bench.py --model falcon-7b-layout --falcon-layers 2
    python bench/decode_bench.py --engines lanner-int8,llama.cpp-q8_0 --decode-tokens 64 --no-profile

What runs
---------
The bench model (bench/make_models.py, built if missing) is converted once to GGUF by the converter in
llama-cpp-python's sdist, then quantized to Q8_0 and Q4_0 by llama.cpp's own quantizer
(bench/gguf_convert.py). Every engine then runs in its own fresh subprocess, one after the other, so its
peak RSS is that process's VmHWM (/proc/self/status) and nothing else runs in it:

* Lanner: `load_runner(..., quantize=none|int8|int4)`, one KV slot; greedy decoding through
  `BatchedRunner.step` (argmax of the returned logits).
* llama.cpp: `llama_cpp.Llama(n_threads=T, n_threads_batch=T, n_batch=512)` with `Llama.eval` (one
  `llama_decode` per call), greedy = argmax of `llama_get_logits_ith(ctx, -1)`. Q8_0 and Q4_0 are the
  targets; `llama.cpp-f32` (the unquantized GGUF) checks that both engines compute the same model: its
  greedy tokens should equal Lanner fp32's.

Both get the same token ids (a prompt of `--prompt-tokens` ids from the model's tokenizer; no BOS, no
text). In each process: load, warm-up (one prefill + `--warmup-tokens` decode steps, not counted),
`--prefill-reps` timed prefills of the whole prompt as one step (median reported; the KV cache is cleared
in between), then `--decode-tokens` greedy decode steps after the last prefill, each timed alone
(`time.perf_counter` around step + argmax). decode tok/s = tokens / sum of their step times.

`lanner-int4-g64` is int4 with groups of 64 (`int4_group_size: 64`): 4.19 bits per weight, where the
default group of 32 stores 4.375 and llama.cpp's Q4_0 4.5 (Lanner keeps an 8-bit scale code and a 4-bit
zero point per group, Q4_0 an fp16 scale). `lanner-int4-h4` (on request: `--engines ...,lanner-int4-h4`)
is int4 with an int4 output head (`int4_head: int4`), where the default keeps the head int8 and llama.cpp's
Q4_0 files keep it at 6 bits (Q6_K).

Accuracy: after the timing, each engine gets a fresh sequence, the prompt, then `--accuracy-tokens` fixed
tokens fed one by one, and saves the logits after each (1 + that many rows).  Every engine sees the same
inputs, so the rows compare one to one; the report gives each engine's cosine similarity and top-1
agreement against both fp32 references (lanner-fp32 and llama.cpp-f32, which should agree with each other
to ~1e-6).  This puts Lanner's int8/int4 error next to llama.cpp's Q8_0/Q4_0 error on the very same
weights.

Memory: VmHWM (peak RSS over the process's life: imports, loading/quantizing, running), and VmRSS /
RssAnon / RssFile after loading and at the end. "weight bytes" is what the engine holds as model weights:
Lanner, the unique storages of the decoder's parameters and buffers (quantized Linear buffers, the
embedding -- int8 when quantized, none of its own when tied to an int8 head -- and norms; KV cache not
included); llama.cpp, `llama_model_size` (all tensors of the GGUF).

Profile (`--profile`, default on): in the Lanner int8 and int4 processes, after the measurement,
`torch.profiler` records one prefill and `--profile-steps` decode steps, and the markdown gets where the
time goes (WOQ matmuls, fp32 matmuls, attention, casts, everything else, time outside ATen ops), plus the
largest ops.

Interleaved (`--interleave N`, after the rounds): the VM's speed drifts by 10-25% over minutes, so two
engines run one after the other can land in different phases.  Here each target pair runs with both
engines loaded (two processes), decoding N chunks of `--chunk-tokens` steps in turns (a b b a a b ...),
only one computing at a time; each chunk pair's ratio compares runs seconds apart (`interleaved`).
With `--baseline-root DIR` each Lanner engine also runs interleaved against itself from another checkout
(`<engine>@base`), e.g. a worktree of the commit before a change: the change's effect within one run.

Output: `<results-dir>/decode-<model>.{json,md,png}` with machine info (bench/loadgen.py), every setting,
each engine's numbers and token ids, and ratios against llama.cpp in the same run:
int8 vs Q8_0, int4 vs Q4_0 (and fp32 vs Q8_0 for scale).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
for p in (str(REPO_ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

ENGINES = ("lanner-fp32", "lanner-int8", "lanner-int4", "lanner-int4-g64", "llama.cpp-q8_0", "llama.cpp-q4_0",
           "llama.cpp-f32")
OPTIONAL_ENGINES = ("lanner-int4-h4", "lanner-lite-int8", "lanner-lite-int4")  # int4 with an int4 output head (`int4_head: int4`); on request only
PAIRS = (("lanner-int8", "llama.cpp-q8_0"), ("lanner-int4", "llama.cpp-q4_0"), ("lanner-int4-g64", "llama.cpp-q4_0"),
         ("lanner-int4-h4", "llama.cpp-q4_0"), ("lanner-int4-h4", "lanner-int4"), ("lanner-fp32", "llama.cpp-q8_0"),
         ("lanner-lite-int8", "llama.cpp-q8_0"), ("lanner-lite-int4", "llama.cpp-q4_0"))
# the targets: decode tok/s ratio at least, prefill ratio at most, RSS / weight bytes at most
TARGETS = {"lanner-int8": {"decode_vs": 0.95}, "lanner-int4": {"decode_vs": 1.0}, "lanner-int4-g64": {"decode_vs": 1.0},
           "lanner-int4-h4": {"decode_vs": 1.0}, "lanner-lite-int8": {"decode_vs": 0.95},
           "lanner-lite-int4": {"decode_vs": 1.0}}


def decode_target(ours: str, theirs: str) -> float | None:
    """The issue's decode ratio for a pair; None for an A/B of two Lanner engines (no target there)."""
    return TARGETS.get(ours, {}).get("decode_vs") if theirs.startswith("llama.cpp") else None


BASE = "@base"  # an engine name's suffix: the same engine run from --baseline-root's code (interleaved only)
ACCURACY_REFS = ("lanner-fp32", "llama.cpp-f32")  # logits compared with these (same weights, fp32)
PREFILL_TARGET = 1.0
RSS_TARGET = 1.15


# =========================================================================== child side


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _timed_decode(step, first_token: int, n: int) -> tuple[list[float], list[int]]:
    """Run `n` greedy steps from `first_token`; step(tok) -> next token. Per-step seconds and tokens fed."""
    times, fed = [], []
    tok = first_token
    for _ in range(n):
        fed.append(tok)
        t0 = time.perf_counter()
        tok = step(tok)
        times.append(time.perf_counter() - t0)
    fed.append(tok)
    return times, fed


CHUNK_MARK = "@chunk "  # the line prefix of a chunk's step times on an interleaved child's stdout


def serve_chunks(step, tok: int) -> dict[str, Any]:
    """An interleaved child (--interleave): after loading, warm-up and the prefills, decode the chunks the
    parent asks for on stdin (a line with a token count; "quit" ends), continuing one greedy sequence, and
    answer each with a CHUNK_MARK line of the per-step seconds.  The process idles (blocked on stdin) while
    the other engine runs."""
    print("@ready", flush=True)
    chunks = 0
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        times, fed = _timed_decode(step, tok, int(line))
        tok = fed[-1]
        chunks += 1
        print(CHUNK_MARK + json.dumps(times), flush=True)
    return {"chunks": chunks}


def accuracy_tokens(prompt: list[int], n: int) -> list[int]:
    """The fixed continuation every engine is fed, token by token, after the prompt for the logit check."""
    return [prompt[(7 * i + 3) % len(prompt)] for i in range(n)]


def save_logits(path: str | None, rows: list[Any]) -> None:
    if path:
        import numpy as np

        np.save(path, np.stack([np.asarray(r, dtype=np.float32) for r in rows]))


WORKER_INFO = ("import pickle, sys; from pathlib import Path; from app.models.loader import inspect_model_dir; "
               "sys.stdout.buffer.write(pickle.dumps(inspect_model_dir(Path(sys.argv[1])).for_worker()))")


def worker_model_info(model_dir: Path) -> Any:
    """The ModelInfo a server's worker gets from its API process (`ModelInfo.for_worker`: the config read
    with transformers there, handed over as plain values), so that this process, like a worker, never
    imports transformers. Read in a separate process, as the API process does; a checkout from before the
    hand-over reads the config in this process."""
    from app.models.loader import ModelInfo, inspect_model_dir

    if not hasattr(ModelInfo, "for_worker"):
        return inspect_model_dir(model_dir)
    root = Path(sys.modules["app"].__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", WORKER_INFO, str(model_dir)], capture_output=True, check=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    return pickle.loads(done.stdout)


def lite_checkpoint(model_dir: Path, mode: str) -> Path:
    """The pre-quantized copy of the bench model that the lite engines serve (`lanner quantize`, made once)."""
    return model_dir.parent / f"{model_dir.name}-lanner-{mode}"


def ensure_lite_checkpoint(model_dir: Path, mode: str, root: Path) -> Path:
    """The lite engines' checkpoint, (re)written when missing, older than the model's weights (a rebuilt bench
    model) or written by another Lanner checkpoint format."""
    import shutil

    out = lite_checkpoint(model_dir, mode)
    manifest = out / "lanner_quant.json"
    if manifest.is_file():
        weights = max(f.stat().st_mtime for f in model_dir.glob("*.safetensors"))
        fmt = json.loads(manifest.read_text()).get("format", {})
        sys.path.insert(0, str(root))
        from app.quant.manifest import FORMAT_HASH

        if manifest.stat().st_mtime < weights or fmt.get("hash") != FORMAT_HASH:
            shutil.rmtree(out)
    if not manifest.is_file():
        print(f"quantizing {model_dir.name} to {out} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "app", "quantize", str(model_dir), "--bits", mode.removeprefix("int"),
                        "--out", str(out)], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    return out


def load_lite(args: argparse.Namespace, mode: str, max_len: int) -> tuple[Any, int, int]:
    """A lanner-lite engine: the pre-quantized checkpoint on the torch-free runner (this process never imports
    torch), its weight bytes and KV cache bytes."""
    from app.lite.runner import load_lite_runner

    info = worker_model_info(lite_checkpoint(Path(args.model_dir), mode))
    runner = load_lite_runner(info, max_model_len=max_len, max_num_seqs=1)
    return runner, runner.model.weight_nbytes, runner.kv.nbytes


def child_lanner(args: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    if args.lanner_root:  # import `app` from that checkout (e.g. a clean worktree of a commit)
        sys.path.insert(0, str(Path(args.lanner_root).resolve()))
    lite = args.child.startswith("lanner-lite-")
    if not lite:
        import torch

        torch.set_num_threads(args.threads)
    from app.models.base import StepInput

    mode, *variant = args.child.split("-", 1)[1].removeprefix("lite-").replace("fp32", "none").split("-")
    options = {v[0]: v[1:] for v in variant}  # g: int4 group size, h: bits of the output head (e.g. int4-g64)
    group = options.get("g")
    head = {"int4_head": "int4"} if options.get("h") == "4" else {}  # (a checkout from before the option)
    mem_imports = proc_status()
    t0 = time.perf_counter()
    max_len = len(prompt) + args.decode_tokens + args.warmup_tokens + 8
    if lite:
        runner, weight_bytes, kv_bytes = load_lite(args, mode, max_len)
        load_s = time.perf_counter() - t0
        mem_loaded = proc_status()
    else:
        from app.models.runner import load_runner

        info = worker_model_info(Path(args.model_dir))
        runner = load_runner(info, max_model_len=max_len, max_num_seqs=1, quantize=mode,
                             int4_group_size=int(group) if group else None, **head)
        load_s = time.perf_counter() - t0
        mem_loaded = proc_status()
        seen: set[int] = set()
        weight_bytes = 0
        for t in [*runner.model.parameters(), *runner.model.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                weight_bytes += t.untyped_storage().nbytes()
        kv_bytes = sum(t.numel() * t.element_size() for t in runner.kv.k + runner.kv.v)

    seq = [0]

    def prefill() -> int:
        seq[0] += 1
        logits = runner.step([StepInput(seq[0], list(prompt), 0)])
        return int(logits[-1].argmax())

    def make_step():
        pos = [len(prompt)]

        def step(tok: int) -> int:
            logits = runner.step([StepInput(seq[0], [tok], pos[0])])
            pos[0] += 1
            return int(logits[-1].argmax())
        return step

    # warm-up
    tok = prefill()
    _timed_decode(make_step(), tok, args.warmup_tokens)
    runner.free(seq[0])
    prefill_times = []
    for i in range(args.prefill_reps):
        t0 = time.perf_counter()
        tok = prefill()
        prefill_times.append(time.perf_counter() - t0)
        if i < args.prefill_reps - 1:
            runner.free(seq[0])
    if args.interleave_child:
        return serve_chunks(make_step(), tok)
    times, fed = _timed_decode(make_step(), tok, args.decode_tokens)
    result = {"load_s": load_s, "prefill_s": prefill_times, "decode_step_s": times, "tokens": fed,
              "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
              "quant": (f"{mode} pre-quantized checkpoint, torch-free runner (app/lite)" if lite
                        else runner.quant_report.summary()),
              "quant_linear_bytes": weight_bytes if lite else runner.quant_report.bytes_after,
              "kv_cache_dtype": "bf16" if lite else str(runner.kv.k[0].dtype).removeprefix("torch."),
              "threads": args.threads if lite else torch.get_num_threads(), "mem_after_imports": mem_imports,
              "mem_after_load": mem_loaded, "mem_end": proc_status()}
    # the logit check: a fresh sequence, the prompt, then the fixed continuation (every engine sees the
    # same inputs, so the logits are comparable row by row)
    runner.free(seq[0])
    seq[0] += 1
    rows = [runner.step([StepInput(seq[0], list(prompt), 0)])[-1]]  # torch or numpy rows: save_logits takes both
    for i, tok in enumerate(accuracy_tokens(prompt, args.accuracy_tokens)):
        rows.append(runner.step([StepInput(seq[0], [tok], len(prompt) + i)])[-1])
    save_logits(args.logits_out, rows)
    if args.profile and mode != "none" and not lite:  # (torch.profiler)
        runner.free(seq[0])
        out: list[int] = []
        # a fresh sequence: one profiled prefill, then decode steps at the measured positions
        result["profile_prefill"] = profile_calls(lambda: out.append(prefill()), 1)
        step = make_step()
        result["profile"] = profile_calls(lambda: _timed_decode(step, out[0], args.profile_steps),
                                          args.profile_steps)
        result["mem_end_incl_profile"] = proc_status()
    return result


# ops of the decode step, bucketed for the profile table (first match wins)
PROFILE_BUCKETS = (
    ("WOQ matmuls (Lanner's or ATen's int8/int4 kernels)",
     ("lanner::int8_mm", "lanner::int4_mm", "_weight_int8pack_mm", "_weight_int4pack_mm")),
    ("fp32 matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA, or Lanner's decode attention)",
     ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention", "lanner::decode_attention")),
    ("bf16/fp32 casts", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("argmax (sampling)", ("aten::argmax",)),
)


def profile_calls(work, n: int) -> dict[str, Any]:
    """torch.profiler over `work()` (n steps): self CPU time per op, bucketed; wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        work()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    buckets: dict[str, float] = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    buckets["other ops"] = 0.0
    for e in events:
        for name, keys in PROFILE_BUCKETS:
            if any(k in e.key for k in keys):
                buckets[name] += e.self_cpu_time_total / 1e6
                break
        else:
            buckets["other ops"] += e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"steps": n, "wall_s": wall, "ops_self_s": total_self,
            "buckets_s": buckets, "outside_ops_s": max(wall - total_self, 0.0),
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in top]}


def child_llamacpp(args: argparse.Namespace, prompt: list[int]) -> dict[str, Any]:
    import ctypes

    import numpy as np

    mem_imports_0 = proc_status()
    import llama_cpp

    mem_imports = proc_status()
    t0 = time.perf_counter()
    n_ctx = len(prompt) + args.decode_tokens + args.warmup_tokens + 8
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    mem_loaded = proc_status()
    n_vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def argmax_last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).argmax())

    def prefill() -> int:
        llm.reset()  # n_tokens = 0; eval() then drops the whole KV cache of the sequence
        llm.eval(prompt)
        return argmax_last()

    def step(tok: int) -> int:
        llm.eval([tok])
        return argmax_last()

    tok = prefill()
    _timed_decode(step, tok, args.warmup_tokens)
    prefill_times = []
    for _ in range(args.prefill_reps):
        t0 = time.perf_counter()
        tok = prefill()
        prefill_times.append(time.perf_counter() - t0)
    if args.interleave_child:
        return serve_chunks(step, tok)
    times, fed = _timed_decode(step, tok, args.decode_tokens)
    mem_end = proc_status()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()

    prefill()  # the logit check (see child_lanner)
    rows = [last_logits()]
    for tok in accuracy_tokens(prompt, args.accuracy_tokens):
        llm.eval([tok])
        rows.append(last_logits())
    save_logits(args.logits_out, rows)
    return {"load_s": load_s, "prefill_s": prefill_times, "decode_step_s": times, "tokens": fed,
            "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
            "n_params": int(llama_cpp.llama_model_n_params(llm.model)),
            "gguf_file_bytes": Path(args.gguf).stat().st_size, "gguf": args.gguf,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
            "llama_cpp_python": llama_cpp.__version__, "threads": args.threads,
            "mem_before_import": mem_imports_0, "mem_after_imports": mem_imports,
            "mem_after_load": mem_loaded, "mem_end": mem_end}


def child_main(args: argparse.Namespace) -> int:
    prompt = json.loads(Path(args.prompt_file).read_text())
    result = child_lanner(args, prompt) if args.child.startswith("lanner") else child_llamacpp(args, prompt)
    if args.interleave_child:
        return 0
    result["engine"] = args.child
    if args.child.startswith("lanner"):
        import app

        result["app_path"] = str(Path(app.__file__).resolve().parent)
    result["pid"] = os.getpid()
    Path(args.child_out).write_text(json.dumps(result))
    return 0


# =========================================================================== parent side


def prompt_ids(model_dir: Path, n: int) -> list[int]:
    """`n` token ids of varied English text, from the model's own tokenizer (no special tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
             "under pale autumn light and every river remembers the sound of distant mountains").split()
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tok.encode(" ".join(words[(i + k * 7) % len(words)] for k in range(len(words))),
                          add_special_tokens=False).ids
        i += 1
    return ids[:n]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    steps = raw["decode_step_s"]
    ms = sorted(s * 1000 for s in steps)
    mem = raw["mem_end"]
    peak = mem["VmHWM"]  # taken before the (optional) profile, which runs after the measurement
    return {
        "decode_tok_s": len(steps) / sum(steps),
        "ms_per_token_p50": statistics.median(ms),
        "ms_per_token_p90": ms[int(0.9 * (len(ms) - 1))],
        "prefill_s": statistics.median(raw["prefill_s"]),
        "prefill_s_min": min(raw["prefill_s"]),
        "load_s": raw["load_s"],
        "peak_rss_bytes": peak,
        "rss_after_load_bytes": raw["mem_after_load"]["VmRSS"],
        "rss_end_bytes": mem["VmRSS"],
        "rss_anon_end_bytes": mem.get("RssAnon"),
        "rss_file_end_bytes": mem.get("RssFile"),
        "rss_after_imports_bytes": raw["mem_after_imports"]["VmRSS"],
        "weight_bytes": raw["weight_bytes"],
        "peak_rss_over_weights": peak / raw["weight_bytes"],
        "rss_end_over_weights": mem["VmRSS"] / raw["weight_bytes"],
    }


def child_cmd(engine: str, args: argparse.Namespace, prompt_file: Path, gguf: Path | None, out: Path,
              decode_tokens: int) -> list[str]:
    root, script = args.lanner_root, Path(__file__)
    if engine.endswith(BASE):  # the baseline's own child code, which knows how to build its own app
        engine, root = engine.removesuffix(BASE), args.baseline_root
        own = Path(root) / "bench" / "decode_bench.py"
        script = own if own.is_file() else script
    cmd = [sys.executable, str(script), "--child", engine, "--child-out", str(out), "--prompt-file", str(prompt_file),
           "--model-dir", str(args.model_dir), "--threads", str(args.threads),
           "--decode-tokens", str(decode_tokens), "--warmup-tokens", str(args.warmup_tokens),
           "--prefill-reps", str(args.prefill_reps), "--profile-steps", str(args.profile_steps),
           "--accuracy-tokens", str(args.accuracy_tokens), "--logits-out", str(args.logits_dir / f"{engine}.npy")]
    if root:
        cmd += ["--lanner-root", str(root)]
    if gguf:
        cmd += ["--gguf", str(gguf)]
    return cmd + ["--profile" if args.profile else "--no-profile"]  # the child's own default is to profile


def child_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads))


def run_child(engine: str, args: argparse.Namespace, prompt_file: Path, gguf: Path | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = child_cmd(engine, args, prompt_file, gguf, out, args.decode_tokens)
    print(f"[{time.strftime('%H:%M:%S')}] {engine} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env(args))
    raw = json.loads(out.read_text())
    out.unlink()
    raw["summary"] = summarize(raw)
    s = raw["summary"]
    print(f"[{time.strftime('%H:%M:%S')}] {engine}: {s['decode_tok_s']:.2f} tok/s, p50 {s['ms_per_token_p50']:.1f} ms, "
          f"prefill {s['prefill_s']:.3f} s, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB, weights "
          f"{s['weight_bytes'] / 2**20:.0f} MiB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return raw


def extra_rounds(args: argparse.Namespace, engines: list[str], first: dict[str, Any], prompt_file: Path,
                 ggufs: dict[str, Path]) -> dict[str, Any] | None:
    """With --rounds N > 1: the engines of the decode pairs run N - 1 more times, one after the other as in
    the first round (no profile), and each pair's decode ratio is taken within each round.  On a noisy VM
    the spread of these same-round ratios says how far one round can be trusted."""
    paired = [e for e in engines if any(e in pair for pair in PAIRS if pair[0] != "lanner-fp32")]
    if args.rounds <= 1 or not paired:
        return None
    tok_s = [{e: first[e]["summary"]["decode_tok_s"] for e in paired}]
    quiet = argparse.Namespace(**{**vars(args), "profile": False})
    with tempfile.TemporaryDirectory() as scratch:
        quiet.logits_dir = Path(scratch)
        for r in range(1, args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            runs = {e: run_child(e, quiet, prompt_file, ggufs.get(e.split("-", 1)[1])) for e in paired}
            tok_s.append({e: raw["summary"]["decode_tok_s"] for e, raw in runs.items()})
    pair_ratios = {f"{a} vs {b}": [t[a] / t[b] for t in tok_s] for a, b in PAIRS if a in paired and b in paired}
    return {"decode_tok_s": tok_s, "decode_ratios": pair_ratios}


def _read_marked(proc: subprocess.Popen, mark: str, engine: str) -> str:
    """The rest of the next line of `proc`'s stdout that starts with `mark` (other lines are echoed)."""
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith(mark):
            return line[len(mark):]
        sys.stderr.write(f"[{engine}] {line}")
    raise RuntimeError(f"{engine} exited (status {proc.wait()}) before printing {mark.strip()!r}")


def interleaved(args: argparse.Namespace, engines: list[str], prompt_file: Path,
                ggufs: dict[str, Path]) -> dict[str, Any] | None:
    """With --interleave N: each decode pair with a target runs with both engines loaded at once (each in its
    own process, loaded one after the other, warmed up and prefilled as in the main run), then decoding in
    turns: N chunks of --chunk-tokens greedy steps each, in ABBA order (a, b, b, a, a, ...) so neither
    engine always goes first.  Only one engine computes at a time; the other waits on its stdin.  A chunk
    pair's ratio compares two runs seconds apart, so a slow or fast phase of the VM (they last minutes)
    lands on both engines instead of on one round of one engine.  With --baseline-root, each Lanner engine
    also runs against itself from that checkout (`<engine>@base`): a change's effect within one run."""
    if args.interleave <= 0:
        return None
    out: dict[str, Any] = {}
    k = args.chunk_tokens
    # the targets' pairs (and A/Bs of two Lanner engines), then each Lanner engine against its baseline
    pairs = [(a, b) for a, b in PAIRS if a in engines and b in engines and a in TARGETS]
    if args.baseline_root:
        pairs += [(e, e + BASE) for e in engines if e.startswith("lanner-")]
    for a, b in pairs:
        print(f"[{time.strftime('%H:%M:%S')}] interleaved {a} / {b}: {args.interleave} chunks of {k} tokens",
              file=sys.stderr, flush=True)
        quiet = argparse.Namespace(**{**vars(args), "profile": False})
        procs: dict[str, subprocess.Popen] = {}
        times: dict[str, list[list[float]]] = {a: [], b: []}
        try:
            for e in (a, b):
                cmd = child_cmd(e, quiet, prompt_file, ggufs.get(e.split("-", 1)[1]), Path(os.devnull),
                                args.interleave * k) + ["--interleave-child"]
                procs[e] = subprocess.Popen(cmd, env=child_env(args), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, bufsize=1)
                _read_marked(procs[e], "@ready", e)
            for c in range(args.interleave):
                for e in ((a, b) if c % 2 == 0 else (b, a)):  # a b b a a b ...
                    procs[e].stdin.write(f"{k}\n")  # type: ignore[union-attr]
                    procs[e].stdin.flush()  # type: ignore[union-attr]
                    times[e].append(json.loads(_read_marked(procs[e], CHUNK_MARK, e)))
            for proc in procs.values():
                proc.stdin.write("quit\n")  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
                if proc.wait(timeout=120) != 0:
                    raise RuntimeError(f"an interleaved child exited with status {proc.returncode}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        ratios_ = [sum(tb) / sum(ta) for ta, tb in zip(times[a], times[b])]  # tok/s of a over b
        total = {e: sum(map(sum, times[e])) for e in (a, b)}
        out[f"{a} vs {b}"] = {"chunk_tokens": k, "chunks": args.interleave, "ratios": ratios_,
                              "ratio": total[b] / total[a], "median": statistics.median(ratios_),
                              "tok_s": {e: args.interleave * k / total[e] for e in (a, b)},
                              "chunk_tok_s": {e: [k / sum(t) for t in times[e]] for e in (a, b)},
                              "step_s": times, "target": decode_target(a, b)}
        r = out[f"{a} vs {b}"]
        print(f"[{time.strftime('%H:%M:%S')}] {a} vs {b}: {r['ratio']:.2f}x overall, chunk median "
              f"{r['median']:.2f}, range {min(ratios_):.2f}-{max(ratios_):.2f}", file=sys.stderr, flush=True)
    return out


def ratios(engines: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for ours, theirs in PAIRS:
        if ours not in engines or theirs not in engines:
            continue
        a, b = engines[ours]["summary"], engines[theirs]["summary"]
        out.append({"lanner": ours, "llama_cpp": theirs,
                    "decode": a["decode_tok_s"] / b["decode_tok_s"],
                    "prefill": a["prefill_s"] / b["prefill_s"],
                    "peak_rss": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                    "weights": a["weight_bytes"] / b["weight_bytes"],
                    "decode_target": decode_target(ours, theirs)})
    return out


def logit_accuracy(engines: list[str], logits_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per engine and fp32 reference (ACCURACY_REFS): cosine similarity of the logit rows of the same inputs
    (mean, min) and how often the engine's top-1 token is the reference's."""
    import numpy as np

    rows = {e: np.load(logits_dir / f"{e}.npy").astype(np.float64) for e in engines
            if (logits_dir / f"{e}.npy").exists()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for e, x in rows.items():
        for ref in ACCURACY_REFS:
            if ref not in rows or ref == e or rows[ref].shape != x.shape:
                continue
            y = rows[ref]
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            out.setdefault(e, {})[ref] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                                          "top1": float((x.argmax(1) == y.argmax(1)).mean()), "rows": len(cos)}
    return out


def agreement(engines: dict[str, Any], ref: str = "lanner-fp32") -> dict[str, int]:
    """How many leading generated tokens each engine shares with `ref` (same weights -> same greedy text)."""
    if ref not in engines:
        return {}
    base = engines[ref]["tokens"]
    out = {}
    for name, raw in engines.items():
        n = 0
        for a, b in zip(base, raw["tokens"]):
            if a != b:
                break
            n += 1
        out[name] = n
    return out


# --------------------------------------------------------------------------- report


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def profile_lines(name: str, what: str, prof: dict[str, Any]) -> list[str]:
    n = prof["steps"]
    lines = ["", f"### Where a `{name}` {what} goes (torch.profiler, {n} step(s), "
                 f"{prof['wall_s'] / n * 1000:.1f} ms/step under the profiler)", "",
             "| part | ms/step | share |", "|---|---|---|"]
    parts = list(prof["buckets_s"].items()) + [("outside ATen ops (Python, module calls, profiler)",
                                                 prof["outside_ops_s"])]
    for part, sec in parts:
        lines.append(f"| {part} | {sec / n * 1000:.2f} | {sec / prof['wall_s'] * 100:.0f}% |")
    lines += ["", "Largest ops by self time: " + ", ".join(
        f"`{o['op']}` {o['self_s'] / n * 1000:.2f} ms ({o['calls'] // n}/step)" for o in prof["top_ops"][:8])]
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, s, engines = result["machine"], result["settings"], result["engines"]
    isa = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.get("isa", {}).items())
    lines = [
        f"# Single-stream decode: Lanner vs llama.cpp — `{s['model']}`", "",
        f"- CPU: {m.get('cpu_model')} — {m.get('logical_cpus')} logical CPUs ({m.get('usable_cpus')} usable), {isa}",
        f"- RAM {m.get('mem_total_gib', 0):.1f} GiB; torch {m.get('torch')}, llama-cpp-python "
        f"{s.get('llama_cpp_python')}, python {m.get('python')}; git {m.get('git_commit')}; started {result['started_at']}",
        f"- prompt {s['prompt_tokens']} token ids (same ids for every engine), then {s['decode_tokens']} greedy "
        f"decode steps timed one by one; warm-up prefill + {s['warmup_tokens']} steps first; prefill = median of "
        f"{s['prefill_reps']}; {s['threads']} threads; each engine in its own fresh process, one after the other",
    ]
    if s.get("lanner_commit"):
        dirty = s.get("lanner_dirty_files") or []
        lines.append(f"- Lanner code: `app/` of {s['lanner_root']} at {s['lanner_commit'][:12]}"
                     + (f" with uncommitted changes in {len(dirty)} file(s) of app/" if dirty else " (clean)"))
    if s.get("baseline_root"):
        lines.append(f"- Baseline (`<engine>{BASE}`, interleaved only): `app/` of {s['baseline_root']} at "
                     f"{(s.get('baseline_commit') or '?')[:12]}")
    if s.get("note"):
        lines.append(f"- {s['note']}")
    llama_sys = next((e.get("system_info") for e in engines.values() if e.get("system_info")), None)
    if llama_sys:
        lines.append(f"- llama.cpp system info: `{llama_sys.strip()}`")
    lines += ["", "| engine | decode tok/s | ms/token p50 | ms/token p90 | "
                  f"prefill-{s['prompt_tokens']} s | peak RSS MiB | "
                  "RSS at end MiB | RSS after imports MiB | weight MiB | peak RSS / weights | "
                  "(end − imports) / weights | load s | leading tokens = lanner-fp32's |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    agree = result.get("agreement", {})
    for name, raw in engines.items():
        x = raw["summary"]
        lines.append(f"| {name} | {x['decode_tok_s']:.2f} | {x['ms_per_token_p50']:.1f} | {x['ms_per_token_p90']:.1f} | "
                     f"{x['prefill_s']:.3f} | {_mib(x['peak_rss_bytes'])} | {_mib(x['rss_end_bytes'])} | "
                     f"{_mib(x['rss_after_imports_bytes'])} | {_mib(x['weight_bytes'])} | "
                     f"{x['peak_rss_over_weights']:.2f} | "
                     f"{(x['rss_end_bytes'] - x['rss_after_imports_bytes']) / x['weight_bytes']:.2f} | "
                     f"{x['load_s']:.1f} | "
                     f"{agree.get(name, '—')}/{s['decode_tokens'] + 1} |")
    rs = result["ratios"]
    if rs:
        lines += ["", "Ratios, same run (Lanner / llama.cpp; decode: higher is better, prefill and RSS: lower):", "",
                  "| pair | decode × | target | prefill × | target ≤1.0 | peak RSS × | weight bytes × | "
                  "Lanner peak RSS / its weights | target ≤1.15 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            x = engines[r["lanner"]]["summary"]
            tgt = r["decode_target"]
            dec_t = f"≥{tgt:.2f} {_verdict(r['decode'] >= tgt)}" if tgt else "—"
            pre_t = _verdict(r["prefill"] <= PREFILL_TARGET) if tgt else "—"
            rss_t = _verdict(x["peak_rss_over_weights"] <= RSS_TARGET) if tgt else "—"
            lines.append(f"| {r['lanner']} vs {r['llama_cpp']} | {r['decode']:.2f} | {dec_t} | {r['prefill']:.2f} | "
                         f"{pre_t} | {r['peak_rss']:.2f} | {r['weights']:.2f} | {x['peak_rss_over_weights']:.2f} | {rss_t} |")
    rounds = result.get("rounds")
    if rounds:
        n = len(rounds["decode_tok_s"])
        lines += ["", f"Decode ratio in each of {n} rounds (every paired engine once per round, in the same order; "
                      "round 1 is the table above):", "",
                  "| pair | " + " | ".join(f"round {i + 1}" for i in range(n)) + " | median | target |",
                  "|---|" + "---|" * (n + 2)]
        for pair, rs in rounds["decode_ratios"].items():
            tgt = decode_target(*pair.split(" vs "))
            med = statistics.median(rs)
            verdict = (f"≥{tgt:.2f} {_verdict(med >= tgt)} (median; {sum(r >= tgt for r in rs)}/{n} rounds)"
                       if tgt else "—")
            lines.append(f"| {pair} | " + " | ".join(f"{r:.2f}" for r in rs) + f" | {med:.2f} | {verdict} |")
        lines += ["", "| engine | " + " | ".join(f"round {i + 1} tok/s" for i in range(n)) + " |",
                  "|---|" + "---|" * n]
        for e in rounds["decode_tok_s"][0]:
            lines.append(f"| {e} | " + " | ".join(f"{t[e]:.2f}" for t in rounds["decode_tok_s"]) + " |")
    inter = result.get("interleaved")
    if inter:
        first = next(iter(inter.values()))
        lines += ["", f"Interleaved decode: each pair with both engines loaded at once, {first['chunks']} chunks of "
                      f"{first['chunk_tokens']} greedy steps each, taken in turns (a b b a a b ...; only one engine "
                      "computes at a time), continuing one sequence per engine after the prompt. A chunk ratio "
                      "compares two runs seconds apart.", "",
                  "| pair | tok/s (Lanner, llama.cpp) | overall × | chunk median × | chunk min – max | "
                  "chunks ≥ target | target |", "|---|---|---|---|---|---|---|"]
        for pair, r in inter.items():
            a, b = pair.split(" vs ")
            rs, tgt = r["ratios"], r["target"]
            met = (f"{sum(x >= tgt for x in rs)}/{len(rs)} | ≥{tgt:.2f} {_verdict(r['ratio'] >= tgt)} (overall)"
                   if tgt else "— | — (an A/B of two Lanner engines)")
            lines.append(f"| {pair} | {r['tok_s'][a]:.2f}, {r['tok_s'][b]:.2f} | {r['ratio']:.2f} | "
                         f"{r['median']:.2f} | {min(rs):.2f} – {max(rs):.2f} | {met} |")
    acc = result.get("accuracy") or {}
    if acc:
        lines += ["", f"Logits on the same inputs (the prompt, then {s.get('accuracy_tokens')} fixed tokens fed one by "
                      "one: 1 + that many rows per engine), against each fp32 reference of these weights: cosine "
                      "similarity (mean, min) and top-1 agreement.", "",
                  "| engine | " + " | ".join(f"vs {r}: mean cos | min cos | top-1" for r in ACCURACY_REFS) + " |",
                  "|---|" + "---|---|---|" * len(ACCURACY_REFS)]
        for name, per_ref in acc.items():
            cells = []
            for ref in ACCURACY_REFS:
                a = per_ref.get(ref)
                cells.append(f"{a['mean_cos']:.4f} | {a['min_cos']:.4f} | {a['top1']:.2f}" if a else "— | — | —")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, raw in engines.items():
        for key, what in (("profile", "decode step"), ("profile_prefill", f"{s['prompt_tokens']}-token prefill")):
            if raw.get(key):
                lines += profile_lines(name, what, raw[key])
    lines += ["", "Leading tokens = lanner-fp32's: how many of the greedy tokens (the one after the prompt, then "
                  "each decoded one) equal Lanner fp32's before the first difference. llama.cpp-f32 runs the same "
                  "weights unquantized, so it shows whether both engines compute the same model; the quantized runs "
                  "part from it after a few tokens on these random-weight models (quantization error adds up over "
                  "the layers, see app/quant/woq.py on logit cosine), whichever engine quantizes."]
    lines += ["", "Weight bytes: Lanner = unique storages of the decoder's parameters and buffers (quantized Linear "
                  "buffers + embedding, int8 when quantized + norms); llama.cpp = `llama_model_size` (all GGUF tensors). "
                  "Peak RSS = VmHWM of the engine's own process (imports + load/quantize + run)."]
    for name, raw in engines.items():
        if raw.get("quant"):
            kv = f"; KV cache {raw['kv_cache_dtype']}" if raw.get("kv_cache_dtype") else ""
            lines.append(f"- {name}: {raw['quant']}{kv}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result["engines"]
    names = list(engines)
    colors = ["C0" if n.startswith("lanner") else "C1" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("decode_tok_s", "tokens/s", "single-stream decode (higher is better)", 1, "%.1f"),
              ("prefill_s", "s", f"prefill of {result['settings']['prompt_tokens']} tokens (lower is better)", 1,
               "%.3f"),
              ("peak_rss_bytes", "MiB", "peak RSS (bars) vs weight bytes (dots)", 2**20, "%.0f"))
    for ax, (key, unit, title, div, fmt) in zip(axes, panels):
        vals = [engines[n]["summary"][key] / div for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        if key == "peak_rss_bytes":
            ax.plot(range(len(names)), [engines[n]["summary"]["weight_bytes"] / div for n in names], "kD",
                    label="weight bytes")
            ax.plot(range(len(names)), [engines[n]["summary"]["weight_bytes"] * RSS_TARGET / div for n in names],
                    "r_", markersize=20, label=f"{RSS_TARGET}× weights")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Lanner vs llama.cpp, same weights, same run — {result['settings']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git(root: Path, *cmd: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def parent_main(args: argparse.Namespace) -> int:
    import importlib.metadata

    from gguf_convert import GGUF_CACHE, ensure_ggufs
    from loadgen import machine_info
    from make_models import DEFAULT_OUT, ensure_model

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES) - set(OPTIONAL_ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES + OPTIONAL_ENGINES)}")
    if args.model_dir is None:
        model_dir, built = ensure_model(args.model, args.models_dir or DEFAULT_OUT, falcon_layers=args.falcon_layers)
        if built:
            print(f"built {model_dir}", file=sys.stderr)
    else:
        model_dir = Path(args.model_dir).expanduser()
    args.model_dir = model_dir
    for e in engines:
        if e.startswith("lanner-lite-"):
            ensure_lite_checkpoint(model_dir, e.removeprefix("lanner-lite-"), Path(args.lanner_root or REPO_ROOT))
    quant = [e.split("-", 1)[1] for e in engines if e.startswith("llama.cpp")]
    ggufs = ensure_ggufs(model_dir, quant, args.gguf_dir or GGUF_CACHE) if quant else {}
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    prompt = prompt_ids(model_dir, args.prompt_tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(prompt, fh)
        prompt_file = Path(fh.name)
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as logits_dir:
        args.logits_dir = Path(logits_dir)
        try:
            for e in engines:
                results[e] = run_child(e, args, prompt_file, ggufs.get(e.split("-", 1)[1]))
            accuracy = logit_accuracy(engines, args.logits_dir)
            rounds = extra_rounds(args, engines, results, prompt_file, ggufs)
            inter = interleaved(args, engines, prompt_file, ggufs)
        finally:
            prompt_file.unlink(missing_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    lanner_root = Path(args.lanner_root or REPO_ROOT).resolve()
    result = {
        "started_at": started, "machine": machine_info(),
        "settings": {"model": model_dir.name, "model_dir": str(model_dir), "prompt_tokens": args.prompt_tokens,
                     "decode_tokens": args.decode_tokens, "warmup_tokens": args.warmup_tokens,
                     "prefill_reps": args.prefill_reps, "threads": args.threads, "llama_cpp_python": version,
                     "accuracy_tokens": args.accuracy_tokens,
                     "num_layers": cfg.get("num_hidden_layers"), "note": args.note,
                     "lanner_root": str(lanner_root), "lanner_commit": _git(lanner_root, "rev-parse", "HEAD"),
                     "lanner_dirty_files": _git(lanner_root, "status", "--porcelain", "--", "app").splitlines(),
                     "baseline_root": str(args.baseline_root) if args.baseline_root else None,
                     "baseline_commit": _git(Path(args.baseline_root), "rev-parse", "HEAD") if args.baseline_root
                     else None,
                     "ggufs": {k: str(v) for k, v in ggufs.items()}},
        "engines": results, "ratios": ratios(results), "agreement": agreement(results), "accuracy": accuracy,
        "rounds": rounds, "interleaved": inter,
    }
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{model_dir.name}"  # not Path.with_suffix: "tinyllama-1.1b" has a dot
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    plot(result, out_dir / f"{stem}.png")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md,png}}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b", help="bench model name (bench/make_models.py)")
    parser.add_argument("--falcon-layers", type=int, default=8, help="layers of falcon-7b-layout (make_models)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where bench models are built (default ~/.cache/lanner/bench-models)")
    parser.add_argument("--model-dir", type=Path, default=None, help="any Llama/Falcon HF directory instead")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--prefill-reps", type=int, default=3)
    parser.add_argument("--accuracy-tokens", type=int, default=32,
                        help="fixed tokens fed after the prompt for the logit check (rows = 1 + this)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.profiler of the Lanner int8/int4 decode step (after the measurement)")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the paired engines this many times in all and report each round's decode ratios "
                             "(the VM's noise moves single runs by 10-25%%)")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="after the rounds, run each target pair with both engines loaded, decoding N chunks "
                             "each in turns (ABBA): ratios of chunks seconds apart, immune to the VM's slow phases")
    parser.add_argument("--chunk-tokens", type=int, default=16, help="decode steps per interleaved chunk")
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help="with --interleave: also run each Lanner engine against the same engine from this "
                             "checkout (e.g. a worktree of the commit before a change), interleaved")
    parser.add_argument("--gguf-dir", type=Path, default=None, help="GGUF cache (default ~/.cache/lanner/gguf)")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results" / "decode")
    parser.add_argument("--note", default="", help="a line for the report (e.g. what else ran)")
    parser.add_argument("--lanner-root", type=Path, default=None,
                        help="checkout whose `app` package the Lanner runs import (default: this repo), e.g. "
                             "`git worktree add /tmp/lanner-head HEAD` to measure a commit, not a working tree")
    # child-process arguments
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--interleave-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.profile_steps > args.decode_tokens:
        parser.error("--profile-steps must be at most --decode-tokens")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
