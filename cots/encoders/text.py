"""BERT-style text encoder (post-norm transformer with padding masks)."""

from __future__ import annotations

import torch
from torch import nn

from cots_kernels import SelfAttention

from .config import TextConfig, check_attn_impl
from .vision import Mlp


class TextEmbeddings(nn.Module):
    """Word + position + token-type (always type 0) embeddings, LayerNorm, dropout.

    Parameters: ``word`` (vocab_size, W), ``position`` (max_position, W), ``token_type``
    (type_vocab_size, W), ``norm``. forward: input_ids (B, L) -> (B, L, W).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.width, padding_idx=config.pad_id)
        self.position = nn.Embedding(config.max_position, config.width)
        self.token_type = nn.Embedding(config.type_vocab_size, config.width)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment inputs: every token has type 0, so its row is added directly
        # instead of looking up a tensor of zeros.
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.drop(self.norm(x))


class TextLayer(nn.Module):
    """Post-norm layer: x = attn_norm(x + attn(x)); x = ffn_norm(x + ffn(x)).

    ``attn`` is a :class:`cots_kernels.SelfAttention` whose ``proj_drop`` is BERT's
    dropout on the attention output. forward: x (B, L, W), key_padding_mask (B, L) bool
    (True = real) or None -> (B, L, W).
    """

    def __init__(self, config: TextConfig, attn_impl: str) -> None:
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.attn = SelfAttention(
            width, config.num_heads, qkv_bias=True,
            attn_drop=config.attn_dropout, proj_drop=config.dropout, impl=attn_impl,
        )  # fmt: skip
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = Mlp(width, config.intermediate, config.dropout, hidden_dropout=False)  # BERT: no dropout after GELU
        self.ffn_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, key_padding_mask=key_padding_mask))
        return self.ffn_norm(x + self.ffn(x))


class TextEncoder(nn.Module):
    """BERT text encoder with its own parameter names; HF BERT checkpoints load through
    :func:`cots.encoders.load_hf_bert`.

    Parameters: ``embeddings.{word, position, token_type, norm}``, then per layer
    ``layers.{i}.attn.qkv`` (rows q, k, v), ``layers.{i}.attn.proj``,
    ``layers.{i}.attn_norm``, ``layers.{i}.ffn.fc1``, ``layers.{i}.ffn.fc2``,
    ``layers.{i}.ffn_norm``.

    Initialisation follows BERT: Linear and embedding weights normal with std 0.02, zero
    biases, the ``pad_id`` row of the word embedding zero, LayerNorms at identity.

    Args:
        config: sizes and dropout rates.
        attn_impl: attention implementation passed to every
            :class:`cots_kernels.SelfAttention` ("auto", "triton", "sdpa", "reference").

    Attributes:
        config: the configuration.
        width: hidden width W.
    """

    def __init__(self, config: TextConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, TextConfig):
            raise TypeError(f"config must be a TextConfig, got {type(config).__name__}")
        check_attn_impl(attn_impl)
        self.config = config
        self.width = config.width
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(TextLayer(config, attn_impl) for _ in range(config.depth))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.embeddings.word.weight[self.config.pad_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids.

        Args:
            input_ids: (B, L) int64 (or int32) token ids, L <= ``config.max_position``;
                position i gets position embedding i.
            attention_mask: (B, L), True (or 1) = a real token, False (or 0) = padding;
                bool or an integer dtype. None: every token is real. Padded positions
                still get outputs (they attend to the real tokens); ignore them.

        Returns:
            (B, L, width); row 0 is [CLS].

        Raises:
            TypeError: non-integer ``input_ids``; ``attention_mask`` neither bool nor integer.
            ValueError: wrong shapes, L > ``max_position``, and, for CPU tensors only, ids
                outside [0, vocab_size) or an integer mask with values other than 0/1.
                Those value checks read the data on the host; on an accelerator they
                would synchronise every step, so they are skipped there (an
                out-of-range id then fails inside the embedding lookup). Under
                torch.compile the CPU checks are asynchronous assertions (RuntimeError).
        """
        self._check_input_ids(input_ids)
        mask = self._as_bool_mask(attention_mask, input_ids)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position:
            raise ValueError(f"input_ids has length {input_ids.shape[1]} > config.max_position ({cfg.max_position})")
        if input_ids.device.type == "cpu" and torch.compiler.is_compiling():  # a host read would break the graph
            inside = ((input_ids >= 0) & (input_ids < cfg.vocab_size)).all()
            torch._assert_async(inside, f"input_ids must lie in [0, vocab_size={cfg.vocab_size})")
        elif input_ids.device.type == "cpu" and input_ids.numel() > 0:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= cfg.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={cfg.vocab_size}), got values in [{low}, {high}]"
                )

    @staticmethod
    def _as_bool_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or an integer 0/1 tensor, got {attention_mask.dtype}")
        if attention_mask.device.type == "cpu" and torch.compiler.is_compiling():
            binary = ((attention_mask == 0) | (attention_mask == 1)).all()
            torch._assert_async(binary, "attention_mask of an integer dtype must hold only 0 and 1")
        elif attention_mask.device.type == "cpu" and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask of an integer dtype must hold only 0 and 1")
        return attention_mask != 0
