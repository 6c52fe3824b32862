"""RLR: He et al., "Learning Unified Reference Representation for Unsupervised Multi-class
Anomaly Detection", ECCV 2024 (arXiv 2403.11561), as the authors' code (github.com/hlr7999/RLR)
builds it.

One model learns the normal images of many categories at once and scores any of them without a
class label. A reconstruction network that sees its input can learn the identity ("learning
shortcuts") and then reconstructs defects as well as normal patterns. RLR instead rebuilds each
feature from a learnable reference, so what comes out is made of normal patterns only:

1. Features: the frozen backbone's stride-8 and stride-16 maps, raw (no standardisation), each
   averaged over a 3x3 neighbourhood (zero padding counted). One network per level.
2. Embeddings: tokens ``t = W f + p`` with ``W`` a 1x1 projection of each position's feature ``f``
   and ``p`` a fixed 2-D sine-cosine positional encoding. The learnable reference ``R`` (one
   feature per position, in feature units) has its own projection: ``r = W_R R + p``.
3. Attentions, each multi-head ``softmax(q k^T / sqrt(c) + mask) v`` with its own projections:

   - LCA, local cross attention ``(q, k, v) = (t, r, r)``: a query attends to the reference only
     inside its ``window x window`` window (clipped at the border); the output is made of
     reference values, the input merely chooses them;
   - MLKA, masked learnable-key attention ``(t, r, t)``: reference keys, input values, and a
     query may NOT attend inside its own window, so no token can copy itself;
   - the ablations of the paper: ``msa`` self-attention ``(t, t, t)`` with MLKA's mask, ``sa``
     plain self-attention ``(t, t, t)``.

   The projections start as the official ``nn.MultiheadAttention``'s: query, key and value
   weights drawn Xavier-uniform as one packed ``3d x d`` matrix, zero biases, the output weight
   ``nn.Linear``'s default (:func:`initialize_attention`).

4. Layer ("parallel" mode of the official code), no residual from the layer input::

       x' = LN( sum_b  w_b * attention_b(x) )        w = 2 for LCA, 1 for MLKA, msa, sa
       out = LN( x' + FFN(x') )                      FFN: d -> 4d -> d, GELU

   ``depth`` layers, a final LayerNorm, and a linear map back to the feature width. The finest
   level's token width is ``hidden_dim``; each coarser level doubles it (256 and 512 in the paper).
5. Training (:func:`flawmap.training.train`): jitter on the input tokens,
   ``f + eps * ||f|| / C * jitter_scale`` with ``eps ~ N(0, 1)`` per channel; the clean features
   are the target. Loss per level ``MSE + (1 - cos)``, summed over levels; Adam, one step per
   batch on the summed loss. The weights after the last epoch are kept (``train_losses_``
   records each epoch's mean training loss).
   *Difference*: the official trainer steps its one Adam once per level's loss, after
   ``zero_grad()``. Under the torch it pins (1.12), ``zero_grad`` leaves zero gradients rather
   than None, so each step also moves the other level's parameters on their momentum alone:
   every parameter takes two Adam steps per batch, one with its gradient and one with a zero
   gradient. Under torch 2 (``set_to_none`` by default) the same code takes exactly one step
   per parameter with its own gradient, which is what one step on the summed loss does (the
   levels' parameters are disjoint). flawmap follows the code's intent under current torch; the
   doubled momentum steps are an artefact of an old default, not part of the method.
   The official code keeps the epoch with the best TEST image AUROC; we never look at test data.
6. Scoring: per position ``MSE + (1 - cos)`` over channels between features and reconstruction.
   The stride-16 map is upsampled bilinearly to the stride-8 grid and the levels are averaged; the
   shared pipeline then upsamples to the input size and smooths (sigma 4), and the image score is
   the maximum of that map (the official code also smooths with sigma 4 and takes the maximum).

Dropout (attention weights, attention outputs, FFN output, embeddings) is 0 by default, as the
official models really run: its layer's default of 0.1 is overridden by the model's 0.0.

Incremental fit (``partial_fit``): training continues from the current weights on the new
images only, for ``epochs`` more epochs with a fresh optimiser, and ``train_losses_`` grows by
``epochs``. The earlier images are not seen again, so the networks can forget them ("catastrophic
forgetting"): after a long update on different images, normal patterns of the first fit may
reconstruct worse and score higher. To learn several categories equally, fit them together
(``fit([a, b, c])``) rather than one after another.

The networks run under the runtime's precision (bfloat16 autocast where the hardware is fast at
it; weights and losses stay float32). The ``paper`` preset fits in float32 throughout, as the
official code does (``float32_training``: features, cached training data and training in
float32 on any hardware). With ``checkpoint_dir`` the training state is saved after
every epoch (``<checkpoint_dir>/fit-<n>`` for the n-th fit of the model: safetensors + JSON, no
pickle), and a fit with the same hyper-parameters (``epochs`` aside) and training data resumes
from the last finished epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flawmap import postprocess
from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import flatten_positions, local_average
from flawmap.models.base import check_positive_odd
from flawmap.models.methods import register_method
from flawmap.models.scorer import PatchScores, Scorer
from flawmap.models.trained import TrainedModel
from flawmap.training import seeded_init

_FFN_EXPANSION = 4
"""Hidden width of the feed-forward layer, as a multiple of the token width (official: 4)."""


@dataclass(frozen=True)
class Attention:
    """One kind of attention in a layer (step 3): where its keys and values come from, which
    keys a query may see (``"own_window"``, ``"outside_own_window"`` or ``"all"``) and its
    weight in the layer's sum."""

    keys_from_reference: bool
    values_from_reference: bool
    allowed: str
    weight: float


ATTENTIONS = {
    "lca": Attention(keys_from_reference=True, values_from_reference=True, allowed="own_window", weight=2.0),
    "mlka": Attention(keys_from_reference=True, values_from_reference=False, allowed="outside_own_window", weight=1.0),
    "msa": Attention(keys_from_reference=False, values_from_reference=False, allowed="outside_own_window", weight=1.0),
    "sa": Attention(keys_from_reference=False, values_from_reference=False, allowed="all", weight=1.0),
}
"""The attentions a layer can combine (``blocks="lca+mlka"``), by name."""


def parse_blocks(text: str) -> tuple[str, ...]:
    """``"lca+mlka"`` -> ``("lca", "mlka")``; FlawmapError for an unknown, repeated or missing name."""
    names = tuple(part.strip() for part in text.split("+"))
    if not all(names) or len(set(names)) != len(names) or not set(names) <= ATTENTIONS.keys():
        raise FlawmapError(
            f"blocks must join distinct names from {', '.join(ATTENTIONS)} with '+' (e.g. lca+mlka), got {text!r}"
        )
    return names


class RLRScorer(Scorer):
    """Images -> locally averaged levels (step 1) -> reconstruction errors (step 6).

    ``networks`` holds one :class:`ReferenceReconstructor` per tapped level, on the level's grid
    ``ceil(image_size / stride)`` square; they score once trained.
    """

    def __init__(
        self,
        backbone: Backbone,
        taps: tuple[str, ...],
        *,
        image_size: int,
        neighborhood_size: int,
        blocks: tuple[str, ...],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        dropout: float,
    ) -> None:
        super().__init__(backbone, taps)
        self.neighborhood_size = neighborhood_size
        tap_info = backbone.tap_info(taps)
        grids = [(math.ceil(image_size / info.stride),) * 2 for info in tap_info]
        masks_own_window = any(ATTENTIONS[name].allowed == "outside_own_window" for name in blocks)
        networks = []
        for level, (info, grid_hw) in enumerate(zip(tap_info, grids)):
            window = level_window(window_size, grids[0][0], grid_hw[0])
            if masks_own_window and window_mask(grid_hw, window).all(dim=1).any():
                raise FlawmapError(
                    f"window_size {window_size} leaves no unmasked position on the {grid_hw[0]}x{grid_hw[1]} "
                    "feature grid; use a smaller window_size or a larger image_size"
                )
            width = hidden_dim * 2**level
            networks.append(ReferenceReconstructor(info.channels, grid_hw, width, depth, num_heads, window, blocks, dropout))
        self.networks = nn.ModuleList(networks)

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) -> locally averaged levels, each (B, C_l, h_l, w_l), finest first."""
        return [local_average(level, self.neighborhood_size) for level in self.levels(images)]

    def score(self, features: list[torch.Tensor]) -> PatchScores:
        """Levels (B, C_l, h_l, w_l) -> mean per-position reconstruction error (B, h_0, w_0)."""
        finest_grid = tuple(features[0].shape[-2:])
        level_maps = []
        for network, level in zip(self.networks, features):
            target = flatten_positions(level.float())  # (B, N_l, C_l)
            with self.autocast(level.device):
                reconstruction = network(target)
            errors = reconstruction_error(reconstruction.float(), target)  # (B, N_l)
            level_map = errors.view(level.shape[0], *level.shape[-2:])
            if tuple(level_map.shape[-2:]) != finest_grid:
                level_map = postprocess.upsample(level_map, finest_grid)  # bilinear, to the stride-8 grid
            level_maps.append(level_map)
        return PatchScores(torch.stack(level_maps).mean(dim=0))

    def training_loss(self, levels: list[torch.Tensor], generator: torch.Generator, jitter_scale: float) -> torch.Tensor:
        """Step 5: ``MSE + (1 - cos)`` of reconstructing clean tokens from jittered ones, summed
        over levels (each (B, C_l, h_l, w_l)); ``generator`` draws the jitter."""
        total = torch.zeros((), device=levels[0].device)
        for network, level in zip(self.networks, levels):
            target = flatten_positions(level.float())
            with self.autocast(level.device):
                reconstruction = network(feature_jitter(target, jitter_scale, generator))
            total = total + reconstruction_error(reconstruction.float(), target).mean()
        return total


@register_method("rlr")
@dataclass(kw_only=True, eq=False)
class RLR(TrainedModel):
    """RLR unified multi-class anomaly detector (see module docstring). Method hyper-parameters:

    Parameters
    ----------
    neighborhood_size : int
        Local averaging window of the backbone features (3 in the official code).
    blocks : str
        The attentions of every layer, joined by ``+``: ``lca+mlka`` (RLR), or the shortcut
        ablations ``sa`` (self-attention), ``msa`` (self-attention that may not see its own
        window), ``lca`` (local cross attention alone); any other combination of these names.
    hidden_dim : int
        Token width ``d`` at the finest level (each coarser level doubles it); a multiple of 4
        and of ``num_heads``.
    depth : int
        Layers per level.
    num_heads : int
        Attention heads.
    window_size : int
        Odd LCA window (and MLKA mask) side on the finest level's grid. A coarser level uses the
        smallest window covering at least the same image area: 7 at 256 px gives the official 7 x 7
        on the 32 x 32 grid and 5 x 5 on 16 x 16; 11 at 512 px gives 11 x 11 and 7 x 7.
    dropout : float
        Dropout of attention weights and outputs, FFN and embeddings while training.
    jitter_scale : float
        Feature-jitter scale (step 5); 0 disables the noise.

    and the training parameters of :class:`flawmap.models.trained.TrainedModel` (Adam on the
    cached features; here ``epochs`` 12).

    Presets (``RLR(**RLR.presets["paper"])``, ``flawmap fit --method rlr --preset paper``):
    ``paper`` is the official capacity and schedule (d 256/512, 8 heads, 4 layers, jitter 4,
    Adam 1e-4, batch 4, 200 epochs, float32 throughout; meant for a GPU). The defaults are sized
    for a CPU.

    Examples
    --------
    >>> model = RLR().fit(["bottle/", "cable/", "screw/"])    # doctest: +SKIP
    >>> model.predict("cable/test/bent_wire")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 2, "hidden_dim": 8, "depth": 1, "num_heads": 2, "window_size": 3}
    presets = {
        "paper": {
            "image_size": 256, "blocks": "lca+mlka", "hidden_dim": 256, "depth": 4, "num_heads": 8, "window_size": 7,
            "dropout": 0.0, "jitter_scale": 4.0, "learning_rate": 1e-4, "train_batch_size": 4, "epochs": 200,
            "float32_training": True,
        },
    }

    neighborhood_size: int = 3
    blocks: str = "lca+mlka"
    hidden_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    window_size: int = 7
    dropout: float = 0.0
    epochs: int = 12
    jitter_scale: float = 4.0

    def _validate_method_params(self) -> None:
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        check_positive_odd("window_size", self.window_size)
        parse_blocks(self.blocks)
        if self.num_heads < 1 or self.hidden_dim < 4 or self.hidden_dim % 4 or self.hidden_dim % self.num_heads:
            raise FlawmapError(
                f"hidden_dim must be a multiple of 4 and of num_heads, got hidden_dim={self.hidden_dim}, "
                f"num_heads={self.num_heads}"
            )
        if self.depth < 1:
            raise FlawmapError(f"depth must be at least 1, got {self.depth}")
        if not self.jitter_scale >= 0.0 or not 0.0 <= self.dropout < 1.0:
            raise FlawmapError(f"need jitter_scale >= 0 and 0 <= dropout < 1, got {self.jitter_scale} and {self.dropout}")

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> RLRScorer:
        with seeded_init(self.random_state):  # the networks' initial weights
            return RLRScorer(
                backbone,
                taps,
                image_size=self.image_size,
                neighborhood_size=self.neighborhood_size,
                blocks=parse_blocks(self.blocks),
                hidden_dim=self.hidden_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                window_size=self.window_size,
                dropout=self.dropout,
            )

    def _learn(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        levels = self._cache(feature_batches)
        self._train(
            self.scorer_.networks, levels,
            lambda batch, generator: self.scorer_.training_loss(batch, generator, self.jitter_scale), "rlr",
        )

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"train_losses_": self.train_losses_}, dict(self.scorer_.networks.state_dict())

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.networks.load_state_dict(tensors)
        self.train_losses_ = list(fitted["train_losses_"])


# ---------------------------------------------------------------------- network
class ReferenceReconstructor(nn.Module):
    """Reconstructs one level's features, from the learnable reference where ``blocks`` use it
    (steps 2-4).

    Parameters
    ----------
    channels : int
        Feature width ``C`` of the level.
    grid_hw : (int, int)
        The level's grid ``(h, w)``; ``N = h * w`` tokens.
    hidden_dim, depth, num_heads : int
        Token width, layers, attention heads.
    window : int
        Odd side of the own window (LCA's window, MLKA's mask) on this grid.
    blocks : tuple of str
        Names of :data:`ATTENTIONS` summed in every layer.
    dropout : float
        Dropout while training.
    """

    def __init__(
        self,
        channels: int,
        grid_hw: tuple[int, int],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        window: int,
        blocks: tuple[str, ...],
        dropout: float,
    ) -> None:
        super().__init__()
        n_positions = grid_hw[0] * grid_hw[1]
        self.register_buffer("position", sincos_position_encoding(grid_hw, hidden_dim), persistent=False)
        self.register_buffer("own_window", window_mask(grid_hw, window), persistent=False)
        self.embed = projection(channels, hidden_dim)  # W, the 1x1 projection of the input
        uses_reference = any(ATTENTIONS[name].keys_from_reference for name in blocks)
        self.register_parameter("reference", nn.Parameter(torch.randn(n_positions, channels)) if uses_reference else None)
        self.reference_embed = projection(channels, hidden_dim) if uses_reference else None  # W_R
        self.embedding_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(ReferenceLayer(hidden_dim, num_heads, blocks, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> their reconstruction (B, N, C)."""
        hidden = self.embedding_dropout(self.embed(tokens) + self.position)  # t = W f + p, (B, N, d)
        reference = None
        if self.reference is not None:
            embedded = self.embedding_dropout(self.reference_embed(self.reference) + self.position)  # r = W_R R + p
            reference = embedded.expand(tokens.shape[0], -1, -1)  # (B, N, d)
        for layer in self.layers:
            hidden = layer(hidden, reference, self.own_window)
        return self.head(self.norm(hidden))


class ReferenceLayer(nn.Module):
    """``x' = LN(sum_b w_b attention_b(x))``, ``out = LN(x' + FFN(x'))`` (step 4)."""

    def __init__(self, hidden_dim: int, num_heads: int, blocks: tuple[str, ...], dropout: float) -> None:
        super().__init__()
        self.attentions = nn.ModuleDict({name: MultiHeadAttention(hidden_dim, num_heads, dropout) for name in blocks})
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        ffn_dim = _FFN_EXPANSION * hidden_dim
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, hidden_dim), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, tokens: torch.Tensor, reference: torch.Tensor | None, own_window: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, d), embedded reference (B, N, d) or None, own-window mask (N, N) -> (B, N, d)."""
        mixed = torch.zeros_like(tokens)
        for name, attention in self.attentions.items():
            kind = ATTENTIONS[name]
            keys = reference if kind.keys_from_reference else tokens
            values = reference if kind.values_from_reference else tokens
            attended = attention(tokens, keys, values, allowed_keys(kind.allowed, own_window))
            mixed = mixed + kind.weight * self.dropout(attended)
        hidden = self.norm1(mixed)
        return self.norm2(hidden + self.feed_forward(hidden))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query, key, value and output projections."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query, self.key, self.value, self.out = (nn.Linear(hidden_dim, hidden_dim) for _ in range(4))
        initialize_attention(self.query, self.key, self.value, self.out)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """Queries, keys, values (B, N, d) and ``allowed`` (N, N) (True: query i may see key j;
        None: all) -> (B, N, d)."""
        q, k, v = (split_heads(project(x), self.num_heads) for project, x in
                   ((self.query, queries), (self.key, keys), (self.value, values)))
        dropout = self.dropout if self.training else 0.0
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)))


# ---------------------------------------------------------------------- helpers
def allowed_keys(allowed: str, own_window: torch.Tensor) -> torch.Tensor | None:
    """An :class:`Attention`'s ``allowed`` as a BoolTensor (N, N) (None: every key)."""
    if allowed == "own_window":
        return own_window
    if allowed == "outside_own_window":
        return ~own_window
    return None


def feature_jitter(tokens: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Tokens (B, N, C) plus ``eps * ||f|| / C * scale``, ``eps ~ N(0, 1)`` per channel (step 5)."""
    noise = torch.randn(tokens.shape, generator=generator).to(tokens.device)
    return tokens + noise * (tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1] * scale)


def reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``MSE + (1 - cos)`` over channels: (B, N, C) twice -> (B, N)."""
    squared = (reconstruction - target).pow(2).mean(dim=-1)
    return squared + 1.0 - F.cosine_similarity(reconstruction, target, dim=-1)


def initialize_attention(query: nn.Linear, key: nn.Linear, value: nn.Linear, out: nn.Linear) -> None:
    """The official ``nn.MultiheadAttention`` initialisation: the query, key and value weights
    are one packed ``3d x d`` matrix drawn Xavier-uniform (bound ``sqrt(6 / (d + 3d))``), every
    bias is zero, and the output weight keeps ``nn.Linear``'s default."""
    with torch.no_grad():
        packed = nn.init.xavier_uniform_(torch.empty(3 * query.out_features, query.in_features))
        for layer, weight in zip((query, key, value), packed.chunk(3)):
            layer.weight.copy_(weight)
        for layer in (query, key, value, out):
            nn.init.zeros_(layer.bias)


def projection(channels: int, hidden_dim: int) -> nn.Linear:
    """A 1x1 projection C -> d, Kaiming-normal initialised (fan-in, leaky ReLU) as in the official code."""
    layer = nn.Linear(channels, hidden_dim)
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="leaky_relu")
    return layer


def level_window(finest_window: int, finest_rows: int, rows: int) -> int:
    """Odd window side on a grid of ``rows`` covering at least the finest window's image area."""
    radius = math.ceil((finest_window // 2) * rows / finest_rows)
    return 2 * radius + 1


def window_mask(grid_hw: tuple[int, int], window: int) -> torch.Tensor:
    """BoolTensor (N, N): True where position ``j`` lies in the ``window x window`` window of ``i``
    (row-major positions; the window is clipped at the border)."""
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    radius = window // 2
    near_rows = (rows.view(-1, 1) - rows.view(1, -1)).abs() <= radius
    near_cols = (cols.view(-1, 1) - cols.view(1, -1)).abs() <= radius
    return near_rows & near_cols


def sincos_position_encoding(grid_hw: tuple[int, int], dim: int) -> torch.Tensor:
    """2-D sine-cosine positional encoding (N, dim) in the official layout: the first half of the
    channels encodes the column, the second half the row, alternating ``sin(x f_k)`` and
    ``cos(x f_k)`` with ``f_k = 10000^(-4k / dim)``."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * -(math.log(1e4) / half))
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    encoding = torch.zeros(rows.numel(), dim, dtype=torch.float64)
    for start, coordinate in ((0, cols), (half, rows)):
        angles = coordinate.flatten().double().unsqueeze(1) * frequencies
        encoding[:, start : start + half : 2] = angles.sin()
        encoding[:, start + 1 : start + half : 2] = angles.cos()
    return encoding.float()


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, d) -> (B, H, N, d / H)."""
    batch, n_tokens, dim = tokens.shape
    return tokens.reshape(batch, n_tokens, num_heads, dim // num_heads).transpose(1, 2)


def merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """(B, H, N, c) -> (B, N, H * c)."""
    merged = tokens.transpose(1, 2)
    return merged.reshape(*merged.shape[:2], -1)
