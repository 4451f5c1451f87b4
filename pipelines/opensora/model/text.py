"""Open-Sora 1.2 prompt handling (OPENSORA.md 1.7): the aesthetic-score suffix, PixArt caption cleaning
applied twice, T5 with 300 tokens padded to max_length and the mask kept.

The cleaning routine is diffusers' own (`PixArtSigmaPipeline._clean_caption`, which needs `bs4` and `ftfy`);
without those packages the prompt is lower-cased and stripped, as diffusers' PixArt pipelines do, with a
warning (the text then differs from the reference's for prompts with URLs, HTML or odd punctuation).
"""

from __future__ import annotations

import logging

import torch

MAX_SEQUENCE_LENGTH = 300
DEFAULT_AESTHETIC_SCORE = 6.5

logger = logging.getLogger(__name__)
_warned: list[bool] = []  # warn once per process about the missing cleaning packages


def with_scores(prompt: str, aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE) -> str:
    """`"{prompt} aesthetic score: 6.5."` (one decimal; the reference config's aes=6.5). None, or a prompt
    that already names an aesthetic score, leaves the prompt alone (as the reference does)."""
    if aesthetic_score is None or "aesthetic score:" in prompt:
        return prompt
    return f"{prompt} aesthetic score: {aesthetic_score:.1f}."


def cleaning_available() -> bool:
    try:
        import bs4  # noqa: F401
        import ftfy  # noqa: F401
    except ImportError:
        return False
    return True


class _Cleaner:
    """A host for diffusers' PixArt `_clean_caption` (it reads `self.bad_punct_regex`)."""

    def __init__(self):
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline

        self.bad_punct_regex = PixArtSigmaPipeline.bad_punct_regex
        self._clean = PixArtSigmaPipeline._clean_caption

    def __call__(self, text: str) -> str:
        return self._clean(self, text)


def clean_prompt(text: str, clean_caption: bool = True) -> str:
    """PixArt cleaning twice (as the reference), or lower().strip() when off or unavailable."""
    if clean_caption and cleaning_available():
        cleaner = _Cleaner()
        return cleaner(cleaner(text))
    if clean_caption and not _warned:
        _warned.append(True)
        logger.warning("Open-Sora caption cleaning needs bs4 and ftfy; using lower().strip() instead")
    return text.lower().strip()


def encode_prompts(
    prompts: list[str], tokenizer, text_encoder, device, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE, clean_caption: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (T5 last_hidden_state (n, L, d), attention mask (n, L) long), L = max_sequence_length."""
    texts = [clean_prompt(with_scores(p, aesthetic_score), clean_caption) for p in prompts]
    tokens = tokenizer(
        texts, max_length=max_sequence_length, padding="max_length", truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return embeds, mask
