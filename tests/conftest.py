"""Shared helpers for the vitslim_core tests: small timm ViTs, random scores, specs.

Helpers are exposed as fixtures (not imported by name) so that other conftest files in sub-folders
cannot clash with this module's name.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from vitslim_core import ArchSpec, MaskScores, arch_spec

torch.set_num_threads(1)  # tiny models: one thread is faster than two that wait for each other

# (timm name, kwargs) of small but structurally different supported ViTs (random weights, no download)
SMALL_VITS = {
    "deit_tiny_32": ("deit_tiny_patch16_224", dict(img_size=32, depth=2)),
    "deit_tiny_64": ("deit_tiny_patch16_224", dict(img_size=64, depth=2)),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2)),
    "reg4_gap": ("vit_base_patch16_reg4_gap_256", dict(img_size=64, depth=2, embed_dim=64, num_heads=2)),
    "nobias_layerscale": ("deit_tiny_patch16_224", dict(img_size=32, depth=2, qkv_bias=False, init_values=1e-5)),
    # no prefix token at all: average pooling with fc_norm
    "noprefix_gap": ("vit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2, class_token=False,
                                                  global_pool="avg")),
}


_BUILT: dict = {}


def build_vit(key_or_name: str, seed: int = 0, randomize: bool = True, **kwargs) -> torch.nn.Module:
    """A small timm ViT in eval mode; ``randomize`` also perturbs biases, norms and LayerScale so that
    no parameter sits at a special value (zero bias, unit norm weight) that could hide a bug.

    Built models are cached; every call returns a fresh deep copy."""
    key = (key_or_name, seed, randomize, repr(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = _build_vit(key_or_name, seed, randomize, **kwargs)
    return copy.deepcopy(_BUILT[key])


def _build_vit(key_or_name: str, seed: int, randomize: bool, **kwargs) -> torch.nn.Module:
    if key_or_name in SMALL_VITS:
        name, kw = SMALL_VITS[key_or_name]
        kw = {**kw, **kwargs}
    else:
        name, kw = key_or_name, kwargs
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=kw.pop("num_classes", 10), **kw).eval()
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim == 1:
                    base = 1.0 if (n.endswith("norm1.weight") or n.endswith("norm2.weight")
                                   or n.endswith("norm.weight")) else 0.0
                    if ".ls" in n:
                        base = 0.5
                    p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
                elif n.endswith("pos_embed") or "token" in n:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for b in model.blocks:
        b.attn.fused_attn = fused


def image_batch(model_or_spec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    spec = model_or_spec if isinstance(model_or_spec, ArchSpec) else arch_spec(model_or_spec)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_chans, *spec.img_size, generator=g)


def meta_spec(name: str, **kwargs) -> ArchSpec:
    """ArchSpec of a timm model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, **kwargs)
    return arch_spec(m, model_name=name, model_kwargs=kwargs)


def random_scores(spec: ArchSpec, attn_mode: str = "head_dim", seed: int = 0, meta: dict | None = None) -> MaskScores:
    """Scores with distinct random values in every dimension (tokens: raw in (-3, 3))."""
    sc = MaskScores.dense(spec, attn_mode, meta=meta)
    g = torch.Generator().manual_seed(seed)
    sc.attn = [torch.rand(v.shape, generator=g) for v in sc.attn]
    sc.mlp = [torch.rand(v.shape, generator=g) for v in sc.mlp]
    sc.token = [6 * torch.rand(v.shape, generator=g) - 3 for v in sc.token]
    sc.validate()
    return sc


def assert_one_line(err: BaseException) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


@pytest.fixture(scope="session")
def vit():
    return build_vit


@pytest.fixture(scope="session")
def fused():
    return set_fused


@pytest.fixture(scope="session")
def images():
    return image_batch


@pytest.fixture(scope="session")
def rscores():
    return random_scores


@pytest.fixture(scope="session")
def one_line():
    return assert_one_line


@pytest.fixture(scope="session")
def deit_s_spec() -> ArchSpec:
    return meta_spec("deit_small_patch16_224")


@pytest.fixture(scope="session")
def meta_arch():
    return meta_spec


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """A tiny real search run on the digits (random-init demo model, a few steps): a run folder."""
    from vitslim_core.search import SearchConfig, search
    out = tmp_path_factory.mktemp("quick_run") / "run"
    search(SearchConfig(out=str(out), model="digits-vit", data="digits", batch_size=32, max_steps=6, epochs=1,
                        lr=1e-3, mask_lr=5e-2, w_attn=1e-2, w_mlp=1e-2, w_token=1e-2, device="cpu", log_every=2,
                        seed=1))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of tiny models: a second thread only adds synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
