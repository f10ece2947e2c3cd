"""One analytic FLOPs counter shared by every routing policy.

FLOPs count a multiply-add as 2. Counted: the q/k/v/o projections, the MLP (three matrices, at the neurons
used: YOPO's sparse FFN runs vision tokens through part of them), attention scores and the
attention-weighted sum of values at each layer's real key count, the lm_head rows computed, and the vision
encoder per frame. Norms, RoPE, softmax and activations are left out: they
are linear in tokens and under 1% of a layer at real sizes.

`llm_dense` is what the same token stream costs with routing off (every token at every layer, keys =
every earlier token), so `llm / llm_dense` is a policy's compute fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamvlm.parts import DecoderParts


@dataclass
class FlopCounter:
    num_layers: int
    hidden_size: int
    q_dim: int
    """num_heads * head_dim."""
    kv_dim: int
    """num_kv_heads * head_dim."""
    intermediate_size: int
    vocab_size: int
    vision: float = 0.0
    llm: float = 0.0
    llm_dense: float = 0.0
    tokens_processed_per_layer: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.tokens_processed_per_layer:
            self.tokens_processed_per_layer = [0] * self.num_layers

    @classmethod
    def for_decoder(cls, parts: DecoderParts) -> FlopCounter:
        return cls(num_layers=parts.num_layers, hidden_size=parts.hidden_size,
                   q_dim=parts.num_heads * parts.head_dim, kv_dim=parts.num_kv_heads * parts.head_dim,
                   intermediate_size=parts.intermediate_size, vocab_size=parts.vocab_size)

    # Per-token costs of one layer.
    @property
    def projection_flops(self) -> int:
        d = self.hidden_size
        return 2 * d * self.q_dim + 2 * 2 * d * self.kv_dim + 2 * self.q_dim * d

    @property
    def mlp_flops(self) -> int:
        return 3 * 2 * self.hidden_size * self.intermediate_size

    def attention_flops(self, key_visits: int) -> int:
        """Scores (q.k) and weighted values for `key_visits` = sum over queries of keys attended."""
        return 2 * 2 * self.q_dim * key_visits

    def layer_flops(self, tokens: int, key_visits: int) -> int:
        return tokens * (self.projection_flops + self.mlp_flops) + self.attention_flops(key_visits)

    # Recording.
    def add_attention(self, layer: int, tokens: int, key_visits: int) -> None:
        """A layer's attention ran for `tokens` tokens (projections, and `key_visits` keys in all)."""
        self.llm += tokens * self.projection_flops + self.attention_flops(key_visits)
        self.tokens_processed_per_layer[layer] += tokens

    def add_mlp(self, tokens: int, neurons: int | None = None) -> None:
        """`tokens` tokens went through the MLP; neurons: through only that many of its intermediate neurons
        (YOPO's sparse FFN for vision tokens), None for all of them."""
        self.llm += tokens * (self.mlp_flops if neurons is None else 3 * 2 * self.hidden_size * neurons)

    def add_layer(self, layer: int, tokens: int, key_visits: int) -> None:
        """A layer processed `tokens` tokens (attention and MLP), whose queries visited `key_visits` keys."""
        self.add_attention(layer, tokens, key_visits)
        self.add_mlp(tokens)

    def add_dense(self, tokens: int, past: int) -> None:
        """What a chunk of `tokens` after `past` earlier tokens costs with routing off, at every layer."""
        key_visits = tokens * past + tokens * (tokens + 1) // 2
        self.llm_dense += self.num_layers * self.layer_flops(tokens, key_visits)

    def add_logits(self, rows: int) -> None:
        f = 2 * self.hidden_size * self.vocab_size * rows
        self.llm += f
        self.llm_dense += f

    def as_dict(self) -> dict[str, float]:
        return {"vision": self.vision, "llm": self.llm, "llm_dense": self.llm_dense}
