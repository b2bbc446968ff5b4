"""Visual tokenizers: discrete targets for masked vision modelling.

A visual tokenizer maps each patch of an image to an id in ``[0, vocab_size)``, in
row-major patch order, so that ids line up with the vision encoder's patch tokens.

- :class:`KMeansPatchTokenizer`: k-means codebook over raw patch pixels, fitted on a sample
  of the training images. Needs no pretrained model, which suits small synthetic setups.
- :class:`DVAETokenizer`: wraps a pretrained discrete VAE encoder (DALL-E / BEiT), as the
  COTS paper uses.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DVAETokenizer", "KMeansPatchTokenizer", "VisualTokenizer", "patchify"]

# Patches scored against the codebook at once: bounds the (chunk, vocab) distance matrix.
_ASSIGN_CHUNK = 8192
# DALL-E's dVAE expects pixels squeezed into [eps, 1 - eps] (its `map_pixels`).
_DALLE_EPS = 0.1


@runtime_checkable
class VisualTokenizer(Protocol):
    """Anything that maps images (B, 3, H, W) to patch token ids (B, N), N = (H/p)(W/p),
    row-major, each id in ``[0, vocab_size)``."""

    vocab_size: int
    patch_size: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, patch_size: int, in_chans: int | None = None):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f"images have {images.shape[1]} channels, expected {in_chans}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Flattens non-overlapping patches: (B, C, H, W) -> (B, N, C * p * p), row-major
    patches, each flattened channel-first like a ``Conv2d`` patch-embedding kernel."""
    _check_images(images, patch_size)
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for each row of ``x`` (M, D) -> (M,)."""
    c_sq = (centroids * centroids).sum(1)
    out = []
    for chunk in x.split(_ASSIGN_CHUNK):
        # ||x||^2 is the same for every centroid, so it does not change the argmin.
        out.append((c_sq - 2 * chunk @ centroids.T).argmin(1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


def _torch_kmeans(x: torch.Tensor, k: int, niter: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means, random distinct points as the initial centroids; a cluster that
    empties is restarted at a random point (as faiss does, roughly). (M, D) -> (k, D)."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(niter):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if empty.any():
            restart = torch.randint(x.shape[0], (int(empty.sum()),), generator=g)
            centroids[empty] = x[restart]
    return centroids


class KMeansPatchTokenizer(nn.Module):
    """Patch ids from a k-means codebook over patch pixels.

    By default patches are clustered as they are, so the ids code mostly a patch's colour
    and how much of it an object covers. With ``centre=True`` each patch's mean is taken
    out of each channel first (for fitting and for assigning), so the ids code the
    patch's pattern (edges, corners, curves) and every patch of one flat colour gets the
    same id: masked vision modelling then asks the encoder for the outlines of objects
    rather than their colours, which the captions teach anyway. Fit on images normalised
    the same way as the ones later tokenized.

    The centroids are a buffer, so they travel with ``state_dict`` / checkpoints; load them
    into a tokenizer built with the same ``vocab_size``, ``patch_size`` and ``in_chans``.
    The ``centre`` setting travels with them (buffer ``centred``) and loading a codebook
    into a tokenizer with the other setting raises; a state_dict saved without it is a
    raw-pixel codebook.

    Args:
        vocab_size: number of centroids (ids).
        patch_size: side of the square patches; must match the vision encoder's.
        in_chans: image channels.
        centre: cluster mean-centred patches (see above). A codebook fitted with one
            setting is only meaningful with the same setting.
    """

    def __init__(self, vocab_size: int, patch_size: int, *, in_chans: int = 3, centre: bool = False):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("patch_size", patch_size), ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(centre, bool):
            raise TypeError(f"centre must be a bool, got {type(centre).__name__}")
        self.vocab_size = vocab_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.centre = centre
        self.register_buffer("centroids", torch.zeros(vocab_size, in_chans * patch_size**2))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("centred", torch.tensor(centre))
        # A host-side mirror of the buffer: once it is True, forward checks it without a
        # device sync (the buffer may also be filled by load_state_dict or a broadcast).
        self._is_fitted = False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A codebook fitted on centred patches assigns raw patches meaningless ids (and the
        # other way round), so a mismatch must not load silently. Codebooks saved before
        # the setting existed were all raw-pixel ones.
        key = prefix + "centred"
        saved = bool(state_dict[key]) if key in state_dict else False
        if saved != self.centre:
            error_msgs.append(
                f"the codebook was fitted with centre={saved} but this KMeansPatchTokenizer has "
                f"centre={self.centre}; build it with centre={saved}"
            )
        state_dict.setdefault(key, torch.tensor(saved))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def fit(
        self, images: torch.Tensor, *, niter: int = 20, seed: int = 0, max_patches: int = 100_000
    ) -> KMeansPatchTokenizer:
        """Learns the codebook from ``images`` (N, C, H, W).

        Uses ``faiss.Kmeans`` (L2, not spherical) on at most ``max_patches`` patches drawn
        at random (seeded); without faiss it warns and runs Lloyd's k-means in torch.
        Returns ``self``.
        """
        _check_images(images, self.patch_size, self.in_chans)
        if not isinstance(niter, int) or niter < 1:
            raise ValueError(f"niter must be a positive int, got {niter!r}")
        if not isinstance(max_patches, int) or max_patches < self.vocab_size:
            raise ValueError(f"max_patches must be an int >= vocab_size ({self.vocab_size}), got {max_patches!r}")
        x = self._features(images.detach().float().cpu()).reshape(-1, self.centroids.shape[1])
        if x.shape[0] < self.vocab_size:
            raise ValueError(f"{x.shape[0]} patches cannot fit {self.vocab_size} centroids; pass more images")
        if x.shape[0] > max_patches:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:max_patches]]
        try:
            import faiss
        except ImportError:
            warnings.warn(
                "faiss is not installed; fitting KMeansPatchTokenizer with the slower torch k-means",
                RuntimeWarning,
                stacklevel=2,
            )
            centroids = _torch_kmeans(x, self.vocab_size, niter, seed)
        else:
            kmeans = faiss.Kmeans(x.shape[1], self.vocab_size, niter=niter, seed=seed, spherical=False, verbose=False)
            kmeans.train(x.contiguous().numpy())
            centroids = torch.from_numpy(kmeans.centroids)
        self.centroids.copy_(centroids)
        self.fitted.fill_(True)
        self._is_fitted = True
        return self

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """What is clustered: (B, C, H, W) -> (B, N, C * p * p), patchified and, with
        ``centre``, minus each patch's per-channel mean."""
        x = patchify(images, self.patch_size)
        if not self.centre:
            return x
        b, n, _ = x.shape
        x = x.reshape(b, n, self.in_chans, -1)
        return (x - x.mean(-1, keepdim=True)).reshape(b, n, -1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid id per patch: images (B, C, H, W) -> LongTensor (B, N)."""
        if not self._is_fitted:
            self._is_fitted = bool(self.fitted)
        if not self._is_fitted:
            raise RuntimeError(
                "KMeansPatchTokenizer is not fitted: call fit(images) or load a state_dict that holds fitted centroids"
            )
        _check_images(images, self.patch_size, self.in_chans)
        x = self._features(images.to(self.centroids.dtype))
        b, n, d = x.shape
        return _nearest(x.reshape(b * n, d), self.centroids).reshape(b, n)


class DVAETokenizer(nn.Module):
    """Patch ids from a discrete VAE encoder (DALL-E / BEiT style).

    ``encoder`` maps pixels (B, 3, h_in, w_in) to logits (B, vocab_size, H/p, W/p); the id
    of a patch is the argmax over the vocabulary. Images arrive normalised for the vision
    encoder: ``image_mean`` / ``image_std`` undo that to [0, 1] pixels, ``input_size``
    optionally resizes them (BEiT feeds its dVAE 112 px views of 224 px images, so a
    stride-8 encoder yields the 14x14 grid of 16 px patches) and ``input_map="dalle"``
    applies DALL-E's ``x -> (1 - 2 eps) x + eps`` (eps = 0.1); ``"none"`` passes pixels on.

    The encoder is frozen and always in eval mode. It is a submodule, so ``.to(device)``
    moves it and its weights appear in ``state_dict`` under ``encoder.``.

    Args:
        encoder: the dVAE encoder module.
        patch_size: the vision encoder's patch size (defines the expected grid).
        vocab_size: the dVAE codebook size (8192 for DALL-E).
        input_map: ``"dalle"`` or ``"none"``.
        image_mean, image_std: normalisation to undo (None: images are already pixels).
        input_size: side the images are resized to (bilinear, antialiased) before encoding.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        patch_size: int,
        vocab_size: int,
        input_map: str = "dalle",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        for name, value in (("patch_size", patch_size), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if input_map not in ("dalle", "none"):
            raise ValueError(f"input_map must be 'dalle' or 'none', got {input_map!r}")
        if (image_mean is None) != (image_std is None):
            raise ValueError("give both image_mean and image_std, or neither")
        if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise ValueError(f"input_size must be a positive int or None, got {input_size!r}")
        # Parameter by parameter: ScriptModules do not support Module.requires_grad_.
        for param in encoder.parameters():
            param.requires_grad_(False)
        self.encoder = encoder.eval()
        self.patch_size = patch_size
        self.vocab_size = vocab_size
        self.input_map = input_map
        self.input_size = input_size
        if image_mean is not None:
            self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1))
        else:
            self.image_mean = self.image_std = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, map_location="cpu", **kwargs) -> DVAETokenizer:
        """Loads the encoder from ``path`` and wraps it (``kwargs`` go to the constructor).

        ``path`` is a TorchScript archive (``torch.jit.save``) or a whole pickled module
        (``torch.save(module)``). Unpickling runs code from the file
        (``torch.load(weights_only=False)``): load only files you trust. A state_dict is
        rejected; build the encoder and pass it to the constructor instead.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dVAE checkpoint not found: {path}")
        # TorchScript archives hold constants.pkl; torch.save archives do not.
        is_script = False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                is_script = any(n.endswith("/constants.pkl") for n in archive.namelist())
        if is_script:
            encoder = torch.jit.load(path, map_location=map_location)
        else:
            encoder = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(encoder, nn.Module):
            hint = " (a state_dict?)" if isinstance(encoder, dict) else ""
            raise TypeError(
                f"{path} holds a {type(encoder).__name__}{hint}, not a module; build "
                "the encoder and pass it to DVAETokenizer(encoder, ...)"
            )
        return cls(encoder, **kwargs)

    def train(self, mode: bool = True) -> DVAETokenizer:
        """Keeps the frozen encoder in eval mode whatever the parent model's mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), normalised as for the vision encoder -> ids (B, N)."""
        _check_images(images, self.patch_size)
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        x = images.float()
        if self.image_mean is not None:
            x = x * self.image_std + self.image_mean
        if self.input_size is not None:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        if self.input_map == "dalle":
            x = (1 - 2 * _DALLE_EPS) * x + _DALLE_EPS
        logits = self.encoder(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"dVAE encoder must return logits (B, vocab, h, w), got {shape}")
        if logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"dVAE encoder returns {logits.shape[1]} logits per position, but vocab_size is {self.vocab_size}"
            )
        if tuple(logits.shape[2:]) != grid:
            raise ValueError(
                f"dVAE grid {tuple(logits.shape[2:])} does not match the patch grid "
                f"{grid} of {images.shape[2]}x{images.shape[3]} images with "
                f"patch_size {self.patch_size}; set input_size so that they agree"
            )
        return logits.argmax(1).flatten(1)
