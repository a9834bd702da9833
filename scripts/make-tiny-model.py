#!/usr/bin/env python3
"""Write a tiny, randomly initialised Llama that vLLM's CPU build can serve.

Usage: make-tiny-model.py OUTDIR   (run with the real-vLLM venv's python)

Its output is noise; it exists so that tests can start a real vLLM quickly
and on two cores. Structured outputs (a regex in the request) make it write
an exact text, which is how tests get it to emit a tool call.

Everything is made here, nothing is downloaded, and the result is the same
on every run (fixed seeds, fixed training text).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 0
# Byte-level BPE: the 256 byte symbols cover any text; a few merges on top
# keep prompts short.
VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Training text: enough of the characters tool calls use (<TOOLCALL>, JSON
# punctuation, letters, digits, spaces) that they get merges of their own.
SENTENCES = [
    "Hello! How can I help you today?",
    "The weather in Tokyo is sunny, 21 degrees.",
    "What is the weather like in Paris and Berlin?",
    '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Tokyo"}}]</TOOLCALL>',
    '<TOOLCALL>[{"name": "search", "arguments": {"query": "vLLM", "limit": 10}}]</TOOLCALL>',
    '{"role": "assistant", "content": "0123456789"}',
    "You are a helpful assistant. Answer briefly and politely.",
    "The quick brown fox jumps over the lazy dog 42 times.",
    "user: tell me a story. assistant: once upon a time, there was a tiny model.",
]

# A plain chat format. vLLM passes `tools` to the template whenever a request
# carries them, so the template renders them instead of failing on them, and
# it renders assistant tool calls and tool results for multi-turn requests.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['tool_calls'] %}<TOOLCALL>["
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}, {% endif %}"
    "{{ {'name': call['function']['name'],"
    " 'arguments': call['function']['arguments']} | tojson }}"
    "{% endfor %}]</TOOLCALL>{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def log(msg: str) -> None:
    print(f"make-tiny-model: {msg}", flush=True)


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        # vLLM's CPU attention kernels refuse small head sizes (16 fails).
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: make-tiny-model.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)

    log("training a byte-level BPE tokenizer")
    tokenizer = make_tokenizer()
    sample = '<TOOLCALL>[{"name": "f", "arguments": {"a": 1}}]</TOOLCALL>'
    ids = tokenizer.encode(sample, add_special_tokens=False)
    if tokenizer.decode(ids) != sample:
        raise SystemExit("make-tiny-model: tokenizer does not round-trip a tool call")
    log(f"vocabulary of {len(tokenizer)} tokens; a tool call is {len(ids)} tokens")
    tokenizer.save_pretrained(out)

    log("initialising a 2-layer Llama (hidden 128, 2 heads of 64) with random weights")
    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    log(f"wrote {n_params} float32 parameters, config and tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
