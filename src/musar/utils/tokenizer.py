"""Offline tokenizers for tiny models (tests, the ``tiny`` preset, the toy world).

The real FLUX tokenizers come with the checkpoint. Tiny models need tokenizers that can be built
without any download, yet behave like the real ones where MUSAR depends on it: they are *fast*
tokenizers (character offsets for subject spans), pad to a fixed length and end with ``</s>``
like T5.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "</s>", "<unk>")


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def train_unigram_tokenizer(
    corpus: Iterable[str], vocab_size: int = 256, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Metaspace + Unigram) tokenizer, like T5's, trained on ``corpus``."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token="<unk>")
    tok.train_from_iterator(list(corpus), trainer)
    return _wrap(tok, model_max_length)


def word_level_tokenizer(words: Iterable[str], model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """One token per lower-cased word or punctuation mark; unknown words map to ``<unk>``."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok, model_max_length)
