"""What GPUs change for a split (docs/distributed.md): one model served by llama-server on a local GPU, by a
CPU-only leader whose layers all live on one or two GPU workers (`ggml-rpc-server`, the workers of
spec.distributed.gpu), and on the CPU alone. One table: time to ready, prompt and generation tokens/s, the GPU
memory each process holds, and whether the answers agree.

    python3 benchmarks/distributed_gpu.py --bin BUILD/bin [--json FILE]

Needs a CUDA build of the pinned llama.cpp with GGML_RPC=ON (llama-server and ggml-rpc-server in BUILD/bin; these
machines have no GPU, so it ran on a lent one: .device-style `cmake -DGGML_CUDA=ON -DGGML_RPC=ON`), python3 with
numpy, httpx and gguf. The model is synthetic (random f16 weights, 16 llama blocks of 2048: about 1.6 GB) because
no model file could travel to that machine; speed and memory do not depend on what the weights say. All on one
machine: the workers talk to the leader over loopback, both on the one GPU, so the RPC protocol's own cost shows,
not a network's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tiny_gguf import _vocab, add_tokenizer  # noqa: E402

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 16, 2048, 5632, 16, 4
PROMPT = "The history of the city " * 40
BODY = {"prompt": PROMPT, "n_predict": 128, "temperature": 0, "seed": 1, "ignore_eos": True}


def write_model(path: Path) -> Path:
    """A llama GGUF of random f16 weights (one random matrix per shape, reused: writing stays fast)."""
    tokens, scores, types = _vocab()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 4096), (writer.add_embedding_length, N_EMBD),
                       (writer.add_block_count, N_LAYER), (writer.add_feed_forward_length, N_FF),
                       (writer.add_head_count, N_HEAD), (writer.add_head_count_kv, N_HEAD_KV),
                       (writer.add_rope_dimension_count, N_EMBD // N_HEAD)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(len(tokens))
    add_tokenizer(writer, tokens, scores, types)
    shapes: dict[tuple[int, int], np.ndarray] = {}

    def matrix(rows: int, cols: int) -> np.ndarray:
        if (rows, cols) not in shapes:
            shapes[(rows, cols)] = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)
        return shapes[(rows, cols)]

    kv = N_EMBD // N_HEAD * N_HEAD_KV
    writer.add_tensor("token_embd.weight", matrix(len(tokens), N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(len(tokens), N_EMBD))
    for block in range(N_LAYER):
        for name, shape in (("attn_q", (N_EMBD, N_EMBD)), ("attn_k", (kv, N_EMBD)), ("attn_v", (kv, N_EMBD)),
                            ("attn_output", (N_EMBD, N_EMBD)), ("ffn_gate", (N_FF, N_EMBD)),
                            ("ffn_up", (N_FF, N_EMBD)), ("ffn_down", (N_EMBD, N_FF))):
            writer.add_tensor(f"blk.{block}.{name}.weight", matrix(*shape))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_memory() -> dict[int, int]:
    """MiB of GPU memory per process id, as nvidia-smi reports it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:  # --smoke on a machine without a GPU
        return {}
    return {int(pid): int(mib) for pid, mib in (line.split(",") for line in out.strip().splitlines() if "," in line)}


def run_way(name: str, bin_dir: Path, model: Path, workers: int, gpu_leader: bool, log: Path) -> dict[str, object]:
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs, ports = [], [free_port() for _ in range(workers)]
    for port in ports:
        procs.append(subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=log.open("ab"), stderr=subprocess.STDOUT))
    time.sleep(1.0)
    port = free_port()
    args = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "4096",
            "--parallel", "1", "--fit", "off", "-t", "8", "-fa", "off"]
    if workers:
        slots = N_LAYER + 1
        split = [slots // workers + (1 if i < slots % workers else 0) for i in range(workers)]
        args += ["--rpc", ",".join(f"127.0.0.1:{p}" for p in ports), "-ngl", str(slots),
                 "--tensor-split", ",".join(map(str, split))]
    else:
        args += ["-ngl", "99" if gpu_leader else "0"]
    started = time.monotonic()
    leader = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                              env=os.environ if gpu_leader else no_gpu)
    procs.append(leader)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if leader.poll() is not None or time.monotonic() - started > 180:
                return {"way": name, "error": f"leader exited {leader.returncode}"}
            time.sleep(0.1)
        ready = time.monotonic() - started
        body = {**BODY, "n_predict": 32} if not workers and not gpu_leader else BODY
        reply = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=600).json()
        memory = gpu_memory()
        timings = reply["timings"]
        return {"way": name, "ready_s": round(ready, 2), "prompt_tps": round(timings["prompt_per_second"], 1),
                "gen_tps": round(timings["predicted_per_second"], 1), "answer": reply["content"],
                "gpu_mib": {("leader" if p is leader else f"worker{i}"): memory.get(p.pid, 0)
                            for i, p in enumerate(procs)}}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="the CUDA+RPC build's bin folder")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a model of 4 blocks of 256: checks the script, on a CPU")
    args = parser.parse_args()
    if args.smoke:
        global N_LAYER, N_EMBD, N_FF
        N_LAYER, N_EMBD, N_FF = 4, 256, 512
    model = write_model(Path("/tmp/synthetic-f16.gguf"))
    print(f"model {model.stat().st_size / 2**20:.0f} MiB, {N_LAYER} blocks of {N_EMBD}", flush=True)
    log = Path("/tmp/distributed_gpu.log")
    ways = [("one GPU, local", 0, True), ("CPU leader + 1 GPU worker", 1, False),
            ("CPU leader + 2 GPU workers", 2, False), ("CPU only", 0, False)]
    rows = [run_way(name, args.bin, model, workers, gpu, log) for name, workers, gpu in ways]
    first = next((row.get("answer") for row in rows if "answer" in row), None)
    print("| way | ready s | prompt tok/s | generation tok/s | GPU MiB per process | answer = the first way's |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['way']} | {row['error']} | | | | |")
            continue
        print(f"| {row['way']} | {row['ready_s']} | {row['prompt_tps']} | {row['gen_tps']} | {row['gpu_mib']} | "
              f"{row['answer'] == first} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(log.read_text()[-3000:] if any("error" in row for row in rows) else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
