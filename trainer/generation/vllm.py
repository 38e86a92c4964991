"""The vLLM sampler: completions from a vLLM engine in its own process, kept on the policy's weights.

vLLM cannot live in the trainer's interpreter here: vLLM 0.32 pins ``transformers<5.20`` and
``torch==2.13.0``, the trainer needs ``transformers>=5.24``. So the engine runs in its own
environment (``make vllm-setup`` builds ``.venv-vllm``) as ``vllm_server.py``, either this
sampler's child process (the default: started here, stopped by ``close``, gone with its parent)
or a server an operator runs elsewhere (``url``). The sampler speaks its small HTTP API through
``EngineClient`` (the inference worker's engines, ``worker/vllm_serving.py``, use it too):

- ``generate``: one request for the step's prompts, ``n = group_size``, and a seed drawn from the
  run's generator (so a run is reproducible), back as a ``Rollout`` with each sampled token's
  log-prob under ``softmax(logits / T)`` (``sampler_logprobs``, for the mismatch correction).
- ``sync(model)`` after every optimizer step: an exact push of the new weights, full (the model's
  ``save_pretrained`` safetensors, loaded in place by the engine's workers) or, for a peft model,
  only the adapter, served under a new LoRA id. The engine resets its prefix cache after each.
  Files travel by path when the engine shares this machine's disk, else uploaded.
- Sleep, where vLLM's platform has sleep mode (GPUs; not its CPU build) and the engine is this
  sampler's child (``hyperparameters.vllm_sleep``, off by default): after each generation the engine
  gives its device memory back for the trainer's forward and backward passes, and takes it again
  in the order a weight push needs: its weights first, then the new weights loaded into them, then
  its KV cache (with the next generation). A full fine-tune sleeps at level 2 (the weights are
  discarded: every sync replaces them anyway); a LoRA job at level 1 (the base weights wait in
  host memory, the adapter is all a sync sends).

The engine's KV cache has a fixed size (``kv_cache_gib``, default 1 GiB): vLLM's CPU backend would
otherwise reserve most of the machine's memory. When it cannot hold one max-length sequence the
run stops with an ``OutOfMemoryError`` that names the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import GRPOConfig
from trainer.errors import OutOfMemoryError, TrainingError
from trainer.rollout import Rollout

SERVER = Path(__file__).with_name("vllm_server.py")
REPO_VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
PYTHON_ENV = "GRPO_VLLM_PYTHON"  # the interpreter of an environment with vllm
URL_ENV = "GRPO_VLLM_URL"  # a running vllm_server.py that workers share instead of starting one each
DEFAULT_KV_CACHE_GIB = 1.0
KV_CACHE_SETTING = "hyperparameters.vllm_kv_cache_gib"  # what an error tells the user to change
ROLLOUT_HAS_SAMPLER_LOGPROBS = "sampler_logprobs" in {f.name for f in dataclasses.fields(Rollout)}


class VLLMEngineError(TrainingError):
    """The vLLM engine could not start or answer; the message says why and where its log is."""


def vllm_python(python: str | os.PathLike | None = None) -> Path:
    """The interpreter to run the engine with: ``python``, else $GRPO_VLLM_PYTHON, else this
    checkout's ``.venv-vllm``. Raises, saying how to build it, when it is not there."""
    chosen = python or os.environ.get(PYTHON_ENV) or REPO_VENV_PYTHON
    path = Path(chosen)
    if not path.exists():
        raise VLLMEngineError(
            f"generation 'vllm' needs vLLM's own environment, and {path} does not exist: run "
            f"`make vllm-setup` in the checkout, or set {PYTHON_ENV} to the python of an environment "
            "with vllm installed"
        )
    return path


def model_source(model: torch.nn.Module) -> str:
    """Where ``model``'s base weights were loaded from (a peft model: its base model's)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = getattr(causal_lm.config, "_name_or_path", "") or getattr(causal_lm, "name_or_path", "")
    if not source:
        raise VLLMEngineError("the policy does not say where it was loaded from: pass model_dir")
    return str(source)


def lora_rank(model: torch.nn.Module) -> int:
    """The largest LoRA rank of a peft model's adapters; 0 for a plain model."""
    configs = getattr(model, "peft_config", None) or {}
    return max((int(getattr(c, "r", 0)) for c in configs.values()), default=0)


def startup_utilization(free_bytes: int, total_bytes: int) -> float:
    """The ``gpu_memory_utilization`` a vLLM engine started beside the trainer is given. vLLM (0.32)
    refuses to start unless that share of the device's memory is free (0.9 by default), which a
    device that already holds the policy, its reference and optimizer state does not have. The
    engine's own memory is sized by ``kv_cache_memory_bytes`` (``vllm_kv_cache_gib``); this share
    only has to pass that start-up check: most of what is free."""
    return round(max(0.01, min(0.9, 0.95 * free_bytes / total_bytes)), 4)


def startup_memory_args(model: torch.nn.Module) -> list[str]:
    """``--gpu-memory-utilization`` for an engine sharing the policy's GPU (none on a CPU), as
    ``startup_utilization`` gives it from the memory free now, the trainer's cached blocks freed."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return []
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return ["--gpu-memory-utilization", str(startup_utilization(free, total))]


def dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class EngineStartError(VLLMEngineError):
    """``vllm_server.py`` reported why it could not start: ``kind`` is ``kv_cache``, ``memory`` (the
    KV cache or the machine's memory too small) or ``other``; ``reason`` is vLLM's message."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"the vLLM engine failed to start: {reason}")
        self.kind, self.reason = kind, reason


def start_error(error: EngineStartError, kv_cache_gib: float, max_model_len: int) -> TrainingError:
    """The error the sampler's failed start raises: memory failures name the setting that sizes the
    cache."""
    kind, message = error.kind, error.reason
    if kind == "kv_cache":
        return OutOfMemoryError(
            f"vLLM's KV cache ({KV_CACHE_SETTING} = {kv_cache_gib:g} GiB) cannot hold one sequence of "
            f"max_prompt_length + max_completion_length = {max_model_len} tokens: raise "
            f"{KV_CACHE_SETTING} or shorten the lengths (vLLM: {message})"
        )
    if kind == "memory":
        return OutOfMemoryError(
            f"the vLLM engine ran out of memory starting up with {KV_CACHE_SETTING} = {kv_cache_gib:g} "
            f"GiB: lower {KV_CACHE_SETTING}, or free memory on the machine (vLLM: {message})"
        )
    return error


class EngineProcess:
    """``vllm_server.py`` as a child: started with a ready file in which it reports the port it
    bound (or why it could not start: ``EngineStartError``), its stdin a pipe whose closing (this
    process ending, even killed) makes it exit, its output in ``log_path``."""

    def __init__(self, python: Path, args: list[str], work_dir: Path, startup_timeout_s: float):
        self.log_path = work_dir / "vllm-server.log"
        ready = work_dir / "ready.json"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(python),
                    str(SERVER),
                    *args,
                    "--port",
                    "0",
                    "--ready-file",
                    str(ready),
                    "--parent-stdin",
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work_dir,
            )
        deadline = time.monotonic() + startup_timeout_s
        while not ready.exists():
            if self.process.poll() is not None:
                raise VLLMEngineError(
                    f"the vLLM engine exited with code {self.process.returncode} before it was ready; "
                    f"the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMEngineError(
                    f"the vLLM engine was not ready after {startup_timeout_s:g} s; its log: {self.log_path}"
                )
            time.sleep(0.2)
        self.ready: dict = json.loads(ready.read_text())
        if "error" in self.ready:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)  # it re-raises and exits, its traceback in the log
            self.stop()
            raise EngineStartError(self.ready.get("kind", "other"), self.ready["error"])
        self.url = f"http://127.0.0.1:{self.ready['port']}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close its stdin (it exits) and wait; kill it if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def running(self) -> bool:
        return self.process.poll() is None


class EngineClient:
    """The one way to talk to a ``vllm_server.py``: the server at ``url``, or ``engine``, the child
    this process started (``start``), whose exit and log a failed request then reports.

    ``kv_cache_setting`` is the setting that sizes the child's KV cache and its value in GiB:
    given, a child killed by SIGKILL (what the kernel's out-of-memory killer sends) fails a request
    with an ``OutOfMemoryError`` naming it. ``timeout_s``: how long a request may take.
    """

    def __init__(
        self,
        url: str,
        engine: EngineProcess | None = None,
        *,
        timeout_s: float,
        kv_cache_setting: tuple[str, float] | None = None,
    ):
        self.url = url.rstrip("/")
        self.engine = engine
        self.timeout_s = timeout_s
        self.kv_cache_setting = kv_cache_setting

    @classmethod
    def start(
        cls,
        python: Path,
        args: list[str],
        work_dir: Path,
        *,
        startup_timeout_s: float,
        timeout_s: float,
        kv_cache_setting: tuple[str, float] | None = None,
    ) -> EngineClient:
        """A client of ``vllm_server.py`` ``args`` started as a child (``EngineProcess``);
        ``EngineStartError`` when the engine says why it could not start."""
        engine = EngineProcess(python, args, work_dir, startup_timeout_s)
        return cls(engine.url, engine, timeout_s=timeout_s, kv_cache_setting=kv_cache_setting)

    def request(self, method: str, route: str, body: Any = None, timeout: float | None = None) -> dict:
        """The engine's JSON answer to ``body`` (JSON, or bytes sent as they are); a
        ``VLLMEngineError`` with the engine's reason (and, for a child, its log) otherwise."""
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, method=method)
        request.add_header(
            "Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", str(exc))
            except ValueError:
                reason = str(exc)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = f"no answer from {self.url} ({exc})"
            code = self.exit_code()
            if code == -signal.SIGKILL and self.kv_cache_setting is not None:
                setting, gib = self.kv_cache_setting
                raise OutOfMemoryError(
                    f"the vLLM engine was killed (SIGKILL: most likely out of memory) during {route}: "
                    f"lower {setting} ({gib:g} GiB), or free memory on the machine"
                ) from exc
            if code is not None:
                reason += f"; the engine exited ({code}), the end of its log:\n{self.engine.log_tail()}"
        where = f"; its log: {self.engine.log_path}" if self.engine is not None else ""
        raise VLLMEngineError(f"vLLM engine {method} {route} failed: {reason}{where}")

    def exit_code(self) -> int | None:
        """The child's exit code once it is gone (a dropped connection may come a moment before
        the exit), None while it runs or for a server given by ``url``."""
        if self.engine is None:
            return None
        try:
            return self.engine.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def running(self) -> bool:
        """Whether the child still runs (False for a server given by ``url``: not this client's)."""
        return self.engine is not None and self.engine.running()

    def close(self) -> None:
        """Stop the child, asked to shut down first while it runs (a server given by ``url`` keeps
        running)."""
        if self.engine is None:
            return
        if self.engine.running():
            try:
                self.request("POST", "/shutdown", timeout=10)
            except TrainingError:
                pass  # gone meanwhile: stop() below reaps it
        self.engine.stop()
        self.engine = None


class VLLMSampler:
    """The ``Sampler`` backed by vLLM (see the module docstring).

    ``config`` gives the lengths (the engine's ``max_model_len`` is max_prompt_length +
    max_completion_length), the seed, and ``vllm_kv_cache_gib`` where it has one; ``model`` is the
    policy: its source directory is what the engine loads, its dtype the engine's, and a peft model
    makes the engine serve LoRA adapters of its rank. Options:

    - ``python``: the vLLM environment's interpreter (default $GRPO_VLLM_PYTHON, else .venv-vllm)
    - ``url``: a running ``vllm_server.py`` to use instead of starting one (default
      $GRPO_VLLM_URL; its model and lengths are its own: it must serve this policy's base model)
    - ``model_dir``: what the engine loads, if not the policy's own source
    - ``kv_cache_gib``: memory for the KV cache; ``threads``: the engine's CPU threads (default
      the trainer's count); ``dtype``: the engine's (default the policy's); ``enforce_eager``
    - ``max_lora_rank``: serve LoRA adapters up to this rank even for a plain policy (other
      samplers may then share the engine through ``url``)
    - ``upload``: send weights over HTTP rather than by path (default: only with ``url``)
    - ``sleep``: let the engine sleep between generations where its platform can (default
      ``config.vllm_sleep``, else off); never a server given by ``url``, which may serve others
    - ``startup_timeout_s``, ``request_timeout_s``, ``work_dir`` (default a temporary directory)

    ``sleep_level`` is what the engine sleeps at after each generation: 0 (never: no sleep mode
    here, or turned off), 1 (a LoRA policy) or 2 (full weights); ``asleep`` the memory it holds
    asleep now (``"weights"``, ``"kv_cache"``).
    """

    def __init__(
        self,
        config: GRPOConfig,
        model: torch.nn.Module,
        *,
        python: str | os.PathLike | None = None,
        url: str | None = None,
        model_dir: str | os.PathLike | None = None,
        kv_cache_gib: float | None = None,
        threads: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool = False,
        max_lora_rank: int | None = None,
        upload: bool | None = None,
        sleep: bool | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 3600.0,
        work_dir: str | os.PathLike | None = None,
    ):
        url = url or os.environ.get(URL_ENV) or None
        self.max_model_len = config.max_prompt_length + config.max_completion_length
        self.kv_cache_gib = float(
            kv_cache_gib or getattr(config, "vllm_kv_cache_gib", None) or DEFAULT_KV_CACHE_GIB
        )
        self.upload = url is not None if upload is None else upload
        self.uses_lora = lora_rank(model) > 0
        self.lora_name = f"policy-{uuid.uuid4().hex[:12]}" if self.uses_lora else None
        self.lora_loaded = False  # no adapter until the first sync: the base model samples
        self.syncs = 0
        self._lora_dir: Path | None = None  # the adapter the engine serves, kept while it does
        self.sleep_level = 0
        self.asleep: set[str] = set()
        self._policy = model  # level 2 without a push yet: what the dropped weights are reloaded from
        self._weights_dir: Path | None = None  # level 2: the last full weights pushed, kept to reload
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="grpo-vllm-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if url is not None:
            self.client = EngineClient(url, timeout_s=request_timeout_s)
            health = self.client.request("GET", "/health", timeout=30)
            if health["max_model_len"] < self.max_model_len:
                raise VLLMEngineError(
                    f"the vLLM server at {url} serves sequences up to {health['max_model_len']} tokens, "
                    f"this run needs max_prompt_length + max_completion_length = {self.max_model_len}"
                )
            self.max_model_len = health["max_model_len"]
            return
        args = [
            "--model",
            str(model_dir or model_source(model)),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            dtype or dtype_name(model),
            "--seed",
            str(config.seed),
            "--kv-cache-gib",
            str(self.kv_cache_gib),
            "--max-lora-rank",
            str(max(lora_rank(model), max_lora_rank or 0)),
            "--threads",
            str(threads or torch.get_num_threads()),
            *(["--enforce-eager"] if enforce_eager else []),
            *startup_memory_args(model),
        ]
        wants_sleep = getattr(config, "vllm_sleep", False) if sleep is None else sleep
        if wants_sleep:
            args.append("--sleep-mode")  # the server turns it on only where vLLM's platform has it
        try:
            self.client = EngineClient.start(
                vllm_python(python),
                args,
                self.work_dir,
                startup_timeout_s=startup_timeout_s,
                timeout_s=request_timeout_s,
                kv_cache_setting=(KV_CACHE_SETTING, self.kv_cache_gib),
            )
        except EngineStartError as exc:
            self._remove_work_dir()
            raise start_error(exc, self.kv_cache_gib, self.max_model_len) from None
        except BaseException:
            self._remove_work_dir()
            raise
        if wants_sleep and self.client.engine.ready.get("can_sleep"):
            self.sleep_level = 1 if self.uses_lora else 2

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def engine(self) -> EngineProcess | None:
        """The engine this sampler started; None for a server given by ``url``."""
        return self.client.engine

    # --- the Sampler protocol ---------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[torch.Tensor],
        *,
        group_size: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_id: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        group_seeds: Sequence[int] | None = None,
    ) -> Rollout:
        """``group_size`` completions of each prompt (a prompt's adjacent), each up to and
        including its EOS; ``pad_id`` is unused (nothing is padded). Prompt b's completions draw
        from ``group_seeds[b]`` + j where given, else from seed + b * group_size + j, the seed
        drawn from ``generator``."""
        longest = max(p.shape[0] for p in prompt_ids)
        if longest + max_new_tokens > self.max_model_len:  # vLLM would cut the completion short
            raise ValueError(
                f"a {longest}-token prompt and {max_new_tokens} new tokens exceed the engine's "
                f"{self.max_model_len}-token sequences (max_prompt_length + max_completion_length)"
            )
        seed = None
        if group_seeds is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        self._wake_for_generation()
        answer = self.client.request(
            "POST",
            "/generate",
            {
                "prompts": [p.tolist() for p in prompt_ids],
                "n": group_size,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "stop_token_ids": list(eos_token_ids),
                "seed": seed,
                "seeds": None if group_seeds is None else [int(s) % 2**62 for s in group_seeds],
                "lora": self.lora_name if self.lora_loaded else None,
            },
        )
        self._sleep()  # the trainer's forward and backward passes come next
        completions = [c for group in answer["completions"] for c in group]  # B*G, prompt-major
        extra: dict[str, Any] = {}
        if ROLLOUT_HAS_SAMPLER_LOGPROBS and temperature != 0:  # greedy has no sampling distribution
            extra["sampler_logprobs"] = [
                torch.tensor(c["logprobs"], dtype=torch.float32) for c in completions
            ]
        return Rollout(
            prompt_ids=[p.cpu() for p in prompt_ids],
            completion_ids=[torch.tensor(c["token_ids"], dtype=torch.long) for c in completions],
            truncated=torch.tensor([c["finish_reason"] == "length" for c in completions]),
            **extra,
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights to the engine: a peft model's adapter under a new LoRA id,
        else the full weights as ``save_pretrained`` writes them (the engine resets its prefix
        cache either way). An engine asleep wakes its weights for the load, not yet its KV cache
        (the next generation does)."""
        self.syncs += 1
        target = self.work_dir / f"sync-{self.syncs}"
        try:
            model.save_pretrained(target, safe_serialization=True)  # a peft model: the adapter only
            # level 1: the base weights come back from host memory, for the adapter to go with;
            # level 2: their memory, uninitialized, which the load below fills whole
            self._wake("weights")
            if self.uses_lora:
                self.client.request(
                    "POST", "/load_lora", {"name": self.lora_name, "path": self._shipped(target)}
                )
                self.lora_loaded = True
                # vLLM may read the adapter it serves from disk again: the previous one goes now
                if self._lora_dir is not None:
                    shutil.rmtree(self._lora_dir, ignore_errors=True)
                self._lora_dir, target = target, None
            else:
                for extra in target.iterdir():  # configs: the engine reloads weights, not the model
                    if extra.suffix != ".safetensors":
                        extra.unlink()
                self.client.request("POST", "/load_weights", {"path": self._shipped(target)})
                if self.sleep_level == 2:  # kept: a generation with no push since a sleep reloads them
                    previous, self._weights_dir, target = self._weights_dir, target, None
                    if previous is not None:
                        shutil.rmtree(previous, ignore_errors=True)
        finally:
            if target is not None:  # copied into the engine, or failed
                shutil.rmtree(target, ignore_errors=True)

    def close(self) -> None:
        """Stop the engine this sampler started (a server given by ``url`` keeps running)."""
        self.client.close()
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
        self._remove_work_dir()

    # --- sleep --------------------------------------------------------------------------------

    def _sleep(self) -> None:
        """After a generation: the engine gives its device memory back until the next push or
        generation (nothing where it cannot sleep)."""
        if self.sleep_level and not self.asleep:
            answer = self.client.request("POST", "/sleep", {"level": self.sleep_level})
            self.asleep = set(answer["sleeping"])

    def _wake(self, *tags: str) -> None:
        """Take back the memory of those of ``tags`` asleep."""
        wanted = [tag for tag in tags if tag in self.asleep]
        if wanted:
            if torch.cuda.is_available():  # the blocks this process's allocator keeps cached after
                torch.cuda.empty_cache()  # training: the engine cannot take them back otherwise
            answer = self.client.request("POST", "/wake_up", {"tags": wanted})
            self.asleep = set(answer["sleeping"])

    def _wake_for_generation(self) -> None:
        """Wake the engine for a generation: its weights where no push woke them since it slept
        (an evaluation, or a dynamic-sampling round, right after a generation), then its KV cache.
        Level 1: both in one call. Level 2 discarded the weights: they are loaded again first, the
        last pushed (kept for this) or, before any push, the policy's, which are the engine's (a
        push follows every optimizer step)."""
        if "weights" in self.asleep and self.sleep_level == 2:
            if self._weights_dir is not None:
                self._wake("weights")
                self.client.request("POST", "/load_weights", {"path": str(self._weights_dir)})
            else:
                self.sync(self._policy)  # keeps what it pushed in _weights_dir
        self._wake("weights", "kv_cache")

    # --- plumbing -----------------------------------------------------------------------------

    def _shipped(self, directory: Path) -> str:
        """The path under which the engine reads ``directory``: the path itself when it shares
        this disk, else where the server stored an upload of its files."""
        if not self.upload:
            return str(directory)
        stored = ""
        for file in sorted(directory.iterdir()):
            answer = self.client.request("PUT", f"/files/{directory.name}/{file.name}", file.read_bytes())
            stored = str(Path(answer["path"]).parent)
        return stored

    def _remove_work_dir(self) -> None:
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
