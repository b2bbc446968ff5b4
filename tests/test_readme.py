"""README.md's Python samples run, and its statements about the API hold.

Every ```python block of README.md is executed on its own, doctest-style, in a fresh
namespace that holds only the stand-in inputs the block refers to (``image_feat``,
``temp``, ``images``, ``config``...), built at tiny shapes by :class:`StandIns`. A block
that uses a name neither it nor :class:`StandIns` defines fails with a NameError, so a
sample cannot drift away from the code silently; a stand-in that no block uses any more
fails :func:`test_every_stand_in_is_used`. Facts stated in prose (the ``impl=`` names,
defaults) are checked against the code by the tests at the end.

Only the public API is used: ``cots_kernels`` and ``cots`` and the op packages'
``IMPLEMENTATIONS`` exports, never a module inside an op package.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cots import COTSConfig
from cots.data import VOCABULARY, ShapesDataset
from cots.tokenizers import WordTokenizer
from cots_kernels import AdaptiveMomentumFilter, CotsContrastiveLoss, contrastive, linear_ce, mha, momentum

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Block:
    """One ```python block: its code, the README line of its first code line, its section."""

    code: str
    line: int
    section: str

    @property
    def id(self) -> str:
        return f"line{self.line}"


def _python_blocks(text: str) -> list[Block]:
    blocks, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            blocks.append(Block("\n".join(lines[start:end]) + "\n", start + 1, section))
            i = end
        i += 1
    return blocks


BLOCKS = _python_blocks(TEXT)


def _sections(text: str) -> dict[str, str]:
    """Each '## ' heading of the README, mapped to its section's text."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2])}


def _loaded_names(code: str) -> set[str]:
    """Every name the code reads (a superset of its free names, which is all we need)."""
    nodes = ast.walk(ast.parse(code))
    return {node.id for node in nodes if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


class _Normalized(nn.Module):
    """A stand-in tower: any module, then L2 normalisation (what the samples' encoders return)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=-1)


def _unit(*shape: int, grad: bool = False) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1).requires_grad_(grad)


class StandIns:
    """The inputs the samples assume, at tiny shapes; each property is one name.

    Built per block, each only when the block refers to it. Sizes: B = 4 query rows,
    D = 32, Q = 48 queue slots, 2 ranks (so gathered keys are (2B, D)).

    The COTS model sample builds its model from ``config``, which the block before it
    sets to the ``base`` preset (ViT-B/16 + BERT-base: minutes per step on a CPU). Here
    ``config`` is a tiny COTSConfig with the same fields (one-layer tiny encoders, a
    64-slot queue, 16 visual tokens), so that sample runs as written in seconds; the
    ``base`` config block itself runs as written (it builds no model).
    """

    B = 4
    _dim, _slots = 256, 48
    rank = 1  # of 2: the gathered keys below hold 2 * B rows

    # ---- the contrastive loss
    @functools.cached_property
    def image_feat(self) -> torch.Tensor:
        return _unit(self.B, self._dim, grad=True)

    @functools.cached_property
    def text_feat(self) -> torch.Tensor:
        return _unit(self.B, self._dim, grad=True)

    @functools.cached_property
    def image_feat_m(self) -> torch.Tensor:
        return _unit(self.B, self._dim)

    @functools.cached_property
    def text_feat_m(self) -> torch.Tensor:
        return _unit(self.B, self._dim)

    @functools.cached_property
    def all_image_feat_m(self) -> torch.Tensor:
        return _unit(2 * self.B, self._dim)

    @functools.cached_property
    def all_text_feat_m(self) -> torch.Tensor:
        return _unit(2 * self.B, self._dim)

    @functools.cached_property
    def image_queue(self) -> torch.Tensor:
        return _unit(self._slots, self._dim)

    @functools.cached_property
    def text_queue(self) -> torch.Tensor:
        return _unit(self._slots, self._dim)

    @functools.cached_property
    def temp(self) -> torch.Tensor:
        return torch.tensor(0.07, requires_grad=True)

    @functools.cached_property
    def img(self) -> torch.Tensor:
        return _unit(self.B, self._dim, grad=True)

    @functools.cached_property
    def txt(self) -> torch.Tensor:
        return _unit(self.B, self._dim, grad=True)

    @functools.cached_property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(1 / 0.07, requires_grad=True)

    @functools.cached_property
    def logit_bias(self) -> torch.Tensor:
        return torch.tensor(-10.0, requires_grad=True)  # SigLIP's initial bias

    # ---- momentum machinery: towers mapping images (B, 3, 8, 8) and texts (B, 6) to (B, 256)
    @functools.cached_property
    def image_encoder(self) -> nn.Module:
        return _Normalized(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 256)))

    @functools.cached_property
    def text_encoder(self) -> nn.Module:
        return _Normalized(nn.EmbeddingBag(50, 256))

    @functools.cached_property
    def images(self) -> torch.Tensor:
        return torch.randn(self.B, 3, 8, 8)

    @functools.cached_property
    def texts(self) -> torch.Tensor:
        return torch.randint(0, 50, (self.B, 6))

    steps = 100

    @functools.cached_property
    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)).to(torch.bfloat16)

    # ---- attention: (B, H, L, d) = (2, 2, 5, 8), a padded second row
    @functools.cached_property
    def q(self) -> torch.Tensor:
        return torch.randn(2, 2, 5, 8)

    @functools.cached_property
    def k(self) -> torch.Tensor:
        return torch.randn(2, 2, 5, 8)

    @functools.cached_property
    def v(self) -> torch.Tensor:
        return torch.randn(2, 2, 5, 8)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        return torch.tensor([[True] * 5, [True, True, True, False, False]])

    @functools.cached_property
    def x(self) -> torch.Tensor:
        return torch.randn(2, 5, 768)

    # ---- linear cross-entropy: N = 6 rows, D = 16, V = 10, one ignored row
    @functools.cached_property
    def hidden(self) -> torch.Tensor:
        return torch.randn(6, 16, requires_grad=True)

    @functools.cached_property
    def head(self) -> nn.Module:
        return nn.Linear(16, 10)

    @functools.cached_property
    def targets(self) -> torch.Tensor:
        return torch.tensor([3, 0, 9, -100, 5, 5])

    # ---- the COTS model layer
    @functools.cached_property
    def config(self) -> COTSConfig:
        return COTSConfig(
            size="tiny", vision={"depth": 1}, text={"depth": 1}, embed_dim=32,
            queue_size=64, visual_vocab_size=16, amf_warmup_steps=0,
        )  # fmt: skip

    @functools.cached_property
    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer.from_corpus(sorted(VOCABULARY))

    @functools.cached_property
    def dataset(self) -> ShapesDataset:
        return ShapesDataset(64, image_size=self.config.vision_config().image_size)  # one batch of 64

    @functools.cached_property
    def test_set(self) -> ShapesDataset:
        return ShapesDataset(16, split="test", image_size=self.config.vision_config().image_size)

    @functools.cached_property
    def train_images(self) -> torch.Tensor:
        # 640 patches for 16 centroids: faiss asks for at least 39 per centroid.
        return torch.stack([self.dataset[i]["image"] for i in range(10)])


STAND_INS = {name for name in dir(StandIns) if not name.startswith("_")}


def _namespace(code: str) -> dict:
    stand_ins = StandIns()
    return {name: getattr(stand_ins, name) for name in _loaded_names(code) & STAND_INS}


def run_block(block: Block) -> dict:
    """Execute a block as README.md shows it; return its namespace afterwards."""
    namespace = _namespace(block.code)
    # Padded so that tracebacks point at README.md's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    torch.manual_seed(0)
    try:
        exec(code, namespace)
    except NameError as exc:
        pytest.fail(
            f"README.md sample at line {block.line} ({block.section}) uses {exc.name!r}, which neither the "
            "sample nor the test's stand-ins define: define it in the sample, or add a stand-in to StandIns"
        )
    return namespace


def test_the_readme_has_samples():
    assert len(BLOCKS) >= 8, [b.section for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_sample_runs(block: Block):
    namespace = run_block(block)
    # A "# terms: a, b, ..." comment lists the keys of the sample's out.terms.
    listed = re.search(r"#\s*terms:\s*(.+)$", block.code, flags=re.MULTILINE)
    if listed:
        names = {name.strip() for name in listed.group(1).split(",")}
        assert names == set(namespace["out"].terms), f"README line {block.line}: the terms listed differ"


def test_every_stand_in_is_used():
    used = set().union(*(_loaded_names(b.code) for b in BLOCKS))
    assert STAND_INS <= used, f"stand-ins no README sample uses any more: {sorted(STAND_INS - used)}"


def test_a_name_nobody_defines_fails_the_sample():
    block = Block("out = attention(q, k, v)\n", 1, "a broken sample")
    with pytest.raises(pytest.fail.Exception, match="'attention'"):
        run_block(block)


def test_stand_ins_do_not_shadow_builtins():
    assert not STAND_INS & set(dir(builtins))


# ---- statements in prose, checked against the code ----

OPS = {
    "cots_contrastive_loss": contrastive.IMPLEMENTATIONS,
    "linear_cross_entropy": linear_ce.IMPLEMENTATIONS,
    "momentum_update_": momentum.IMPLEMENTATIONS,
    "attention": mha.IMPLEMENTATIONS,
}

SECTION_OPS = {
    "The queue contrastive loss with KL alignment": "cots_contrastive_loss",
    "Attention with padding masks": "attention",
    "Fused linear cross-entropy (the MVLM heads)": "linear_cross_entropy",
}


def _names(implementations) -> list[str]:
    return [impl.name for impl in implementations]


@pytest.mark.parametrize("section", sorted(SECTION_OPS))
def test_listed_implementations_are_the_ops(section):
    """Each op section's "Implementations (`impl=`)" paragraph names exactly the op's implementations."""
    body = _sections(TEXT)[section]
    match = re.search(r"Implementations \(`impl=`\)(.*?)(?:\n\n|$)", body, flags=re.DOTALL)
    assert match, f"section {section!r} has no 'Implementations (`impl=`)' paragraph"
    listed = set(re.findall(r'`"(\w+)"`', match.group(1))) - {"auto"}
    assert listed == set(_names(OPS[SECTION_OPS[section]])), section


def test_status_table_lists_implementations_in_auto_order():
    rows = [line for line in _sections(TEXT)["Status"].splitlines() if line.startswith("| `")]
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ops = re.findall(r"`(\w+)`", cells[0])
        op = next((o for o in ops if o in OPS), None)
        if op is None:
            continue
        seen.add(op)
        assert re.findall(r"`(\w+)`", cells[1]) == _names(OPS[op]), op
    assert seen == set(OPS)


def test_contrastive_module_temperature_is_as_described():
    """Fixed unless learnable_temperature=True; then a parameter clamped to (0.001, 0.5)."""
    parameters = inspect.signature(CotsContrastiveLoss).parameters
    assert parameters["learnable_temperature"].default is False
    assert parameters["temperature_bounds"].default == (0.001, 0.5)
    assert isinstance(CotsContrastiveLoss(0.07).temperature, float)
    loss_fn = CotsContrastiveLoss(0.07, learnable_temperature=True)
    assert [p is loss_fn.temperature for p in loss_fn.parameters()] == [True]
    with torch.no_grad():
        loss_fn.temperature.fill_(2.0)
    x = _unit(3, 8)
    loss_fn(x, x, x, x)
    assert loss_fn.temperature.item() == 0.5


def test_cots_defaults_are_the_ones_the_readme_names():
    config = COTSConfig()
    assert (config.embed_dim, config.queue_size, config.momentum) == (256, 65_536, 0.995)
    assert (config.temperature, config.learnable_temperature) == (0.07, True)
    assert (config.distill_alpha, config.kl_weight, config.mlm_prob, config.mvm_ratio) == (0.4, 1.0, 0.15, 0.4)
    assert (config.visual_vocab_size, config.amf) == (8192, True)


def test_filter_warm_up_is_as_described():
    """AdaptiveMomentumFilter keeps every pair until its similarity queue has filled once."""
    amf = AdaptiveMomentumFilter(8, k=0.0)
    for _ in range(3):  # 6 of 8 slots filled
        assert amf(torch.tensor([0.9, -0.9])).tolist() == [1.0, 1.0]
    amf(torch.tensor([0.9, 0.9]))  # full
    assert amf(torch.tensor([0.9, -0.9])).tolist() == [1.0, 0.0]


def test_demo_numbers_are_the_recorded_run():
    """The demo's table and shares in the README are those of benchmarks/results/demo_cpu.json."""
    run = json.loads((README.parent / "benchmarks" / "results" / "demo_cpu.json").read_text())
    metrics, best = run["metrics"], run["best_possible_r1"]
    for name, d in (("image -> text", "i2t"), ("text -> image", "t2i")):
        row = next(line for line in TEXT.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        recalls = [f"{metrics[f'{d}_r{k}']:.1f}%" for k in (1, 5, 10)]
        ratio = f"{metrics[f'{d}_r1'] / metrics[f'{d}_r1_chance']:.0f}x"
        assert cells == [*recalls, f"{metrics[f'{d}_r1_chance']:.2f}%", f"{best[d]:.1f}%", ratio], name
    prose = " ".join(TEXT.split())
    assert f"measured: {run['train_seconds']:.0f} s of training for {run['config']['steps']:,} steps" in prose
    for name, share in run["top_image_agreement"].items():
        assert f"{share:.1f}%" in prose, name
    for knows, partial in run["best_r1_knowing"].items():
        assert f"{partial['i2t']:.1f}% / {partial['t2i']:.1f}%" in prose, knows
