"""lmms-eval plug-in: evaluate a Dynamic-LLaVA checkpoint on any lmms-eval task.

    pip install "dynamic-llava[lmms-eval]"
    python -m lmms_eval --model dynamic_llava \\
        --model_args pretrained=path/to/checkpoint,image_keep_rate=0.2,batch_size=8 --tasks pope

The model registers through lmms-eval's ``lmms_eval.models`` entry points (`manifest`). Sparsity settings
come through ``model_args`` (``image_keep_rate``, ``text_keep_rate``, ``dense=True`` for keep rates 1.0);
the tokens kept are summed over the run and logged at its end (`DynamicLlavaLMMS.sparsity_totals`).
"""

from __future__ import annotations

import logging

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from ..stats import SparsityStats

logger = logging.getLogger(__name__)
CLASS_PATH = "dynamic_llava.integrations.lmms_eval.DynamicLlavaLMMS"


def manifest():
    """The `ModelManifest` lmms-eval loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="dynamic_llava", simple_class_path=CLASS_PATH, aliases=("dynamic-llava",))


class DynamicLlavaLMMS(lmms):
    """A checkpoint of any supported family (`dynamic_llava.from_pretrained`) behind lmms-eval's `lmms` interface
    (images + text in, text out)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size: int = 1,
                 image_keep_rate: float | None = None, text_keep_rate: float | None = None, dense: bool = False,
                 max_new_tokens: int = 128, use_cache: bool = True, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"dynamic_llava model_args: unknown {', '.join(sorted(unknown))}; known: pretrained, device, dtype, "
                "batch_size, image_keep_rate, text_keep_rate, dense, max_new_tokens, use_cache."
            )
        from transformers import AutoProcessor

        from ..auto import model_class_for

        settings = {"image_keep_rate": 1.0, "text_keep_rate": 1.0} if dense else {}
        for name, value in (("image_keep_rate", image_keep_rate), ("text_keep_rate", text_keep_rate)):
            if value is not None:
                if dense:
                    raise ValueError(f"dynamic_llava model_args: dense=True and {name} exclude each other.")
                settings[name] = float(value)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if self._device.type == "cuda" else torch.float32)
        self._model = model_class_for(pretrained).from_pretrained(pretrained, dtype=torch_dtype, **settings)
        self._model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens, self.use_cache = int(max_new_tokens), bool(use_cache)
        self.sparsity_totals = {"samples": 0, "image_tokens": 0, "image_tokens_kept": 0, "generated_tokens": 0,
                                "generated_tokens_kept": 0}

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat prompt: images where the context has ``<image>``, else before the text (LLaVA-1.5)."""
        if n_images and "<image>" in context:
            content = []
            for i, part in enumerate(context.split("<image>")):
                if i:
                    content.append({"type": "image"})
                if part.strip("\n"):
                    content.append({"type": "text", "text": part.strip("\n")})
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not all(hasattr(v, "convert") for v in visuals):
            raise ValueError(f"{task}: dynamic_llava takes images (PIL); this task gives {type(visuals[0]).__name__}.")
        return [v.convert("RGB") for v in visuals]

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, if the task asks) answers in batches of `batch_size` requests that share their
        generation settings, cut at the task's stop strings; returned in the order of `requests`."""
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for index, a in enumerate(args):
            groups.setdefault(repr(sorted(a[1].items())), []).append(index)
        batches = [ids[i : i + self.batch_size] for ids in groups.values() for i in range(0, len(ids), self.batch_size)]
        results: list[str | None] = [None] * len(args)
        for batch in tqdm(batches, desc="dynamic_llava", disable=len(batches) < 2):
            for index, reply in zip(batch, self._generate([args[i] for i in batch])):
                results[index] = reply
        self._log_totals()
        return results

    def _generate(self, chunk) -> list[str]:
        visuals = [self._visuals(v, i, t, s) for _, _, v, i, t, s in chunk]
        texts = [self._prompt(c, len(v)) for (c, *_), v in zip(chunk, visuals)]
        images = [img for v in visuals for img in v]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self._device)
        gen = dict(chunk[0][1])
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.pop("temperature", 0) or 0)
        options = {"max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens)),
                   "do_sample": temperature > 0, "use_cache": self.use_cache}
        if temperature > 0:
            options.update(temperature=temperature, top_p=gen.pop("top_p", None) or 1.0)
        if gen.get("num_beams"):
            options["num_beams"] = int(gen["num_beams"])
        stats = SparsityStats()
        with torch.no_grad():
            out = self._model.generate(**inputs, **options, sparsity_stats=stats,
                                       pad_token_id=self.processor.tokenizer.pad_token_id)
        replies = []
        for reply in self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True):
            for stop in until:
                if stop and stop in reply:
                    reply = reply.split(stop, 1)[0]
            replies.append(reply.strip())
        self._count(stats, len(chunk))
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (and whether greedy decoding gives it); the
        image tokens are pruned as in generation, the text is never pruned (it is prompt, not generated)."""
        results = []
        tokenizer = self.processor.tokenizer
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(visuals))
            inputs = self.processor(text=[prompt], images=visuals or None, return_tensors="pt").to(self._device)
            cont = torch.tensor([tokenizer(continuation, add_special_tokens=False).input_ids], device=self._device)
            ids = torch.cat([inputs["input_ids"], cont], dim=1)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                out = self._model(input_ids=ids, attention_mask=mask, pixel_values=inputs.get("pixel_values"))
            positions = (torch.arange(ids.shape[1], device=ids.device) if out.kept_index is None
                         else out.kept_index[0])
            row = {int(p): j for j, p in enumerate(positions.tolist())}
            start = inputs["input_ids"].shape[1]
            logits = torch.stack([out.logits[0, row[p - 1]] for p in range(start, ids.shape[1])]).float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = cont[0]
            results.append((float(logp.gather(1, targets[:, None]).sum()), bool((logits.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dynamic_llava does not run lmms-eval's multi-round tasks yet.")

    def _count(self, stats: SparsityStats, n: int) -> None:
        totals = self.sparsity_totals
        totals["samples"] += n
        for name, value in (("image_tokens", stats.image_tokens), ("image_tokens_kept", stats.image_tokens_kept),
                            ("generated_tokens", stats.generated_tokens),
                            ("generated_tokens_kept", stats.generated_tokens_kept)):
            if value is not None:
                totals[name] += int(value.sum())

    def _log_totals(self) -> None:
        t = self.sparsity_totals
        if t["image_tokens"]:
            logger.warning(  # lmms-eval shows warnings by default: the savings belong next to the scores
                f"dynamic_llava: {t['samples']} samples, image tokens kept {t['image_tokens_kept']} / {t['image_tokens']}"
                f" ({t['image_tokens_kept'] / t['image_tokens']:.1%}), generated tokens kept "
                f"{t['generated_tokens_kept']} / {t['generated_tokens']}"
            )


__all__ = ["CLASS_PATH", "DynamicLlavaLMMS", "manifest"]
