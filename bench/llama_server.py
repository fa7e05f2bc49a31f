"""llama.cpp's own HTTP server, `llama-server` (slots with continuous batching), as a load baseline.

Built once from the llama.cpp sources inside the installed llama-cpp-python's sdist (the same tree whose
converter writes the GGUFs, `gguf_convert.ensure_sdist`), with cmake for this CPU (`GGML_NATIVE`), into
`~/.cache/lanner/llama-server/<version>/`: ~10 min on 2 cores, then reused.

    python bench/llama_server.py            # build if needed, print the binary's path

`run_load.py --baseline llama-server` uses it: the baseline then serves the same weights as a GGUF of
Lanner's quantization (int8 -> Q8_0, int4 -> Q4_0, else F32), with one slot per client of the highest level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

from gguf_convert import ensure_sdist, llama_cpp_version  # noqa: E402

BUILD_CACHE = Path("~/.cache/lanner/llama-server").expanduser()
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
GGUF_FOR_QUANTIZE = {"int8": "q8_0", "int4": "q4_0"}  # Lanner's --quantize -> the GGUF llama-server serves


def ensure_llama_server(cache: Path = BUILD_CACHE) -> Path:
    """The `llama-server` binary of the installed llama-cpp-python's llama.cpp, built now unless cached."""
    version = llama_cpp_version()
    build = cache / version
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise SystemExit("building llama-server needs cmake (apt install cmake)")
    tree = ensure_sdist(version=version)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-server {version} into {build} (once, ~10 min on 2 cores)", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *generator, *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True)
    if not binary.is_file():
        raise SystemExit(f"the build finished without {binary}")
    return binary


def server_command(binary: Path, gguf: Path, model_id: str, port: int, slots: int, slot_tokens: int,
                   threads: int) -> list[str]:
    """`llama-server` serving `gguf` as `model_id` with `slots` parallel sequences of `slot_tokens` each."""
    return [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-a", model_id,
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_tokens),
            "--no-webui"]


if __name__ == "__main__":
    print(ensure_llama_server())
