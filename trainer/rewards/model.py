"""The ``reward_model`` reward: a sequence-classification model scores prompt + completion.

torch and transformers are imported when the model is loaded, never when this module is, so
that the service can validate reward specs without them.
"""

from __future__ import annotations

from typing import Any

from trainer.config import DTYPES
from trainer.errors import ModelLoadError
from trainer.rewards.base import Option, RewardType, Scores


class RewardModel:
    """Loads the model once; each call scores the batch in chunks of ``batch_size``.

    The score is the logit when the model has one label, else the softmax probability of
    ``label_index``. Texts are right-padded (the model reads its last real token) and truncated
    from the left to ``max_length`` tokens, so the end of the completion is always seen.
    """

    def __init__(self, spec: dict[str, Any], *, device: Any = "cpu", param: str = "reward"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from trainer.model import NO_HUB_KERNELS

        self.batch_size = spec["batch_size"]
        self.max_length = spec["max_length"]
        self.label_index = spec["label_index"]
        self.device = torch.device(device)  # a name ("cuda:0") or a torch.device: the trainer's
        dtype = spec["dtype"] if spec["dtype"] == "auto" else getattr(torch, spec["dtype"])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec["model"])
            self.model = AutoModelForSequenceClassification.from_pretrained(
                spec["model"], dtype=dtype, **NO_HUB_KERNELS
            )
        except Exception as exc:
            raise ModelLoadError(
                f"{param}.model: cannot load the reward model {spec['model']!r} ({exc}); give a "
                "local directory or hub id of a sequence-classification model"
            ) from exc
        num_labels = self.model.config.num_labels
        if num_labels > 1 and not 0 <= self.label_index < num_labels:
            raise ModelLoadError(
                f"{param}.label_index: the reward model has {num_labels} labels; "
                f"choose label_index from 0 to {num_labels - 1}"
            )
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # Sequence-classification heads find each row's last real token through pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> Scores:
        import torch

        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        scores: Scores = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits.float()  # [B, num_labels]
                if logits.shape[-1] == 1:
                    values = logits[:, 0]  # [B]
                else:
                    values = logits.softmax(dim=-1)[:, self.label_index]  # [B]
                scores.extend(values.tolist())
        return scores

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


REWARD_MODEL = RewardType(
    summary="a sequence-classification model's score of prompt + completion",
    options={
        "model": Option("string", example='"/models/my-reward-model" or a hub id'),
        "batch_size": Option("integer", 16, minimum=1),
        "max_length": Option("integer", 1024, minimum=1),
        "label_index": Option("integer", 1, minimum=0),
        "dtype": Option("string", "auto", choices=DTYPES),
    },
    build=lambda spec, *, device="cpu", param="reward", **_: RewardModel(spec, device=device, param=param),
)
