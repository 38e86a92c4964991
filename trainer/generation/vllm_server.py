"""The vLLM side of the vLLM sampler: one ``vllm.LLM`` engine behind a small HTTP API.

This file runs inside vLLM's own environment (``make vllm-setup`` builds ``.venv-vllm``), not the
trainer's: vLLM 0.32 pins ``transformers<5.20`` and ``torch==2.13.0`` while the trainer needs
``transformers>=5.24``, so the two cannot share one interpreter. It imports only the standard
library, vllm, torch and safetensors, and never this project's package, so it can be copied
anywhere and run as a plain script:

    .venv-vllm/bin/python trainer/generation/vllm_server.py --model DIR --max-model-len 1024 \\
        --port 8100 [--host 0.0.0.0] [--kv-cache-gib 1] [--max-lora-rank 16] [--max-loras 4] \\
        [--threads 4] [--sleep-mode]

``trainer.generation.vllm.VLLMSampler`` starts it as its child (``--port 0 --ready-file F``: the
port it bound and any start-up error come back in F) or talks to one an operator runs elsewhere.
The inference worker (``worker.vllm_serving``) starts one per base model and serves many jobs'
LoRA adapters from it, loading (``/load_lora``) and unloading (``/unload_lora``) them as used.

Why HTTP with the standard library, not ``multiprocessing.connection`` or uvicorn: the same code
serves a child on the loopback and a server on another host; nothing is unpickled from the peer
(a pickle executes code); the messages are small JSON (token ids, log-probs), so a blocking
``ThreadingHTTPServer`` costs nothing next to a forward pass; ``curl`` can drive it; and it adds no
dependency to either environment. Weights and adapters travel as files: a path both sides see
(the child's case), or uploaded with ``PUT /files/<name>`` into the server's scratch directory.
There is no authentication: it listens on the loopback unless told otherwise, and a server on a
network belongs on a private one (a caller can load any weights it can reach).

    GET  /health                    -> {"ok": true, "model", "max_model_len", "max_lora_rank",
                                        "loras": [...], "can_sleep", "sleeping": [tags]}
    POST /generate                  {"prompts": [[ids]], "n", "max_tokens", "temperature", "top_p",
                                     "stop_token_ids", "seed", "lora": name | null}
                                    -> {"completions": [[{"token_ids", "logprobs", "finish_reason"}]]}
    POST /load_weights              {"path": safetensors file or directory} -> {"seconds"}
    POST /load_lora                 {"name", "path": peft adapter directory} -> {"id"}
    POST /unload_lora               {"name"} -> {"unloaded": whether it was loaded}
    PUT  /files/<relative path>     raw bytes -> {"path": where the server stored them}
    POST /sleep                     {"level": 1 | 2} -> {"sleeping": [tags]}
    POST /wake_up                   {"tags": ["weights", "kv_cache"] | null (all)} -> {"sleeping"}
    POST /shutdown

Sleep mode (``--sleep-mode``, where vLLM's platform has it: CUDA, ROCm, XPU; not its CPU build):
a colocated engine gives its device memory back while the trainer trains. ``/sleep`` level 1 moves
the weights to host memory and drops the KV cache; level 2 drops both (for weights about to be
replaced). ``/wake_up`` takes them back in the order the caller needs: after a level-2 sleep,
``weights``, then ``/load_weights``, then ``kv_cache`` (vLLM's wake alone leaves the weights'
memory uninitialized). Refused with 409 and the reason: ``/sleep`` and ``/wake_up`` without sleep
mode (``can_sleep``, also in the ready file, says whether it has it), and while asleep the routes
that need what sleeps.

The log-prob of each sampled token is ``log_softmax(logits / T)`` at that token, before top-p:
the policy's distribution at the sampling temperature, as the trainer computes it
(``WorkerExtension.grpo_logprobs_before_top_p``). Greedy requests (temperature 0) report
``log_softmax(logits)``.

Every weight load resets the prefix cache: cached blocks hold keys and values computed by the old
weights, and a prompt that hits them would decode from stale state (measured: wrong tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Python puts a script's own directory first on sys.path, and this one sits beside the trainer's
# ``vllm.py`` client, which would shadow the real vllm package. Dropped before vllm is imported.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

logger = logging.getLogger("grpo.vllm_server")

# Substrings of vLLM's start-up errors when the KV cache cannot hold one max-length sequence, or
# with --max-model-len -1 not even one token (v1/core/kv_cache_utils.py), or the memory for it is
# not there (v1/worker/cpu_worker.py).
KV_TOO_SMALL = (
    "KV cache is needed",
    "No available memory for the cache blocks",
    "Cannot auto-fit max_model_len",
)
OUT_OF_MEMORY = ("less than requested memory for kv", "out of memory", "OutOfMemoryError")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks


class WorkerExtension:
    """Methods added to each vLLM worker (``worker_extension_cls``), called by ``collective_rpc``.

    ``load_weights`` reads the checkpoint in the worker itself, so the tensors never cross the
    engine's process boundary, and goes through the worker's ``reload_weights``: the model's own
    ``load_weights`` alone fails on the CPU backend, which repacks linear weights after loading.
    """

    def grpo_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        source = Path(path)
        files = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
        if not files:
            raise FileNotFoundError(f"no .safetensors file in {path}")

        def weights():
            for file in files:
                yield from load_file(str(file)).items()

        self.reload_weights(weights_iterator=weights())
        return len(files)

    def grpo_logprobs_before_top_p(self) -> None:
        """Make the sampler report ``log_softmax(logits / T)`` of each sampled token, taken
        before top-k / top-p: the policy's own distribution at the sampling temperature, which is
        what the trainer's log-probs compute and the mismatch correction divides by. vLLM's own
        modes give either T = 1 (``raw_logprobs``) or the renormalized nucleus
        (``processed_logprobs``: with top_p < 1 every ratio would be off by the nucleus mass).

        The temperature is applied before the top-k/top-p sampler runs, so the log-softmax of
        its input is the one wanted; it is taken first because the sampler masks its input in
        place. The inner sampler is told to build no log-probs of its own (one full-vocabulary
        pass, not two)."""
        import torch

        sampler = self.model_runner.sampler.topk_topp_sampler
        inner = sampler.forward
        sampler.logprobs_mode = "raw_logprobs"

        def forward(logits, generators, k, p):
            logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)  # [N, V]
            token, _ = inner(logits, generators, k, p)
            return token, logprobs

        sampler.forward = forward


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds ``rank``."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")


def classify_start_error(message: str) -> str:
    """ "kv_cache" when the engine failed for want of KV-cache memory, "memory" for other
    out-of-memory failures, else "other": the client turns the first two into an error that
    names the setting to change."""
    if any(s in message for s in KV_TOO_SMALL):
        return "kv_cache"
    if any(s in message for s in OUT_OF_MEMORY):
        return "memory"
    return "other"


class Scratch:
    """Where uploads go: a temporary directory made on the first (a child sharing its parent's
    disk never gets one, so a child killed outright leaves none behind), removed at exit."""

    def __init__(self):
        self._path: Path | None = None
        self._lock = threading.Lock()

    def path(self) -> Path:
        with self._lock:
            if self._path is None:
                self._path = Path(tempfile.mkdtemp(prefix="grpo-vllm-files-"))
            return self._path

    def discard(self, path: str) -> None:
        """Remove ``path`` if it is an upload (a path of the client's own disk is the client's)."""
        if self._path is not None and Path(path).resolve().is_relative_to(self._path):
            shutil.rmtree(path, ignore_errors=True)

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)


class Refused(Exception):
    """A request the engine cannot serve in its state (asleep, or without sleep mode): a 409 with
    the reason, not a failure of the engine."""


SLEEP_TAGS = ("weights", "kv_cache")  # what vLLM's wake_up takes back, each on its own


def sleep_mode_available() -> tuple[bool, str]:
    """Whether vLLM's platform here has sleep mode, and if not, why (for the refusal)."""
    from vllm.platforms import current_platform

    name = getattr(current_platform, "device_name", "") or type(current_platform).__name__
    if not current_platform.is_sleep_mode_available():
        return False, f"vLLM's {name} platform has no sleep mode (vLLM has it on CUDA, ROCm and XPU)"
    # with sleep mode vLLM puts CUDA/ROCm memory in its cumem allocator, and refuses to start without
    if current_platform.is_cuda_alike() and not current_platform.is_cumem_allocator_available():
        return False, f"vLLM's cumem allocator, which sleep mode needs, is not available on {name}"
    return True, ""


class Engine:
    """One ``vllm.LLM`` and the adapters loaded into it. Calls are serialized by a lock: the
    offline ``LLM`` is not re-entrant, and a weight load must not interleave with a generation.

    With ``--sleep-mode`` where the platform has it, ``sleep`` and ``wake_up`` give the device
    memory back and take it again; ``sleeping`` holds the tags asleep, and ``weights_discarded``
    whether a level-2 sleep dropped the weights with nothing loaded since (generating from them
    would decode from uninitialized memory)."""

    def __init__(self, args: argparse.Namespace, scratch: Scratch):
        from vllm import LLM

        self.scratch = scratch
        self.can_sleep, why = sleep_mode_available() if args.sleep_mode else (False, "")
        self.cannot_sleep_reason = why or "the server was started without --sleep-mode"
        self.sleeping: set[str] = set()
        self.weights_discarded = False
        lora = args.max_lora_rank > 0
        self.model = args.model
        self.max_lora_rank = lora_rank_slot(args.max_lora_rank) if lora else 0
        self.llm = LLM(
            model=args.model,
            dtype=args.dtype,
            seed=args.seed,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
            enable_prefix_caching=True,
            enable_lora=lora,
            max_lora_rank=self.max_lora_rank or 16,
            max_loras=args.max_loras,
            skip_tokenizer_init=True,  # ids in, ids out: the trainer tokenizes
            # the sampler hands over log-probs (ours, see the extension): no raw pass before it
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{WorkerExtension.__module__}.{WorkerExtension.__qualname__}",
            enforce_eager=args.enforce_eager,
            enable_sleep_mode=self.can_sleep,
            **(
                {"gpu_memory_utilization": args.gpu_memory_utilization}
                if args.gpu_memory_utilization is not None
                else {}
            ),
        )
        # the length the engine settled on: the one asked for, or with -1 the longest its KV cache holds
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.llm.collective_rpc("grpo_logprobs_before_top_p")
        self.lock = threading.Lock()
        self.loras: dict[str, object] = {}  # name -> the LoRARequest later generations use
        self.next_lora_id = 1

    def generate(self, request: dict) -> dict:
        from vllm import SamplingParams

        n = int(request.get("n", 1))
        seed = request.get("seed")
        # one seed per prompt, where given: a prompt's completions then do not depend on which
        # other prompts share the call (a run on several processes splits a step's prompts)
        seeds = request.get("seeds") or [
            None if seed is None else int(seed) + b * n for b in range(len(request["prompts"]))
        ]
        temperature = float(request.get("temperature", 1.0))
        # vLLM refuses n > 1 with greedy decoding: its n completions are one, decoded once
        copies, n = (n, 1) if temperature == 0 else (1, n)
        params = [
            SamplingParams(
                n=n,
                max_tokens=int(request["max_tokens"]),
                temperature=temperature,
                top_p=float(request.get("top_p", 1.0)),
                # exactly the caller's stop set: not also the EOS vLLM finds in the model's configs
                ignore_eos=True,
                stop_token_ids=[int(t) for t in request.get("stop_token_ids", [])],
                # prompt b's completions draw from seeds[b] + j (vLLM adds j for the j-th of n)
                seed=None if seeds[b] is None else int(seeds[b]),
                logprobs=0,  # the sampled token's own log-prob only
                detokenize=False,
            )
            for b in range(len(request["prompts"]))
        ]
        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in request["prompts"]]
        with self.lock:
            # asleep, vLLM's scheduler is paused: the request would wait forever
            self._require_awake("generate", SLEEP_TAGS)
            if self.weights_discarded:
                raise Refused(
                    "generate: a level-2 sleep discarded the weights and none were loaded since: "
                    "POST /load_weights first"
                )
            lora = self.loras[request["lora"]] if request.get("lora") else None
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        completions = []
        for output in outputs:
            group = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                group.append(
                    {
                        "token_ids": ids,
                        "logprobs": [
                            step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)
                        ],
                        "finish_reason": completion.finish_reason,
                    }
                )
            completions.append(group * copies)
        return {"completions": completions}

    def load_weights(self, path: str) -> dict:
        started = time.perf_counter()
        with self.lock:
            self._require_awake("load_weights", ("weights",))  # asleep, they have no memory to go to
            self.llm.collective_rpc("grpo_load_weights", args=(path,))
            self.weights_discarded = False
            self._reset_prefix_cache()
        self.scratch.discard(path)  # the weights were copied in
        return {"seconds": time.perf_counter() - started}

    def load_lora(self, name: str, path: str) -> dict:
        """Serve ``name`` from the adapter at ``path`` from now on, under a new id: an id is how
        vLLM tells adapters (and their prefix-cache blocks) apart, so reusing one could serve the
        old adapter's cached state."""
        from vllm.lora.request import LoRARequest

        with self.lock:
            self._require_awake("load_lora", ("weights",))  # the adapter slots live with the weights
            request = LoRARequest(name, self.next_lora_id, path)
            self.next_lora_id += 1
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the adapter at {path}")
            old = self.loras.get(name)
            self.loras[name] = request
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
                # only now: vLLM may read an adapter's files again while it serves it (after
                # evicting it from its CPU cache)
                self.scratch.discard(old.lora_path)
            self._reset_prefix_cache()
        return {"id": request.lora_int_id}

    def unload_lora(self, name: str) -> dict:
        """Stop serving ``name`` and free its slot: a server shared by many adapters (one per job
        of an inference worker) keeps only those its client still uses."""
        with self.lock:
            self._require_awake("unload_lora", ("weights",))
            request = self.loras.pop(name, None)
            if request is not None:
                self.llm.llm_engine.remove_lora(request.lora_int_id)
                self.scratch.discard(request.lora_path)
        return {"unloaded": request is not None}

    def sleep(self, level: int) -> dict:
        """Give the device memory back: level 1 moves the weights to host memory and drops the
        KV cache, level 2 drops both (the caller loads new weights before generating). Asleep
        already: nothing changes (vLLM would ignore a second sleep)."""
        if not self.can_sleep:
            raise Refused(f"sleep: {self.cannot_sleep_reason}")
        if level not in (1, 2):
            raise Refused(f"sleep: level must be 1 (weights to host memory) or 2 (discarded), got {level!r}")
        with self.lock:
            if not self.sleeping:
                self.llm.sleep(level=level)
                self.sleeping = set(SLEEP_TAGS)
                self.weights_discarded = level == 2
        return {"sleeping": sorted(self.sleeping)}

    def wake_up(self, tags: list[str] | None) -> dict:
        """Take back the memory of ``tags`` (None: all), those asleep; the engine serves again once
        both are awake. vLLM wakes nothing when one of the tags asked for is awake, so only those
        asleep are passed on."""
        if not self.can_sleep:
            raise Refused(f"wake_up: {self.cannot_sleep_reason}")
        unknown = sorted(set(tags or ()) - set(SLEEP_TAGS))
        if unknown:
            raise Refused(f"wake_up: unknown tags {unknown}; expected some of {list(SLEEP_TAGS)}")
        with self.lock:
            asleep = [t for t in (tags or SLEEP_TAGS) if t in self.sleeping]
            if asleep:
                self.llm.wake_up(tags=asleep)
                self.sleeping -= set(asleep)
        return {"sleeping": sorted(self.sleeping)}

    def _require_awake(self, route: str, tags: tuple[str, ...]) -> None:
        asleep = [t for t in tags if t in self.sleeping]
        if asleep:
            raise Refused(f"{route}: the engine is asleep ({', '.join(asleep)}): POST /wake_up first")

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args) -> None:  # the base class names it "format"
        logger.debug(format, *args)

    def _reply(self, status: HTTPStatus, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, work) -> None:
        try:
            self._reply(HTTPStatus.OK, work())
        except Refused as exc:
            self._reply(HTTPStatus.CONFLICT, {"error": str(exc)})
        except Exception as exc:  # the client raises it with this text
            logger.exception("request failed")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        if self.path != "/health":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}"})
            return
        engine = self.server.engine
        self._reply(
            HTTPStatus.OK,
            {
                "ok": True,
                "model": engine.model,
                "max_model_len": engine.max_model_len,
                "max_lora_rank": engine.max_lora_rank,
                "loras": sorted(engine.loras),
                "can_sleep": engine.can_sleep,
                "sleeping": sorted(engine.sleeping),
            },
        )

    def do_POST(self) -> None:
        engine = self.server.engine
        routes = {
            "/generate": lambda body: engine.generate(body),
            "/load_weights": lambda body: engine.load_weights(body["path"]),
            "/load_lora": lambda body: engine.load_lora(body["name"], body["path"]),
            "/unload_lora": lambda body: engine.unload_lora(body["name"]),
            "/sleep": lambda body: engine.sleep(body.get("level", 1)),
            "/wake_up": lambda body: engine.wake_up(body.get("tags")),
        }
        if self.path == "/shutdown":
            self._reply(HTTPStatus.OK, {"ok": True})
            threading.Thread(target=self.server.shutdown, daemon=True).start()
        elif self.path in routes:
            self._answer(lambda: routes[self.path](json.loads(self._body() or b"{}")))
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}"})

    def do_PUT(self) -> None:
        """Store the body under the scratch directory, for a server that shares no disk with its
        client; the reply names the path to pass to load_weights / load_lora."""
        relative = Path(self.path.removeprefix("/files/"))
        if not self.path.startswith("/files/") or relative.is_absolute() or ".." in relative.parts:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "PUT /files/<relative path>"})
            return

        def store() -> dict:
            target = self.server.scratch.path() / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self._body())
            return {"path": str(target)}

        self._answer(store)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, scratch: Scratch):
        super().__init__(address, Handler)
        self.engine, self.scratch = engine, scratch


def write_ready(path: str | None, record: dict) -> None:
    """The start-up outcome for the parent, written whole (rename) so it never reads half a file."""
    if path:
        partial = f"{path}.partial"
        Path(partial).write_text(json.dumps(record))
        os.replace(partial, path)


def exit_when_parent_goes(scratch: Scratch) -> None:
    """A child's stdin is a pipe from its parent: EOF means the parent is gone (even killed), and
    the engine must not outlive it holding its memory. Exits at once (vLLM's own worker processes
    watch this one and follow), leaving no uploads behind."""
    sys.stdin.buffer.read()
    logger.warning("parent closed stdin: exiting")
    scratch.remove()
    os._exit(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (or hub id)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        required=True,
        help="prompt + completion tokens; -1: the model's context, or less if the KV cache holds less",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="memory for the KV cache")
    parser.add_argument("--max-lora-rank", type=int, default=0, help="0: no LoRA; else the largest rank")
    parser.add_argument("--max-loras", type=int, default=1, help="adapters one batch may mix")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: vLLM's own binding)")
    parser.add_argument("--enforce-eager", action="store_true", help="no compiled graphs")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="the share of the GPU vLLM checks is free at start (vLLM: 0.9; see startup_utilization)",
    )
    parser.add_argument(
        "--sleep-mode",
        action="store_true",
        help="serve /sleep and /wake_up where vLLM's platform has sleep mode (not on CPU)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --ready-file)")
    parser.add_argument("--ready-file", help="write {port} or {error, kind} here once started")
    parser.add_argument("--parent-stdin", action="store_true", help="exit when stdin closes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        # vLLM's CPU workers pin one OpenMP thread per core of a NUMA node unless told "nobind";
        # the thread count then follows OMP_NUM_THREADS, inherited by the worker processes.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # --kv-cache-gib is the one setting
    # The engine core in this process, not a third one: it is started in seconds rather than
    # re-importing vllm in a spawned process (the CPU backend forces spawn), and it has nothing
    # to overlap with here (requests are serialized). The model still runs in vLLM's worker
    # process. An operator may set it to 1 to get vLLM's default back.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    scratch = Scratch()
    try:
        if args.parent_stdin:
            threading.Thread(target=exit_when_parent_goes, args=(scratch,), daemon=True).start()
        try:
            engine = Engine(args, scratch)
        except BaseException as exc:
            message = "".join(traceback.format_exception_only(exc)).strip()
            write_ready(args.ready_file, {"error": message, "kind": classify_start_error(message)})
            raise
        server = Server((args.host, args.port), engine, scratch)
        write_ready(args.ready_file, {"port": server.server_address[1], "can_sleep": engine.can_sleep})
        logger.info("serving %s on %s:%d", args.model, args.host, server.server_address[1])
        server.serve_forever()
    finally:
        scratch.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
