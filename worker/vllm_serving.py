"""Chat completions from vLLM: one engine per base model, many LoRA jobs' adapters served side by side.

With ``GRPO_INFERENCE_BACKEND=vllm`` the inference worker answers a LoRA job's checkpoint from an
engine running the job's base model (``trainer/generation/vllm_server.py``, a child process in
vLLM's own environment), the job's adapter loaded into it on first use under the name
``JOB_ID-step-N``. Every job fine-tuned from one base then shares one copy of its weights and one
KV cache, where the transformers path loads (and merges) a whole model per checkpoint and keeps
only ``GRPO_INFERENCE_MODELS`` of them. An engine keeps ``GRPO_INFERENCE_VLLM_MAX_LORAS`` adapters
(the least recently used is unloaded, and loaded again from its checkpoint when next asked for);
the worker keeps ``GRPO_INFERENCE_MODELS`` engines (base models), stopping the least recently used.

Full-model checkpoints stay on the transformers path. Each is a model of its own, so an engine for
it would share nothing: it would cost an engine start (a process, the weights, a KV cache reserved,
tens of seconds on a CPU) and that cache's memory per checkpoint, for what the warm transformers
model answers anyway. An adapter vLLM refuses (say a ``modules_to_save`` layer) is answered by the
transformers path too.

Answers are interchangeable with the transformers path's (``trainer.chat.generate_chat``): the
prompt is tokenized here with the checkpoint's tokenizer and chat template, the engine is sent
token ids, the same EOS ids (the tokenizer's and the base's generation config's), max_tokens
(within the same context), temperature and top_p (no top-k, no penalties), and what comes back is
cut and decoded by ``trainer.chat.finish``. Greedy answers equal transformers + peft's token for
token (fp32, ``tests/service/test_vllm_serving.py``); sampled ones come from the same distribution,
not the same draws (a seed still repeats an answer).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.settings import Settings
from trainer.config import ConfigError
from trainer.errors import ModelLoadError

if TYPE_CHECKING:
    from trainer.chat import Generation
    from trainer.generation.vllm import EngineClient
    from worker.inference import Source

log = logging.getLogger(__name__)

KV_CACHE_SETTING = "GRPO_INFERENCE_VLLM_KV_CACHE_GIB"
MIN_LORA_RANK = 16  # an engine's adapter slots hold at least this rank: one start serves the usual ranks


class AdapterRefused(Exception):
    """vLLM cannot serve this adapter (its engine is fine): the transformers path answers it."""


def check_vllm_environment() -> Path:
    """The interpreter of vLLM's environment (as the vLLM sampler finds it: $GRPO_VLLM_PYTHON, else
    this checkout's ``.venv-vllm``); ``RuntimeError`` saying how to get one when it is missing."""
    from trainer.generation.vllm import PYTHON_ENV, REPO_VENV_PYTHON

    python = Path(os.environ.get(PYTHON_ENV) or REPO_VENV_PYTHON)
    if not python.exists():
        raise RuntimeError(
            f"GRPO_INFERENCE_BACKEND=vllm needs vLLM's own environment, and {python} does not exist: "
            f"run `make vllm-setup` in the checkout, or set {PYTHON_ENV} to the python of an "
            "environment with vllm installed (or set GRPO_INFERENCE_BACKEND=hf)"
        )
    return python


def adapter_rank(directory: Path) -> int:
    """The largest LoRA rank in a peft adapter's ``adapter_config.json`` (``r`` and any per-layer
    ``rank_pattern``); ``AdapterRefused`` when it has none to read."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterRefused(f"no LoRA rank in {directory}/adapter_config.json ({exc})") from exc


def base_generation_config(base_model: str) -> Any:
    """The base model's generation config as ``from_pretrained`` sets it (its
    ``generation_config.json``, else one made from ``config.json``): it names EOS ids."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base_model)
    except OSError:
        return GenerationConfig.from_pretrained(
            base_model, config_file_name="config.json", _from_model_config=True
        )


def cut_at_stop(tokenizer: Any, ids: list[int], eos: list[int], stop: Sequence[str]) -> list[int]:
    """``ids`` up to the first token whose text completes a stop sequence (before any EOS): where
    transformers stops generating. The engine, token ids in and out, has no stop strings and
    generates on; cut here, ``finish`` then reads the same ids as on the transformers path."""
    end = next((i for i, token in enumerate(ids) if token in eos), len(ids))

    def stops_within(count: int) -> bool:
        text = tokenizer.decode(ids[:count], skip_special_tokens=True)
        return any(sequence in text for sequence in stop)

    if not stop or not stops_within(end):
        return ids
    low, high = 1, end  # holding a stop sequence only grows with the prefix
    while low < high:
        middle = (low + high) // 2
        if stops_within(middle):
            high = middle
        else:
            low = middle + 1
    return ids[:low]


def startup_memory_args(device: Any) -> list[str]:
    """``--gpu-memory-utilization`` for an engine started on ``device`` (none on a CPU): the share
    ``trainer.generation.vllm.startup_utilization`` gives from the memory free now. vLLM refuses to
    start unless 0.9 of the GPU is free by default, which it is not beside another engine, the
    warm transformers checkpoints or a training worker on the same GPU; the engine's own memory
    is sized by GRPO_INFERENCE_VLLM_KV_CACHE_GIB. This process's freed blocks are given back first."""
    import torch

    from trainer.generation.vllm import startup_utilization

    if device.type != "cuda":
        return []
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return ["--gpu-memory-utilization", str(startup_utilization(free, total))]


@dataclass
class ServedAdapter:
    key: tuple[str, ...]  # the checkpoint version loaded under the adapter's name
    tokenizer: Any  # the checkpoint's own, as the transformers path loads it


class BaseEngine:
    """One ``vllm_server.py`` child serving ``base_model`` with LoRA slots of ``max_lora_rank``,
    and the adapters loaded into it, most recently used last."""

    def __init__(
        self,
        base_model: str,
        *,
        max_lora_rank: int,
        settings: Settings,
        threads: int,
        python: Path,
        startup_timeout_s: float,
        request_timeout_s: float,
    ):
        from trainer.generation.vllm import EngineClient, EngineStartError
        from trainer.generation.vllm_server import lora_rank_slot
        from trainer.model import default_device, resolve_dtype

        self.base_model = base_model
        self.max_loras = settings.inference_vllm_max_loras
        self.adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self.generation_config = base_generation_config(base_model)
        kv_cache_gib = settings.inference_vllm_kv_cache_gib
        device = default_device()
        dtype = resolve_dtype("auto", device)  # as the transformers path loads it
        args = [
            *("--model", base_model),
            *("--max-model-len", "-1"),  # the model's context, or what the KV cache holds if less
            *("--dtype", str(dtype).removeprefix("torch.")),
            *("--kv-cache-gib", str(kv_cache_gib)),
            *("--max-lora-rank", str(lora_rank_slot(max(max_lora_rank, MIN_LORA_RANK)))),
            *("--max-loras", str(self.max_loras)),
            *("--threads", str(threads)),
            *startup_memory_args(device),
        ]
        self.work_dir = Path(tempfile.mkdtemp(prefix="grpo-serving-"))
        self.client: EngineClient | None = None
        try:
            # no KV-cache setting to name: a killed engine is a VLLMEngineError, restarted when next asked
            self.client = EngineClient.start(
                python, args, self.work_dir, startup_timeout_s=startup_timeout_s, timeout_s=request_timeout_s
            )
            health = self.request("GET", "/health")
        except EngineStartError as exc:
            self.close()
            # vLLM's own advice (gpu_memory_utilization) does not apply: this setting sizes the cache
            hint = {
                "kv_cache": f": its KV cache ({KV_CACHE_SETTING} = {kv_cache_gib:g} GiB) is too "
                f"small; raise {KV_CACHE_SETTING}",
                "memory": f": out of memory with {KV_CACHE_SETTING} = {kv_cache_gib:g} GiB; lower "
                f"{KV_CACHE_SETTING} or free memory on the machine",
            }.get(exc.kind, "")
            raise ModelLoadError(
                f"the vLLM engine for {base_model} failed to start{hint} (vLLM: {exc.reason})"
            ) from None
        except BaseException:
            self.close()
            raise
        self.max_model_len = int(health["max_model_len"])
        self.max_lora_rank = int(health["max_lora_rank"])

    def serve(self, name: str, source: Source) -> ServedAdapter:
        """The adapter ``name`` as ``source`` has it, loaded if it is not (or an older version
        is); the least recently used one unloaded when the engine holds ``max_loras``."""
        from trainer.generation.vllm import VLLMEngineError
        from trainer.model import load_tokenizer

        served = self.adapters.get(name)
        if served is not None and served.key == source.key:
            self.adapters.move_to_end(name)
            return served
        tokenizer = load_tokenizer(source.directory)
        while name not in self.adapters and len(self.adapters) >= self.max_loras:
            evicted, _ = self.adapters.popitem(last=False)
            self.request("POST", "/unload_lora", {"name": evicted})
            log.info(
                "unloaded adapter %s from %s (GRPO_INFERENCE_VLLM_MAX_LORAS=%d)",
                evicted,
                self.base_model,
                self.max_loras,
            )
        try:
            self.request("POST", "/load_lora", {"name": name, "path": str(source.directory)})
        except VLLMEngineError as exc:
            if not self.running():
                raise
            # an older version it served stays loaded where the load failed: not served any more
            self.adapters.pop(name, None)
            self.request("POST", "/unload_lora", {"name": name})
            raise AdapterRefused(str(exc)) from exc
        self.adapters[name] = ServedAdapter(key=source.key, tokenizer=tokenizer)
        self.adapters.move_to_end(name)
        log.info(
            "loaded checkpoint %s from %s as adapter %s of %s",
            "/".join(source.key[:2]),
            source.directory,
            name,
            self.base_model,
        )
        return self.adapters[name]

    def generate_chat(
        self,
        name: str,
        tokenizer: Any,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        n: int,
        stop: Sequence[str],
        seed: int | None,
    ) -> Generation:
        """``trainer.chat.generate_chat``'s answer, from adapter ``name`` on this engine."""
        from trainer.chat import Generation, chat_prompt_ids, finish
        from trainer.model import eos_token_ids

        prompt = chat_prompt_ids(tokenizer, messages)
        if not prompt:
            raise ConfigError("messages", "the messages make an empty prompt; give some content")
        if len(prompt) >= self.max_model_len:
            raise ConfigError(
                "messages",
                f"the prompt is {len(prompt)} tokens; this model reads at most {self.max_model_len} "
                "(prompt and completion together); send shorter messages",
            )
        max_new_tokens = min(max_tokens, self.max_model_len - len(prompt))
        eos = eos_token_ids(self, tokenizer)  # reads self.generation_config, as a model's
        answer = self.request(
            "POST",
            "/generate",
            {
                "prompts": [prompt],
                "n": n,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "stop_token_ids": eos,
                "seed": seed,
                "lora": name,
            },
        )
        [completions] = answer["completions"]
        return Generation(
            choices=[
                finish(
                    tokenizer, cut_at_stop(tokenizer, c["token_ids"], eos, stop), eos, stop, max_new_tokens
                )
                for c in completions
            ],
            prompt_tokens=len(prompt),
        )

    def running(self) -> bool:
        return self.client is not None and self.client.running()

    def request(self, method: str, route: str, body: dict | None = None) -> dict:
        """The engine's JSON answer (``EngineClient.request``)."""
        assert self.client is not None, "the engine is closed"
        return self.client.request(method, route, body)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        shutil.rmtree(self.work_dir, ignore_errors=True)


class VLLMServing:
    """The engines of one inference worker: the ``GRPO_INFERENCE_MODELS`` base models used most
    recently, each its own ``BaseEngine``. Not thread-safe: the inference worker answers one
    request at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        threads: int | None = None,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 600.0,
    ):
        self.settings = settings
        self.python = check_vllm_environment()
        self.threads = threads
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.engines: OrderedDict[str, BaseEngine] = OrderedDict()
        self.refused: set[tuple[str, ...]] = set()  # checkpoint versions vLLM could not load
        self.starts = 0

    def generate_chat(self, source: Source, request: dict[str, Any]) -> Generation:
        """The answer to ``request`` from the LoRA checkpoint ``source`` (``base_model`` set);
        ``AdapterRefused`` when vLLM cannot serve it, ``ModelLoadError`` when its engine failed."""
        from trainer.generation.vllm import VLLMEngineError

        assert source.base_model is not None
        if source.key in self.refused:
            raise AdapterRefused(f"vLLM refused {source.directory} before")
        name = f"{source.key[0]}-step-{source.key[1]}"
        engine = self.engine(source.base_model, adapter_rank(source.directory))
        try:
            served = engine.serve(name, source)
            return engine.generate_chat(
                name,
                served.tokenizer,
                request["messages"],
                max_tokens=int(request["max_tokens"]),
                temperature=float(request["temperature"]),
                top_p=float(request["top_p"]),
                n=int(request["n"]),
                stop=list(request["stop"]),
                seed=request.get("seed"),
            )
        except AdapterRefused:
            self.refused.add(source.key)
            raise
        except VLLMEngineError as exc:
            if not engine.running():  # the next request starts it again
                self.stop(source.base_model)
            raise ModelLoadError(str(exc)) from exc

    def engine(self, base_model: str, rank: int) -> BaseEngine:
        """The running engine of ``base_model`` whose slots hold ``rank``: started (or restarted
        with larger slots) if there is none; the least recently used stopped past the capacity."""
        import torch

        from trainer.generation.vllm import VLLMEngineError

        engine = self.engines.get(base_model)
        if engine is not None and engine.running() and engine.max_lora_rank >= rank:
            self.engines.move_to_end(base_model)
            return engine
        if engine is not None:
            rank = max(rank, engine.max_lora_rank)
            log.info("restarting the vLLM engine of %s for LoRA rank %d", base_model, rank)
            self.stop(base_model)
        while len(self.engines) >= self.settings.inference_models:
            self.stop(next(iter(self.engines)))
        try:
            engine = BaseEngine(
                base_model,
                max_lora_rank=rank,
                settings=self.settings,
                threads=self.threads or torch.get_num_threads(),
                python=self.python,
                startup_timeout_s=self.startup_timeout_s,
                request_timeout_s=self.request_timeout_s,
            )
        except (VLLMEngineError, OSError) as exc:  # OSError: no config to read in base_model
            raise ModelLoadError(f"no vLLM engine for {base_model}: {exc}") from exc
        self.starts += 1
        self.engines[base_model] = engine
        log.info(
            "started a vLLM engine for %s (%d running; LoRA rank up to %d, %d adapters, %d-token context)",
            base_model,
            len(self.engines),
            engine.max_lora_rank,
            engine.max_loras,
            engine.max_model_len,
        )
        return engine

    def stop(self, base_model: str) -> None:
        engine = self.engines.pop(base_model, None)
        if engine is not None:
            engine.close()
            log.info("stopped the vLLM engine of %s", base_model)

    def close(self) -> None:
        for base_model in list(self.engines):
            self.stop(base_model)
