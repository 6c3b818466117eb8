"""The VLM wrapper (`Vlm`: chat prompts, batched next-token log-probabilities, a shared-prefix KV cache,
greedy generation), option scoring from log-probabilities (`option_probabilities`) and a tiny real LLaVA
for tests and benchmarks (`save_tiny_vlm`).

Pictures are RGB uint8 HWC; log-probabilities are float32 tensors [N, vocab] on the CPU. Imports no
sibling module.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engines.models import bytes_to_unicode

SHARED_PREFIX_TYPES = ("llava", "llava_next", "idefics3", "smolvlm")


def option_probabilities(logprobs, token_groups: list[list[int]]) -> list[float]:
    """Normalised probability of each option from next-token log-probabilities: an option's mass is the
    sum of exp(logprob) over its token ids; the masses are divided by their total."""
    import torch

    row = torch.as_tensor(logprobs, dtype=torch.float32)
    mass = torch.stack([torch.logsumexp(row[list(ids)], dim=0) for ids in token_groups])
    return torch.softmax(mass, dim=0).tolist()


# ----------------------------------------------------------------------------------------------
# The VLM wrapper: prompt formatting, batched next-token log-probabilities, generation


class Vlm:
    """An image-text-to-text model and its processor (left padding), with the three things we ask of it."""

    def __init__(self, model, processor, device: str):
        self.model, self.processor, self.device = model, processor, device
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("The model's processor has no tokenizer; it cannot be prompted.")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(processor, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("The model's processor has no chat template, so the question cannot be formatted for it.")
        self._first: dict = {}
        self.prefix_cache = True  # False: every yes/no question runs in full (a check and a benchmark baseline)
        import inspect

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"

    def prompt(self, question: str) -> str:
        """The chat-formatted user turn (one image, then the question) with the assistant turn opened."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def conversation(self, question: str, answer: str) -> tuple[str, str]:
        """(prompt, prompt + answer + end-of-turn) for training: the answer tokens are the label."""
        prompt = self.prompt(question)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = self.processor.apply_chat_template(conversation, add_generation_prompt=False)
        if not full.startswith(prompt):  # templates that render the assistant turn differently: append by hand
            full = prompt + answer + (self.tokenizer.eos_token or "")
        return prompt, full

    def inputs(self, texts: list[str], pictures: list[np.ndarray]):
        from PIL import Image

        batch = self.processor(text=texts, images=[Image.fromarray(np.ascontiguousarray(p)) for p in pictures],
                               return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    def next_token_logprobs(self, prompts: list[str], pictures: list[np.ndarray]):
        """log-softmax of the next-token logits after each prompt (left padding: the last position)."""
        import torch

        logits = self.model(**self.inputs(prompts, pictures)).logits[:, -1, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @property
    def shared_prefix(self) -> bool:
        """Whether the yes/no questions of one picture may share the KV cache of their common prefix (model
        types whose positions follow the cache; Qwen2-VL's M-RoPE and PaliGemma's prefix attention do not)."""
        inner = getattr(self.model, "base_model", self.model)
        config = getattr(getattr(inner, "model", inner), "config", None) or getattr(self.model, "config", None)
        return getattr(config, "model_type", "") in SHARED_PREFIX_TYPES and self.prefix_cache

    def shared_prefix_logprobs(self, prompts: list[str], picture: np.ndarray):
        """Next-token log-softmax after each prompt, all about one picture: the prompts' common token prefix
        (question, options, image) runs once with a KV cache, then the differing tails run as one right-padded
        batch on copies of that cache. Equal to `next_token_logprobs(prompts, [picture] * n)`."""
        import torch

        n = len(prompts)
        inputs = self.inputs(prompts, [picture] * n)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        rows = [ids[i][mask[i]] for i in range(n)]
        shortest = min(len(r) for r in rows)
        same = (torch.stack([r[:shortest - 1] for r in rows]) == rows[0][:shortest - 1]).all(dim=0)
        common = int(same.long().cumprod(0).sum())
        extra = {k: v[:1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        prefix = rows[0][:common][None]
        out = self.model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **extra)
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(n)
        tails = [r[common:] for r in rows]
        width = max(len(t) for t in tails)
        tail_ids = torch.full((n, width), int(self.tokenizer.pad_token_id), dtype=ids.dtype, device=ids.device)
        tail_mask = torch.zeros((n, width), dtype=torch.long, device=ids.device)
        for i, t in enumerate(tails):
            tail_ids[i, :len(t)] = t
            tail_mask[i, :len(t)] = 1
        attention = torch.cat([torch.ones((n, common), dtype=torch.long, device=ids.device), tail_mask], dim=1)
        logits = self.model(input_ids=tail_ids, attention_mask=attention, use_cache=True, **{self._cache_arg: cache},
                            cache_position=torch.arange(common, common + width, device=ids.device)).logits
        last = tail_mask.sum(dim=1) - 1
        return torch.log_softmax(logits[torch.arange(n), last].float(), dim=-1).cpu()

    def first_tokens(self, groups: list[list[str]]) -> list[list[int]]:
        """The first token id of each spelling, per group; ids shared between groups are dropped."""
        key = tuple(tuple(g) for g in groups)
        if key not in self._first:
            ids = [{self._first_id(s) for s in g} - {None} for g in groups]
            shared = set().union(*[a & b for n, a in enumerate(ids) for b in ids[n + 1:]])
            clean = [sorted(g - shared) for g in ids]
            if any(not g for g in clean):
                raise ValueError("The tokenizer cannot tell the answer options apart by their first token.")
            self._first[key] = clean
        return self._first[key]

    def _first_id(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if ids else None

    def generate(self, prompts: list[str], pictures: list[np.ndarray], max_new_tokens: int) -> list[str]:
        inputs = self.inputs(prompts, pictures)
        out = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# A tiny real VLM for tests and benchmarks


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                      "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}</s>"
                      "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def save_tiny_vlm(folder: str | os.PathLike, seed: int = 0, *, hidden_size: int = 32, layers: int = 2,
                  image_size: int = 32) -> Path:
    """Write a tiny LLaVA (CLIP vision tower + Llama language model, random weights from `seed`) with a
    byte-level BPE tokenizer built offline and a plain chat template, loadable with
    AutoModelForImageTextToText / AutoProcessor. ~45k parameters at the defaults."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        additional_special_tokens=["<image>"])
    patch = max(4, image_size // 4)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="full", num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
