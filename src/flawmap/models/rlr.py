"""RLR: He et al., "Learning Unified Reference Representation for Unsupervised Multi-class
Anomaly Detection", ECCV 2024 (arXiv 2403.11561).

One model learns the normal images of many categories at once and scores any of them without a
class label. A reconstruction network that sees its input can learn the identity ("learning
shortcuts") and then reconstructs defects as well as normal patterns. RLR instead rebuilds each
feature from a learnable reference, so what comes out is made of normal patterns only:

1. Features: the frozen backbone's stride-8 and stride-16 maps, each averaged over a 3x3
   neighbourhood. The levels stay apart, one reconstruction network per level; features are
   standardised per channel with the training mean and std (an addition to the paper, so that
   both levels' errors are on one scale).
2. Tokens: ``t = W f + p`` with ``W`` a 1x1 projection of each position's feature ``f`` and ``p``
   a 2-D sine-cosine positional encoding. The learnable reference ``R`` has one feature per
   position and is embedded the same way, ``r = W R + p``.
3. Local Cross Attention (LCA): ``LCA(t, r)_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(d)) v_j``
   with ``q = W_q t`` from the input, ``k = W_k r`` and ``v = W_v r`` from the reference, and
   ``N(i)`` the ``window x window`` positions around ``i``: the output is made of reference
   values only, the input merely chooses them.
4. Masked Learnable Key Attention (MLKA): ``MLKA(t, r)_i = sum_{j not in N(i)} softmax_j(q_i . k_j
   / sqrt(d)) v_j`` with ``q = W_q t``, keys ``k = W_k r`` from the learnable reference and values
   ``v = W_v t`` from the input. Masking each token's own window means no token can copy itself
   (``mlka_mask=False`` removes the mask: the ablation that shows the shortcut).
5. Block (2 x LCA + MLKA, post-norm, no residual from the block input)::

       a = LN(LCA_1(t, r));  a = LN(a + LCA_2(a, r));  h = LN(a + MLKA(t, r));  out = LN(h + FFN(h))

   A final linear layer maps the tokens back to the feature width.
6. Training (:func:`flawmap.training.train`): the (standardised) input features get
   feature-jitter noise ``f + eps * ||f|| / sqrt(C)`` with ``eps ~ N(0, jitter_scale^2)`` per
   channel; the clean features are the target. Loss per level ``MSE + (1 - cos)``, summed over
   levels; Adam. The weights after the last epoch are kept (no model selection;
   ``train_losses_`` records each epoch's mean training loss).
7. Scoring: per position ``MSE + (1 - cos)`` between features and reconstruction. The stride-16
   map is upsampled bilinearly to the stride-8 grid and the levels are averaged; the shared
   pipeline then upsamples to the input size and smooths (sigma 4), and the image score is the
   maximum of that map.

Incremental fit (``partial_fit``): training continues from the current weights on the new
images only, for ``epochs`` more epochs with a fresh optimiser, and ``train_losses_`` grows by
``epochs``. The standardisation (step 1) stays that of the first fit. The earlier images are not
seen again, so the networks can forget them ("catastrophic forgetting"): after a long update on
different images, normal patterns of the first fit may reconstruct worse and score higher. To
learn several categories equally, fit them together (``fit([a, b, c])``) rather than one after
another.

The networks run under the runtime's precision (bfloat16 autocast where the hardware is fast at
it; weights and losses stay float32). With ``checkpoint_dir`` the training state is saved after
every epoch (``<checkpoint_dir>/fit-<n>`` for the n-th fit of the model: safetensors + JSON, no
pickle), and a fit with the same hyper-parameters (``epochs`` aside) and training data resumes
from the last finished epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from flawmap import postprocess
from flawmap.backbones import Backbone
from flawmap.errors import FlawmapError
from flawmap.features import flatten_positions, local_average
from flawmap.models.base import AnomalyModel, PatchScores, Scorer, check_positive_odd, register_method
from flawmap.training import Checkpoint, train

_FFN_EXPANSION = 2
"""Hidden width of the feed-forward layer, as a multiple of ``hidden_dim``."""

_RUN_ONLY_PARAMS = frozenset({"epochs", "checkpoint_dir"})
"""Hyper-parameters that may change between a checkpointed fit and its resumption."""


class RLRScorer(Scorer):
    """Images -> locally averaged levels (step 1) -> reconstruction errors (step 7).

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
        hidden_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlka_mask: bool,
    ) -> None:
        super().__init__(backbone, taps)
        self.neighborhood_size = neighborhood_size
        tap_info = backbone.tap_info(taps)
        grids = [(math.ceil(image_size / info.stride),) * 2 for info in tap_info]
        networks = []
        for info, grid_hw in zip(tap_info, grids):
            window = level_window(window_size, grids[0][0], grid_hw[0])
            if mlka_mask and window_mask(grid_hw, window).all(dim=1).any():
                raise FlawmapError(
                    f"window_size {window_size} leaves no unmasked position on the {grid_hw[0]}x{grid_hw[1]} "
                    "feature grid; use a smaller window_size or a larger image_size"
                )
            networks.append(ReferenceReconstructor(info.channels, grid_hw, hidden_dim, depth, num_heads, window, mlka_mask))
        self.networks = nn.ModuleList(networks)

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) -> locally averaged levels, each (B, C_l, h_l, w_l), finest first."""
        return [local_average(level, self.neighborhood_size) for level in self.levels(images)]

    def score(self, features: list[torch.Tensor]) -> PatchScores:
        """Levels (B, C_l, h_l, w_l) -> mean per-position reconstruction error (B, h_0, w_0)."""
        finest_grid = tuple(features[0].shape[-2:])
        level_maps = []
        for network, level in zip(self.networks, features):
            target = network.tokens(level)
            with self.autocast(level.device):
                reconstruction = network(target)
            errors = reconstruction_error(reconstruction.float(), target)  # (B, h_l * w_l)
            level_map = errors.view(level.shape[0], *level.shape[-2:])
            if tuple(level_map.shape[-2:]) != finest_grid:
                level_map = postprocess.upsample(level_map, finest_grid)  # bilinear, to the stride-8 grid
            level_maps.append(level_map)
        return PatchScores(torch.stack(level_maps).mean(dim=0))

    def training_loss(self, levels: list[torch.Tensor], generator: torch.Generator, jitter_scale: float) -> torch.Tensor:
        """Step 6: ``MSE + (1 - cos)`` of reconstructing clean tokens from jittered ones, summed
        over levels (each (B, C_l, h_l, w_l)); ``generator`` draws the jitter."""
        total = torch.zeros((), device=levels[0].device)
        for network, level in zip(self.networks, levels):
            target = network.tokens(level)
            noise = torch.randn(target.shape, generator=generator).to(target.device)
            magnitude = target.norm(dim=-1, keepdim=True) / math.sqrt(target.shape[-1])
            with self.autocast(level.device):
                reconstruction = network(target + jitter_scale * magnitude * noise)
            total = total + reconstruction_error(reconstruction.float(), target).mean()
        return total


@register_method("rlr")
@dataclass(kw_only=True, eq=False)
class RLR(AnomalyModel):
    """RLR unified multi-class anomaly detector (see module docstring). Method hyper-parameters:

    Parameters
    ----------
    neighborhood_size : int
        Local averaging window of the backbone features (3 in the paper's pipeline).
    hidden_dim : int
        Token width ``d`` of the reconstruction networks; a multiple of 4 and of ``num_heads``.
    depth : int
        Blocks (2 x LCA + MLKA + FFN) per level.
    num_heads : int
        Attention heads in LCA and MLKA.
    window_size : int
        Odd LCA window (and MLKA mask) side on the finest level's grid. A coarser level uses the
        smallest window covering at least the same image area: 7 at stride 8 gives 5 at stride 16.
    mlka_mask : bool
        Mask each token's own window in MLKA; False is the identity-shortcut ablation.
    epochs, train_batch_size, learning_rate : int, int, float
        Adam training on the cached features (``epochs`` per fit and per ``partial_fit``).
    jitter_scale : float
        Feature-jitter noise std, relative to each position's RMS feature magnitude; 0 disables it.
    checkpoint_dir : str or None
        Save the training state there after every epoch and resume from it when present.

    Attributes
    ----------
    train_losses_ : list of float
        Mean training loss of every epoch of every fit so far.

    Examples
    --------
    >>> model = RLR().fit(["bottle/", "cable/", "screw/"])    # doctest: +SKIP
    >>> model.predict("cable/test/bent_wire")[0].score          # doctest: +SKIP
    """

    quick_params = {"image_size": 64, "epochs": 2, "hidden_dim": 8, "num_heads": 2, "window_size": 3}

    neighborhood_size: int = 3
    hidden_dim: int = 128
    depth: int = 1
    num_heads: int = 4
    window_size: int = 7
    mlka_mask: bool = True
    epochs: int = 20
    train_batch_size: int = 8
    learning_rate: float = 1e-3
    jitter_scale: float = 1.0
    checkpoint_dir: str | None = None

    def _validate_method_params(self) -> None:
        check_positive_odd("neighborhood_size", self.neighborhood_size)
        check_positive_odd("window_size", self.window_size)
        if self.num_heads < 1 or self.hidden_dim < 4 or self.hidden_dim % 4 or self.hidden_dim % self.num_heads:
            raise FlawmapError(
                f"hidden_dim must be a multiple of 4 and of num_heads, got hidden_dim={self.hidden_dim}, "
                f"num_heads={self.num_heads}"
            )
        if self.depth < 1 or self.epochs < 1 or self.train_batch_size < 1:
            raise FlawmapError("depth, epochs and train_batch_size must be at least 1")
        if not self.learning_rate > 0.0 or not self.jitter_scale >= 0.0:
            raise FlawmapError(
                f"need learning_rate > 0 and jitter_scale >= 0, got {self.learning_rate} and {self.jitter_scale}"
            )

    def _new_scorer(self, backbone: Backbone, taps: tuple[str, ...]) -> RLRScorer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)  # the networks' initial weights
            return RLRScorer(
                backbone,
                taps,
                image_size=self.image_size,
                neighborhood_size=self.neighborhood_size,
                hidden_dim=self.hidden_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                window_size=self.window_size,
                mlka_mask=self.mlka_mask,
            )

    def _learn(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        levels = _cache_levels(feature_batches)
        earlier_losses = getattr(self, "train_losses_", None)
        if earlier_losses is None:  # first fit: standardise with its features
            for network, level in zip(self.scorer_.networks, levels):
                network.set_standardization(level)
        device = self.runtime.torch_device
        history = train(
            self.scorer_.networks,
            [level.to(device) for level in levels],
            lambda batch, generator: self.scorer_.training_loss(batch, generator, self.jitter_scale),
            epochs=self.epochs,
            batch_size=self.train_batch_size,
            learning_rate=self.learning_rate,
            seed=self.random_state + self.n_fits_,
            checkpoint=self._checkpoint(earlier_losses or []),
            progress="training rlr" if self.runtime.progress else None,
        )
        self.train_losses_ = (earlier_losses or []) + history.losses

    def _checkpoint(self, earlier_losses: list[float]) -> Checkpoint | None:
        """Where this fit's training state goes, and what a resumed fit must share with it: the
        hyper-parameters (``epochs`` aside) and the losses of the earlier fits of the model."""
        if self.checkpoint_dir is None:
            return None
        params = {name: value for name, value in self.get_params().items() if name not in _RUN_ONLY_PARAMS}
        folder = Path(self.checkpoint_dir) / f"fit-{self.n_fits_ + 1}"
        return Checkpoint(folder, {"params": params, "earlier_losses": earlier_losses})

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"train_losses_": self.train_losses_}, dict(self.scorer_.networks.state_dict())

    def from_state(self, fitted: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.scorer_.networks.load_state_dict(tensors)
        self.train_losses_ = list(fitted["train_losses_"])


# ---------------------------------------------------------------------- network
class ReferenceReconstructor(nn.Module):
    """Reconstructs one level's features from the learnable reference (steps 2-5).

    Parameters
    ----------
    channels : int
        Feature width ``C`` of the level.
    grid_hw : (int, int)
        The level's grid ``(h, w)``; ``N = h * w`` tokens.
    hidden_dim, depth, num_heads : int
        Token width, blocks, attention heads.
    window : int
        Odd window side for LCA and the MLKA mask on this grid.
    mlka_mask : bool
        Whether MLKA masks each token's own window.
    """

    def __init__(
        self,
        channels: int,
        grid_hw: tuple[int, int],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlka_mask: bool,
    ) -> None:
        super().__init__()
        n_positions = grid_hw[0] * grid_hw[1]
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.register_buffer("position", sincos_position_encoding(grid_hw, hidden_dim), persistent=False)
        self.reference = nn.Parameter(torch.randn(n_positions, channels))  # R, in standardised feature units
        self.embed = nn.Linear(channels, hidden_dim)  # W, the 1x1 projection
        self.blocks = nn.ModuleList(
            ReferenceBlock(hidden_dim, num_heads, grid_hw, window, mlka_mask) for _ in range(depth)
        )
        self.head = nn.Linear(hidden_dim, channels)

    def set_standardization(self, features: torch.Tensor) -> None:
        """Per-channel mean and std of training features (N, C, h, w)."""
        per_channel = features.transpose(0, 1).reshape(features.shape[1], -1).double()
        self.feature_mean.copy_(per_channel.mean(dim=1))
        self.feature_std.copy_(per_channel.std(dim=1).clamp_min(1e-6))

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, w) -> standardised tokens (B, h * w, C), row-major positions."""
        tokens = flatten_positions(features.float())
        return (tokens - self.feature_mean) / self.feature_std

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Standardised tokens (B, N, C) -> their reconstruction (B, N, C)."""
        reference = self.embed(self.reference) + self.position  # r = W R + p, (N, d)
        hidden = self.embed(tokens) + self.position  # t = W f + p, (B, N, d)
        for block in self.blocks:
            hidden = block(hidden, reference)
        return self.head(hidden)


class ReferenceBlock(nn.Module):
    """2 x LCA + MLKA, then a feed-forward layer; post-norm, no residual from the block input."""

    def __init__(self, hidden_dim: int, num_heads: int, grid_hw: tuple[int, int], window: int, mlka_mask: bool) -> None:
        super().__init__()
        self.first_lca = LocalCrossAttention(hidden_dim, num_heads, grid_hw, window)
        self.second_lca = LocalCrossAttention(hidden_dim, num_heads, grid_hw, window)
        self.mlka = MaskedLearnableKeyAttention(hidden_dim, num_heads, grid_hw, window if mlka_mask else None)
        ffn_dim = _FFN_EXPANSION * hidden_dim
        self.feed_forward = nn.Sequential(nn.Linear(hidden_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, hidden_dim))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, d) and reference tokens (N, d) -> (B, N, d)."""
        attended = self.norms[0](self.first_lca(tokens, reference))
        attended = self.norms[1](attended + self.second_lca(attended, reference))
        mixed = self.norms[2](attended + self.mlka(tokens, reference))
        return self.norms[3](mixed + self.feed_forward(mixed))


class LocalCrossAttention(nn.Module):
    """LCA (step 3): input queries attend to the reference within a ``window x window`` window.

    Near the border the window is clipped to the grid (positions outside get no weight).
    """

    def __init__(self, hidden_dim: int, num_heads: int, grid_hw: tuple[int, int], window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(hidden_dim, hidden_dim) for _ in range(4))
        index, valid = window_neighbours(grid_hw, window)
        self.register_buffer("window_index", index, persistent=False)
        self.register_buffer("window_valid", valid, persistent=False)

    def forward(self, queries: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Queries (B, N, d), reference tokens (N, d) -> (B, N, d)."""
        q = split_heads(self.query(queries), self.num_heads)  # (B, H, N, c)
        k = split_heads(self.key(reference), self.num_heads)[:, self.window_index]  # (H, N, K, c)
        v = split_heads(self.value(reference), self.num_heads)[:, self.window_index]
        logits = torch.einsum("bhnc,hnkc->bhnk", q, k) / math.sqrt(q.shape[-1])
        weights = logits.masked_fill(~self.window_valid, float("-inf")).softmax(dim=-1)
        return self.out(merge_heads(torch.einsum("bhnk,hnkc->bhnc", weights, v)))


class MaskedLearnableKeyAttention(nn.Module):
    """MLKA (step 4): input queries, learnable-reference keys, input values; own window masked.

    ``window=None`` attends everywhere, the token itself included (the shortcut ablation).
    """

    def __init__(self, hidden_dim: int, num_heads: int, grid_hw: tuple[int, int], window: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(hidden_dim, hidden_dim) for _ in range(4))
        allowed = None if window is None else ~window_mask(grid_hw, window)
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, inputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Input tokens (B, N, d), reference tokens (N, d) -> (B, N, d)."""
        q = split_heads(self.query(inputs), self.num_heads)  # (B, H, N, c)
        k = split_heads(self.key(reference), self.num_heads).expand(inputs.shape[0], -1, -1, -1)
        v = split_heads(self.value(inputs), self.num_heads)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)))


# ---------------------------------------------------------------------- helpers
def reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``MSE + (1 - cos)`` over channels: (B, N, C) twice -> (B, N)."""
    squared = (reconstruction - target).pow(2).mean(dim=-1)
    return squared + 1.0 - F.cosine_similarity(reconstruction, target, dim=-1)


def level_window(finest_window: int, finest_rows: int, rows: int) -> int:
    """Odd window side on a grid of ``rows`` covering at least the finest window's image area."""
    radius = math.ceil((finest_window // 2) * rows / finest_rows)
    return 2 * radius + 1


def window_neighbours(grid_hw: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major indices of each position's ``window x window`` neighbours and their validity.

    Returns
    -------
    index : LongTensor of shape (N, window * window)
        Neighbour positions, clamped into the grid where they fall outside it.
    valid : BoolTensor of shape (N, window * window)
        False for neighbours outside the grid.
    """
    rows, cols = grid_hw
    radius = window // 2
    offsets = torch.arange(-radius, radius + 1)
    row = torch.arange(rows).view(rows, 1, 1, 1) + offsets.view(1, 1, window, 1)  # (h, 1, K_r, 1)
    col = torch.arange(cols).view(1, cols, 1, 1) + offsets.view(1, 1, 1, window)  # (1, w, 1, K_c)
    valid = ((row >= 0) & (row < rows)) & ((col >= 0) & (col < cols))
    index = row.clamp(0, rows - 1) * cols + col.clamp(0, cols - 1)
    return index.reshape(rows * cols, window * window), valid.reshape(rows * cols, window * window)


def window_mask(grid_hw: tuple[int, int], window: int) -> torch.Tensor:
    """BoolTensor (N, N): True where position ``j`` lies in the ``window x window`` window of ``i``."""
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    radius = window // 2
    near_rows = (rows.view(-1, 1) - rows.view(1, -1)).abs() <= radius
    near_cols = (cols.view(-1, 1) - cols.view(1, -1)).abs() <= radius
    return near_rows & near_cols


def sincos_position_encoding(grid_hw: tuple[int, int], dim: int) -> torch.Tensor:
    """2-D sine-cosine positional encoding (N, dim): half the channels encode the row, half the column."""
    quarter = dim // 4
    frequencies = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    encodings = []
    for coordinate in (rows, cols):
        angles = coordinate.flatten().double().unsqueeze(1) * frequencies
        encodings += [angles.sin(), angles.cos()]
    return torch.cat(encodings, dim=1).float()


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., N, d) -> (..., H, N, d / H)."""
    *batch, n_tokens, dim = tokens.shape
    return tokens.reshape(*batch, n_tokens, num_heads, dim // num_heads).transpose(-3, -2)


def merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """(..., H, N, c) -> (..., N, H * c)."""
    merged = tokens.transpose(-3, -2)
    return merged.reshape(*merged.shape[:-2], -1)


def _cache_levels(feature_batches: Iterable[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Concatenate embedded batches into one float16 tensor (N, C_l, h_l, w_l) per level.

    The batches are consumed completely before concatenating, so the result is built outside
    the inference mode the shared pipeline embeds in, and can take part in training.
    """
    per_level: list[list[torch.Tensor]] = []
    for batch in feature_batches:
        if not per_level:
            per_level = [[] for _ in batch]
        for stored, level in zip(per_level, batch):
            stored.append(level.to("cpu", torch.float16).contiguous())
    if not per_level:
        raise FlawmapError("no valid training image left: every image was skipped")
    return [torch.cat(batches) for batches in per_level]
