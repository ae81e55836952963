"""Helpers shared by the cloud tests: tiny models, a byte-level tokenizer with a chat template."""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level tokenizer: ids 0..255 are bytes, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet)
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


BYTE_VOCAB = 259
BYTE_EOS = 258


def build_tiny_byte_model(seed: int = 0, *, vocab: int = BYTE_VOCAB, head_scale: float = 20.0, layers: int = 4):  # type: ignore[no-untyped-def]
    """A tiny Qwen2 over a small vocabulary (eos = last id)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=1_000_000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The model's own greedy continuation, one token per forward pass."""
    state = model.new_state()
    logits = model.extend(state, prompt)
    out: list[int] = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        logits = model.extend(state, [t])
    model.release(state)
    return out


class UvicornServer:
    """Serve an ASGI app on a free loopback port inside the running event loop."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.task = None
        self.url = ""

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        import asyncio

        self.task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        self.server.should_exit = True
        await self.task


def slow_model(inner, delay: float):  # type: ignore[no-untyped-def]
    """A LayerwiseLM that sleeps `delay` seconds in every forward (to keep requests in flight)."""
    import time

    from tether.runtime import LayerwiseLM

    class SlowLM(LayerwiseLM):
        def __init__(self) -> None:
            self.info = inner.info
            self.inner = inner

        def new_state(self):  # type: ignore[no-untyped-def]
            return inner.new_state()

        def extend(self, state, token_ids):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return inner.extend(state, token_ids)

        def extend_batch(self, states, token_ids):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return inner.extend_batch(states, token_ids)

        def truncate(self, state, length):  # type: ignore[no-untyped-def]
            inner.truncate(state, length)

        def fork(self, state):  # type: ignore[no-untyped-def]
            return inner.fork(state)

        def release(self, state):  # type: ignore[no-untyped-def]
            inner.release(state)

        def embed(self, token_ids):  # type: ignore[no-untyped-def]
            return inner.embed(token_ids)

        def run_layers(self, state, hidden, start, stop):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return inner.run_layers(state, hidden, start, stop)

        def head(self, hidden):  # type: ignore[no-untyped-def]
            return inner.head(hidden)

    return SlowLM()
