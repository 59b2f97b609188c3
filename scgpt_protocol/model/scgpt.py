"""The scGPT transformer in plain PyTorch.

One module holds the whole architecture, with the state-dict key names of the released
``whole-human`` checkpoint, so that weights move between this project and the official code
by a rename at most (``in_proj_weight`` ↔ ``Wqkv.weight``).

Layout (keys of ``state_dict()``)::

    encoder.embedding, encoder.enc_norm            gene token embedding + LayerNorm
    value_encoder.{linear1,linear2,norm}           continuous value encoder
    transformer_encoder.layers.N.self_attn.Wqkv    packed [q; k; v] projection  [3d, d]
    transformer_encoder.layers.N.self_attn.out_proj
    transformer_encoder.layers.N.{linear1,linear2,norm1,norm2}   post-norm feed-forward
    decoder.fc.{0,2,4}                             expression (MLM) decoder
    mvc_decoder.{gene2query,W}                     masked value prediction from the cell embedding
    cls_decoder._decoder.{0,2,3,5}, cls_decoder.out_layer   classification head (optional)

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`: PyTorch's own fused
kernels on GPU and in evaluation; in training on the CPU, where that function has no fused kernel with
dropout, through :func:`~scgpt_protocol.model.attention.attention` (the same dropout, chunked); no flash-attn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Dropout, attention

__all__ = ["ScGPTConfig", "ScGPT", "ClsDecoder", "ProbeHead"]


@dataclass
class ScGPTConfig:
    """Architecture of an scGPT model (the model keys of a checkpoint's ``args.json``).

    Field names follow ``args.json`` where one exists (``embsize`` is called ``d_model`` here).
    """

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    n_layers_cls: int = 3
    dropout: float = 0.2
    n_bins: int = 51
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    max_seq_len: int = 1200
    input_emb_style: str = "continuous"
    max_value: float = 512.0
    n_classes: int | None = None
    #: every other key of the checkpoint's args.json, kept so that a saved checkpoint keeps them
    extra_args: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Encodes one float per token: clamp, Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout."""

    def __init__(self, d_model: int, dropout: float, max_value: float) -> None:
        super().__init__()
        self.max_value = max_value
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed ``Wqkv`` projection (the released key layout).

    ``prefix`` (None unless prefix tuning is applied) is a module called as
    ``k, v, attn_mask = prefix(k, v, attn_mask)`` that prepends learned keys and values.
    """

    def __init__(self, d_model: int, nheads: int, dropout: float) -> None:
        super().__init__()
        self.nheads = nheads
        self.dropout = dropout
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.prefix: nn.Module | None = None

    def forward(self, x: Tensor, attn_mask: Tensor | None, first_only: bool = False) -> Tensor:
        """``[B, L, d]`` -> ``[B, L, d]``; with ``first_only`` the output at position 0 alone, ``[B, 1, d]``
        (its query attends over the keys and values of every position, as in the full computation)."""
        batch, length, d_model = x.shape
        heads, d_head = self.nheads, d_model // self.nheads
        if not first_only:
            qkv = self.Wqkv(x).view(batch, length, 3, heads, d_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d_head]
        else:
            if type(self.Wqkv) is nn.Linear:  # plain weights: project the one query, and keys / values
                weight, bias = self.Wqkv.weight, self.Wqkv.bias
                # a 2-D input: one addmm whatever requires_grad says (a strided 3-D input would go through
                # matmul, whose folding, hence rounding, depends on requires_grad: frozen != trainable)
                q = F.linear(x[:, 0], weight[:d_model], bias[:d_model])
                kv = F.linear(x, weight[d_model:], bias[d_model:])
            else:  # wrapped (LoRA, IA3): the wrapper's own forward over every position
                qkv = self.Wqkv(x)
                q, kv = qkv[:, :1, :d_model], qkv[..., d_model:]
            q = q.view(batch, 1, heads, d_head).transpose(1, 2)  # [B, H, 1, d_head]
            k, v = kv.view(batch, length, 2, heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
        if self.prefix is not None:
            k, v, attn_mask = self.prefix(k, v, attn_mask)
        out = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, q.shape[2], d_model))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (``nn.TransformerEncoderLayer`` semantics, ReLU, eps 1e-5).

    ``adapter_attn`` / ``adapter_ff`` (None unless bottleneck adapters are applied) transform the
    attention and feed-forward outputs before their residual connections.
    """

    def __init__(self, d_model: int, nheads: int, d_hid: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.adapter_attn: nn.Module | None = None
        self.adapter_ff: nn.Module | None = None

    def forward(self, x: Tensor, attn_mask: Tensor | None, first_only: bool = False) -> Tensor:
        """``[B, L, d]`` -> ``[B, L, d]``, or ``[B, 1, d]`` (position 0 alone) with ``first_only``."""
        attn = self.self_attn(x, attn_mask, first_only)
        if first_only:
            x = x[:, :1]
        if self.adapter_attn is not None:
            attn = self.adapter_attn(attn)
        x = self.norm1(x + self.dropout1(attn))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        if self.adapter_ff is not None:
            ff = self.adapter_ff(ff)
        return self.norm2(x + self.dropout2(ff))


class TransformerEncoder(nn.Module):
    def __init__(self, d_model: int, nheads: int, d_hid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nheads, d_hid, dropout) for _ in range(nlayers)
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None, first_only: bool = False) -> Tensor:
        """``[B, L, d]``; with ``first_only`` the last layer computes position 0 (``<cls>``) alone: ``[B, 1, d]``.

        Exact: the last layer's keys and values still come from every position; only the query,
        attention output, feed-forward and norms of the positions nobody reads are skipped.
        """
        # SDPA's boolean mask is True where attention is allowed; a batch without padding needs none.
        attn_mask = None
        if padding_mask is not None and bool(padding_mask.any()):
            attn_mask = ~padding_mask[:, None, None, :]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, attn_mask, first_only and i == last)
        return x


class ExprDecoder(nn.Module):
    """Expression (MLM) decoder: Linear, LeakyReLU, Linear, LeakyReLU, Linear(d, 1)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).squeeze(-1)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding ("inner product" style)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        query = self.query_activation(self.gene2query(gene_embs))  # [B, L, d]
        return torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)  # [B, L]


class ClsDecoder(nn.Module):
    """Classification head: [Linear, ReLU, LayerNorm] x (n_layers_cls - 1), then ``out_layer``."""

    def __init__(self, d_model: int, n_classes: int, n_layers_cls: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers_cls - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.ReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ProbeHead(nn.Module):
    """A linear probe: logistic regression on the L2-normalised cell embedding, as a head.

    Its weights come from a fitted ``sklearn`` ``LogisticRegression`` (``coef_``, ``intercept_``),
    so a probed model predicts through the same ``model.classify`` as every other strategy.
    """

    def __init__(self, d_model: int, n_classes: int) -> None:
        super().__init__()
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.normalize(x, dim=-1))


class ScGPT(nn.Module):
    """scGPT: gene + value encoders, post-norm transformer, MLM / MVC decoders, optional classifier.

    Inputs everywhere are ``gene_ids`` (int64 ``[B, L]``), ``values`` (float ``[B, L]``) and
    ``padding_mask`` (bool ``[B, L]``, True at ``<pad>``). Position 0 holds ``<cls>``.
    """

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        if config.input_emb_style != "continuous":
            msg = (
                f"input_emb_style {config.input_emb_style!r} is not supported; only 'continuous' "
                "(the style of every released scGPT checkpoint) is implemented."
            )
            raise ValueError(msg)
        self.config = config
        d = config.d_model
        self.encoder = GeneEncoder(config.vocab_size, d, config.pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d, config.dropout, config.max_value)
        self.transformer_encoder = TransformerEncoder(
            d, config.nheads, config.d_hid, config.nlayers, config.dropout
        )
        self.decoder = ExprDecoder(d)
        self.mvc_decoder = MVCDecoder(d)
        self.cls_decoder: ClsDecoder | ProbeHead | None = None
        if config.n_classes is not None:
            self.cls_decoder = ClsDecoder(d, config.n_classes, config.n_layers_cls)
        # Set by the checkpoint loader: gene symbol -> token id, and what the load did.
        self.vocab: dict[str, int] = {}
        self.load_report: Any = None
        # The value <cls> carries in this model's input: None = pad_value (pretraining, zero-shot
        # embeddings); 0.0 for a classifier fine-tuned as published (set by fine-tuning and loading).
        self.cls_value: float | None = None
        # The calibration temperature fitted on the validation cells after fine-tuning (None: none); predict()
        # divides the logits by it (set by load_finetuned from the manifest).
        self.temperature: float | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: gene embeddings uniform in [-0.1, 0.1]; the rest PyTorch's."""
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    def add_classifier(self, n_classes: int) -> ClsDecoder:
        """Attach a freshly initialised classification head with ``n_classes`` outputs."""
        ref = self.encoder.embedding.weight
        self.cls_decoder = ClsDecoder(self.config.d_model, n_classes, self.config.n_layers_cls).to(
            device=ref.device, dtype=ref.dtype
        )
        self.config.n_classes = n_classes
        return self.cls_decoder

    # -- the encoder and what is read off it -------------------------------------------------
    def _gene_and_total_embeddings(self, gene_ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        gene_embs = self.encoder(gene_ids)
        return gene_embs, gene_embs + self.value_encoder(values)

    def encode(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Transformer output ``[B, L, d]`` (positions under ``padding_mask`` are meaningless)."""
        _, total = self._gene_and_total_embeddings(gene_ids, values)
        return self.transformer_encoder(total, padding_mask)

    def cell_embedding(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Cell embedding ``[B, d]``: the ``<cls>`` position of the encoder output, not normalised.

        Computes only what it returns: the last layer runs for ``<cls>`` alone (its keys and values
        from every token), which saves that layer's work on the other positions.
        """
        _, total = self._gene_and_total_embeddings(gene_ids, values)
        return self.transformer_encoder(total, padding_mask, first_only=True)[:, 0, :]

    def classify(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Class logits ``[B, n_classes]`` from the classification head."""
        if self.cls_decoder is None:
            msg = (
                "this model has no classification head; load a fine-tuned checkpoint, pass "
                "n_classes= to load_model, or call model.add_classifier(n_classes)."
            )
            raise RuntimeError(msg)
        return self.cls_decoder(self.cell_embedding(gene_ids, values, padding_mask))

    def forward(
        self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """All outputs: ``transformer_output``, ``cell_emb``, ``mlm_output``, ``mvc_output``,
        and ``cls_output`` when a head exists."""
        gene_embs, total = self._gene_and_total_embeddings(gene_ids, values)
        hidden = self.transformer_encoder(total, padding_mask)
        cell_emb = hidden[:, 0, :]
        out = {
            "transformer_output": hidden,
            "cell_emb": cell_emb,
            "mlm_output": self.decoder(hidden),
            "mvc_output": self.mvc_decoder(cell_emb, gene_embs),
        }
        if self.cls_decoder is not None:
            out["cls_output"] = self.cls_decoder(cell_emb)
        return out
