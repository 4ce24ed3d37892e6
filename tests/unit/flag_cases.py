"""The bad-input table: each refused LlamaServer setting and the exact message the user sees.

tests/unit/test_flags_validate.py asserts every row; scripts/gen-flags-doc.py renders it into docs/flags.md
(a test fails when the doc drifts), so the documentation shows what users really get.
"""

from __future__ import annotations

from typing import Any

# (title, spec fields merged into a minimal valid spec, expected "path: message" lines, rule ids)
BAD_CASES: list[tuple[str, dict[str, Any], list[str], list[str]]] = [
    ("unit suffix on an integer", {"args": ["--top-k", "4k"]},
     ["spec.args[0]: --top-k expects an integer, got '4k' (no unit suffixes: write 4096, not 4k)"], ["int"]),
    ("not a number", {"args": ["--temp", "hot"]},
     ["spec.args[0]: --temp expects a number, got 'hot'"], ["float"]),
    ("out of documented range", {"args": ["--top-p", "7"]},
     ["spec.args[0]: --top-p must be in 0..1, got 7"], ["range"]),
    ("--flag=value", {"args": ["--top-k=20"]},
     ["spec.args[0]: write '--top-k' and '20' as two items: llama-server does not understand '--top-k=20'"],
     ["flag-equals-value"]),
    ("value glued to a short flag", {"args": ["-n128"]},
     ["spec.args[0]: unknown flag '-n128': write '-n' and '128' as two items"], ["unknown-flag"]),
    ("bare value", {"args": ["--jinja", "20"]},
     ["spec.args[1]: bare value '20': llama-server takes no positional arguments (a value belongs right after "
      "its flag)"], ["bare-value"]),
    ("typo", {"args": ["--top-kk", "20"]},
     ["spec.args[0]: unknown flag '--top-kk' (did you mean --top-k?)",
      "spec.args[1]: bare value '20': llama-server takes no positional arguments (a value belongs right after "
      "its flag)"], ["unknown-flag", "bare-value"]),
    ("missing value", {"args": ["--temp"]},
     ["spec.args[0]: --temp expects 1 value(s) after it"], ["missing-value"]),
    ("flag where a value belongs", {"args": ["--reverse-prompt", "--jinja"]},
     ["spec.args[0]: --reverse-prompt expects a value, but the next item is the flag --jinja"], ["missing-value"]),
    ("enum is exact", {"args": ["--pooling", "Mean"], "mode": "embedding"},
     ["spec.args[0]: --pooling must be one of none, mean, cls, last, rank (exactly), got 'Mean'"], ["enum"]),
    ("flag given twice", {"args": ["--temp", "0.5", "--temperature", "0.6"]},
     ["spec.args[2]: --temperature is given twice (also at spec.args[0]); give each flag once"], ["repeated"]),
    ("positive and negative form", {"args": ["--jinja", "--no-jinja"]},
     ["spec.args[1]: --no-jinja is given twice (also at spec.args[0]); give each flag once"], ["repeated"]),
    ("--jinja with a built-in chatTemplate", {"chatTemplate": "llama3", "args": ["--jinja"]},
     ["spec.args[0]: --jinja: spec.chatTemplate names a built-in template, which llama-server applies only without "
      "Jinja; remove --jinja, or unset chatTemplate to use the GGUF's Jinja template"], ["chat-template-jinja"]),
    ("removed --mlock", {"args": ["--mlock"]},
     ["spec.args[0]: --mlock was removed from llama.cpp: use spec.loadMode: mlock (--load-mode mlock)"],
     ["removed"]),
    ("removed --no-mmap", {"args": ["--no-mmap"]},
     ["spec.args[0]: --no-mmap was removed from llama.cpp: use spec.loadMode: none (--load-mode none)"],
     ["removed"]),
    ("removed --draft-max", {"args": ["--draft-max", "8"]},
     ["spec.args[0]: --draft-max was removed from llama.cpp: use spec.speculative.draftMax (--spec-draft-n-max)"],
     ["removed"]),
    ("removed --draft-min", {"args": ["--draft-min", "1"]},
     ["spec.args[0]: --draft-min was removed from llama.cpp: use spec.speculative.draftMin (--spec-draft-n-min)"],
     ["removed"]),
    ("deprecated", {"args": ["--defrag-thold", "0.1"]},
     ["spec.args[0]: --defrag-thold is deprecated and has no effect; remove it"], ["deprecated"]),
    ("typed field in args", {"args": ["-c", "4096"]},
     ["spec.args[0]: -c has a typed field: use spec.contextSize instead"], ["typed-field"]),
    ("typed field in args (alias)", {"args": ["-np", "4"]},
     ["spec.args[0]: -np has a typed field: use spec.parallel instead"], ["typed-field"]),
    ("embedding flag", {"args": ["--embeddings"]},
     ["spec.args[0]: --embeddings has a typed field: use spec.mode (embedding) instead"], ["typed-field"]),
    ("managed port", {"args": ["--port", "9000"]},
     ["spec.args[0]: --port is managed by the operator: the pod always listens on 0.0.0.0:8080; use "
      "spec.service to expose it"], ["managed"]),
    ("managed metrics", {"args": ["--metrics"]},
     ["spec.args[0]: --metrics is managed by the operator: the /metrics endpoint is always on"], ["managed"]),
    ("model source", {"args": ["-hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF"]},
     ["spec.args[0]: -hf is managed by the operator: the model comes from spec.modelRef (a LlamaModel)"],
     ["managed"]),
    ("preset that downloads a model", {"args": ["--gpt-oss-20b-default"]},
     ["spec.args[0]: --gpt-oss-20b-default is managed by the operator: preset flags download their own model; "
      "use spec.modelRef"], ["managed"]),
    ("API key", {"args": ["--api-key", "secret"]},
     ["spec.args[0]: --api-key is managed by the operator: use spec.apiKeySecretRef"], ["managed"]),
    ("print-and-exit", {"args": ["--version"]},
     ["spec.args[0]: --version prints something and exits: the container would restart in a loop"], ["exits"]),
    ("tools", {"args": ["--tools", "all"]},
     ["spec.args[0]: --tools is not allowed: built-in agent tools and MCP run commands and reach outside the "
      "pod"], ["outside"]),
    ("CORS", {"args": ["--cors-origins", "*"]},
     ["spec.args[0]: --cors-origins is not allowed: CORS is configured in front of the Service, not in the pod"],
     ["outside"]),
    ("GPU buffer type", {"args": ["-ot", "exps=CUDA0"]},
     ["spec.args[0]: --override-tensor expects <tensor regex>=CPU[,...] (GPU buffer types depend on the node "
      "and cannot be checked before start), got 'exps=CUDA0'"], ["format"]),
    ("env: flag in disguise", {"env": [{"name": "LLAMA_ARG_PORT", "value": "9000"}]},
     ["spec.env[0]: --port (set by env LLAMA_ARG_PORT) is managed by the operator: the pod always listens on "
      "0.0.0.0:8080; use spec.service to expose it"], ["managed"]),
    ("env: API key", {"env": [{"name": "LLAMA_API_KEY", "value": "secret"}]},
     ["spec.env[0]: --api-key (set by env LLAMA_API_KEY) is managed by the operator: use spec.apiKeySecretRef"],
     ["managed"]),
    ("env: bad value", {"env": [{"name": "LLAMA_ARG_TOP_K", "value": "4k"}]},
     ["spec.env[0]: LLAMA_ARG_TOP_K: --top-k expects an integer, got '4k' (no unit suffixes: write 4096, "
      "not 4k)"], ["int"]),
    ("env: typo", {"env": [{"name": "LLAMA_ARG_TOPK", "value": "20"}]},
     ["spec.env[0]: LLAMA_ARG_TOPK is not an environment variable llama-server reads (did you mean "
      "LLAMA_ARG_TOP_K?)"], ["env-unknown"]),
    ("env and args set the same flag", {"args": ["--top-k", "20"], "env": [{"name": "LLAMA_ARG_TOP_K",
                                                                              "value": "30"}]},
     ["spec.env[0]: LLAMA_ARG_TOP_K sets --top-k, which spec.args[0] sets too; set it once"], ["repeated"]),
    ("quantized V cache without flash attention", {"cacheTypeV": "q8_0", "flashAttention": "auto"},
     ["spec.cacheTypeV: a quantized V cache (q8_0) needs flash attention: set flashAttention: on"],
     ["kv-quant-needs-flash-attention"]),
    ("batch smaller than slots", {"batchSize": 2, "parallel": 4},
     ["spec.batchSize: batchSize (2) must be >= parallel (4): every slot needs room in a batch"],
     ["batch-below-parallel"]),
    ("physical batch above logical", {"batchSize": 256, "ubatchSize": 512},
     ["spec.ubatchSize: ubatchSize (512) must be <= batchSize (256)"], ["ubatch-above-batch"]),
    ("embedding needs ubatch = batch", {"mode": "embedding", "batchSize": 1024, "ubatchSize": 512},
     ["spec.ubatchSize: mode embedding encodes each input in one physical batch: ubatchSize must equal "
      "batchSize (or leave ubatchSize unset and it follows batchSize)"], ["pooling-mode-ubatch"]),
    ("rerank needs rank pooling", {"mode": "rerank", "args": ["--pooling", "mean"]},
     ["spec.args: mode rerank needs --pooling rank (it is set for you; remove --pooling)"],
     ["rerank-pooling"]),
    ("pooling in chat mode", {"args": ["--pooling", "mean"]},
     ["spec.args: --pooling only applies to mode embedding or rerank"], ["chat-pooling"]),
    ("speculative in embedding mode", {"mode": "embedding", "speculative": {"draftModelRef": {"name": "d"}}},
     ["spec.speculative: speculative decoding generates text; mode embedding does not"], ["mode-speculative"]),
    ("draft min above max", {"speculative": {"draftModelRef": {"name": "d"}, "draftMin": 8, "draftMax": 4}},
     ["spec.speculative.draftMin: draftMin (8) must be <= draftMax (4)"], ["draft-min-above-max"]),
    ("LoRA adapters in embedding mode", {"mode": "embedding", "adapters": [{"name": "sql"}]},
     ["spec.adapters: adapters change generated text; mode embedding generates none"], ["adapters-mode"]),
    ("one LoRA adapter twice", {"adapters": [{"name": "sql"}, {"name": "sql"}]},
     ["spec.adapters: an adapter is listed twice in spec.adapters"], ["duplicate-adapter"]),
    ("kept prompt caches with LoRA adapters", {"adapters": [{"name": "sql"}], "promptCache": {"persist": True}},
     ["spec.promptCache: promptCache.persist cannot be used with adapters: a saved slot does not record which "
      "adapter computed it, so a restore could answer a base-model request from an adapter's cache"],
     ["prompt-cache-with-adapters"]),
    ("a LoRA adapter in args", {"args": ["--lora", "/models/sql.gguf"]},
     ["spec.args[0]: --lora is managed by the operator: LoRA adapters are LlamaModels with spec.adapterFor, "
      "listed in spec.adapters"], ["managed"]),
    ("tensor split without GPUs", {"tensorSplit": [3, 1]},
     ["spec.tensorSplit: tensorSplit has 2 shares but gpu.count is 0: give one share per GPU"],
     ["tensor-split-gpus"]),
    ("tensor split of zeros", {"gpu": {"vendor": "nvidia", "count": 2}, "tensorSplit": [0, 0]},
     ["spec.tensorSplit: tensorSplit shares must be >= 0 with a positive sum"], ["tensor-split-gpus"]),
    ("context auto without a memory limit", {"contextSize": "auto"},
     ["spec.contextSize: contextSize auto sizes the context to the memory: set resources.limits.memory (with gpu: "
      "gpu.memory, the memory of one GPU), or give contextSize a number"], ["context-auto-needs-budget"]),
    ("context auto on a GPU without its memory",
     {"contextSize": "auto", "gpu": {"vendor": "nvidia"}, "resources": {"limits": {"memory": "8Gi"}}},
     ["spec.contextSize: contextSize auto sizes the context to the memory: set resources.limits.memory (with gpu: "
      "gpu.memory, the memory of one GPU), or give contextSize a number"], ["context-auto-needs-budget"]),
]

GOOD_CASES: list[dict[str, Any]] = [
    {},
    {"promptCache": {"persist": True, "maxSize": "4Gi"}},
    {"args": ["--top-k", "20", "--temp", "0.7", "--jinja", "--no-webui", "-ot", "exps=CPU"]},
    {"args": ["--top_k", "20"]},  # llama.cpp maps _ to - in long flags
    {"contextSize": 8192, "parallel": 4, "batchSize": 512, "ubatchSize": 256, "flashAttention": "on",
     "cacheTypeK": "q8_0", "cacheTypeV": "q8_0"},
    {"mode": "rerank", "args": ["--pooling", "rank"]},
    {"mode": "embedding", "batchSize": 1024},
    {"env": [{"name": "LLAMA_ARG_TOP_K", "value": "20"}, {"name": "HOME", "value": "/tmp"},
             {"name": "LLAMA_ARG_NO_CONT_BATCHING", "value": "1"}]},
    {"speculative": {"draftModelRef": {"name": "d"}, "draftMax": 8, "draftMin": 1}},
    {"gpu": {"vendor": "nvidia", "count": 2}, "tensorSplit": [3, 1], "splitMode": "layer"},
]
