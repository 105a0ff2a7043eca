"""Tiny randomly initialised models of every supported family, built in memory (no downloads).

They share one tiny word-level tokenizer, so prompts like "the capital of france is"
and answers like "paris" tokenise to whole words.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dkn.models import LoadedModel, wrap_model

WORDS = (
    "the capital of france is paris germany berlin italy rome spain madrid city country a an "
    "and in on it was new york london tokyo red blue green sky grass sea sun moon king queen"
).split()


def _sizes(**own) -> dict:
    """The config keywords most families name alike (width 32, 3 layers, 4 heads, 64 positions), plus `own`."""
    return dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, **own)


GROUPED_QUERY = dict(num_key_value_heads=2, intermediate_size=48)  # LLaMA-style: 2 key/value heads for 4 queries
FAMILY_CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            max_position_embeddings=64,
            intermediate_size=64,
        ),
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _sizes(intermediate_size=80)),
    "opt": ("OPTConfig", "OPTForCausalLM", _sizes(ffn_dim=72, word_embed_proj_dim=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _sizes(**GROUPED_QUERY)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _sizes(**GROUPED_QUERY)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _sizes(**GROUPED_QUERY, head_dim=8, sliding_window=4)),
    "bert": ("BertConfig", "BertForMaskedLM", _sizes(intermediate_size=56)),
}
CAUSAL_FAMILIES = [f for f in FAMILY_CONFIGS if f != "bert"]


def tiny_tokenizer(masked: bool = False) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS) + [".", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    kwargs = dict(unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")
    if masked:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        kwargs.update(mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    import transformers

    config_name, model_name, kwargs = FAMILY_CONFIGS[family]
    tokenizer = tiny_tokenizer(masked=family == "bert")
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=5, bos_token_id=5, **kwargs
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # wider weights than the default init so that probabilities move
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    return wrap_model(model, tokenizer, name=f"tiny-{family}-{seed}")
