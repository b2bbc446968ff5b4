"""The demo: train a tiny COTS on the embedded synthetic dataset, then evaluate retrieval.

    python -m cots.demo [--out runs/demo] [--steps N] [--device auto|cpu|cuda] [--quick]

Trains with every objective (ITC + KL with momentum distillation, MLM, MVM, the
adaptive momentum filter) for a few minutes on a CPU (seconds on a GPU), evaluates
image-to-text and text-to-image retrieval on a held-out split with 5 captions per image
(COCO's convention), prints R@1/5/10 next to chance and to the best possible R@1, the
best R@1 of a model that knows only some attributes (colours and sizes; and relations;
and shapes), and what the image ranked first for a caption shares with it
(:func:`top_image_agreement`), and writes ``summary.json`` and ``demo.png`` (loss terms
over steps, recall against chance) to the output folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from cots.config import COTSConfig
from cots.data import ShapesDataset
from cots.data.synthetic import CaptionMeaning, Mention, Scene, scene_meanings
from cots.retrieval import encode_dataset, retrieval_metrics
from cots.training.config import DataConfig, OptimConfig, TrainConfig
from cots.training.loop import train

TERMS = ("itc", "kl", "mlm", "mvm")
DIRECTIONS = ("i2t", "t2i")
KS = (1, 5, 10)
CAPTIONS_PER_IMAGE = 5
TARGET_FACTOR = 10.0  # R@1 at least 10x chance, both ways
STEPS = 1200  # 3-4 minutes of training on 2 CPU cores


def demo_config(out_dir: Path, steps: int, device: str, quick: bool) -> TrainConfig:
    """The demo's run: a tiny COTS sized to train in three to four minutes on two CPU cores.

    Trained from scratch for 1,200 steps, so unlike ALBEF (pretrained encoders, tens
    of thousands of steps), and the settings follow from that budget:

    - 8-pixel patches (16 per 32-pixel image): a step costs a quarter of what 4-pixel
      patches cost, and more steps of batch 32 learn more than fewer of batch 64.
    - Overlapping patch embeddings (``patch_overlap=8``: each token's kernel spans its
      patch and 8 pixels of every neighbour). The objects are 8 to 13 pixels across, so
      the patch grid cuts nearly all of them, and with disjoint patches no token sees a
      whole object. At the same cost per step this took R@1 from 15.4% / 15.9% to
      18.8% / 20.6% (seed 0; seeds 1 and 2: 21.6% / 20.9%, 17.0% / 18.3%), and the
      image ranked first got the relation right 64-67% of the time instead of 41%. A
      12-pixel overlap measured 18.4% / 20.8%, for more time per step.
    - MVM targets from mean-centred patches (``kmeans_centre``), 256 ids fitted on 640
      images (10,240 patches, enough for faiss at 256 centroids): the ids code outlines
      rather than colours, which the captions teach anyway. With the overlap, R@1 was
      19.1% / 19.9% on average over seeds 0, 1 and 2 with 64 raw-pixel ids, 20.1% /
      21.1% with 64 centred ids, and 20.3% / 21.1% with 256 centred ids fitted on 256
      images. This setting gave 21.2% / 22.4% (seed 0, the recorded run), 18.8% / 23.0%
      and 17.8% / 20.3% (seeds 1 and 2). 256 raw-pixel ids did not help without the
      overlap (13.2% / 13.2%, seed 0).
    - Momentum 0.9: the momentum encoders trail the online ones by about ten steps.
      ALBEF's 0.995 averages over the last 200 or so, a sixth of a run this short, so its
      keys would describe encoders that no longer exist.
    - The queues hold 4 batches and are in the loss from the first step, with no warm-up:
      with keys at most four steps old, queued negatives are as current as the batch's.
      (With momentum 0.99, this demo's earlier setting, stale queued keys outscored the
      positives and the run stayed at chance unless the queue joined half-way.) Larger
      queues measured worse at this length: 1,024 slots gave 10.6% / 11.8% R@1 after
      1,200 steps, 128 slots 16.6% / 15.7%.
    - The text feature is the mean over the caption's tokens.
    """
    model = COTSConfig(
        size="tiny", vision={"patch_size": 8, "patch_overlap": 8}, embed_dim=128, queue_size=64 if quick else 128,
        momentum=0.9, text_pooling="mean", amf_warmup_steps=steps // 2, visual_vocab_size=256,
        kmeans_centre=True,
    )  # fmt: skip
    data = DataConfig(dataset="shapes", train_size=256 if quick else 8192, max_len=16, tokenizer_images=640)
    optim = OptimConfig(lr=1e-3, weight_decay=0.02, warmup_steps=max(1, steps // 10), grad_clip=1.0)
    return TrainConfig(
        model=model, data=data, optim=optim, steps=steps, batch_size=16 if quick else 32, device=device,
        log_every=max(1, steps // 50), checkpoint_every=0, out_dir=str(out_dir), resume=None,
    )  # fmt: skip


#: What a caption can state, and so what a model can know: see :func:`best_recall_at_1`.
ATTRIBUTES: tuple[str, ...] = ("colour", "size", "shape", "relation")
#: The partial knowledge the demo reports the best R@1 of, next to the model's R@1.
KNOWLEDGE: tuple[tuple[str, ...], ...] = (
    ("colour", "size"),
    ("colour", "size", "relation"),
    ("colour", "size", "shape"),
)


def _known(meaning: CaptionMeaning, knows: frozenset[str]) -> CaptionMeaning:
    """What a model that knows only ``knows`` can tell of ``meaning``: the other attributes
    blanked, and without "relation" the objects in a fixed order (which one is named
    first says nothing more)."""
    objects = tuple(
        Mention(
            shape=o.shape if "shape" in knows else "",
            color=o.color if "colour" in knows else "",
            size=o.size if "size" in knows else None,
        )
        for o in meaning.objects
    )
    if "relation" in knows:
        return CaptionMeaning(objects, meaning.relation)
    return CaptionMeaning(tuple(sorted(objects, key=lambda o: (o.shape, o.color, o.size or ""))), None)


def best_recall_at_1(
    scenes: Sequence[Scene], meanings: Sequence[Sequence[CaptionMeaning]], knows: Collection[str] = ATTRIBUTES
) -> dict[str, float]:
    """The expected R@1 (percent) of a perfect model on a split: ``{"i2t": ..., "t2i": ...}``.

    A caption fits an image when it describes the image truly and completely: its meaning
    is one of :func:`scene_meanings` of the image's scene (same objects with their shape,
    colour and, where stated, size, and the same relation, told from either side). Several
    images can fit a caption (same shapes, colours, sizes and relation), and nothing in
    the caption tells them apart, so a caption that fits k images of the split is equally
    likely to belong to each of them: probability 1/k. A perfect model ranks candidates by
    that probability and breaks ties at random:

    - text -> image: the k images a caption fits come first, in random order, so the
      caption's R@1 is 1/k; averaged over all captions.
    - image -> text: the captions that fit the image come first, those that fit the fewest
      images on top (a caption that states sizes fits fewer); with t such top captions of
      which o are the image's own, its R@1 is o/t; averaged over images.

    Ranking all the fitting captions alike, ignoring how many images each fits, gives a
    lower image -> text value (58.3% instead of 62.2% on the demo's 500 test images).

    Args:
        scenes: the N images' scenes (``ShapesDataset.attributes``).
        meanings: per image, what each of its captions states (``ShapesDataset.caption_meanings``).
        knows: the attributes (of :data:`ATTRIBUTES`) the model tells apart, all by default.
            With fewer, the best R@1 of a model that knows those perfectly and nothing
            else: captions and images that differ only in what it does not know tie. The
            demo's model reaches about what ``("colour", "size")`` allows.
    """
    if len(scenes) != len(meanings) or not scenes or not all(meanings):
        raise ValueError("need one scene and at least one caption per image, for at least one image")
    known = frozenset(knows)
    if not known <= set(ATTRIBUTES):
        raise ValueError(f"knows must name attributes of {ATTRIBUTES}, got {sorted(known - set(ATTRIBUTES))}")
    fitting = [{_known(m, known) for m in scene_meanings(scene)} for scene in scenes]
    images_fitting: dict[CaptionMeaning, int] = {}  # meaning -> how many images it fits
    for fits in fitting:
        for meaning in fits:
            images_fitting[meaning] = images_fitting.get(meaning, 0) + 1
    owners: dict[CaptionMeaning, list[int]] = {}  # meaning -> the image of each caption saying it
    stated = [[_known(m, known) for m in captions] for captions in meanings]
    for image, captions in enumerate(stated):
        for meaning in captions:
            owners.setdefault(meaning, []).append(image)
    t2i = [1.0 / images_fitting[meaning] for captions in stated for meaning in captions]
    i2t = []
    for image, fits in enumerate(fitting):
        # Every caption that fits, with the number of images it fits; the image's own are among them.
        candidates = [(images_fitting[m], owner) for m in fits for owner in owners.get(m, ())]
        fewest = min(k for k, _ in candidates)
        top = [owner for k, owner in candidates if k == fewest]
        i2t.append(top.count(image) / len(top))
    return {"i2t": 100.0 * sum(i2t) / len(i2t), "t2i": 100.0 * sum(t2i) / len(t2i)}


#: What :func:`top_image_agreement` checks, each a view of a caption's meaning: the
#: top-ranked image agrees on an attribute when one of its own meanings has the same view.
_VIEWS = {
    "colours": lambda m: _known(m, frozenset({"colour"})),  # the objects' count and colours
    "sizes": lambda m: tuple(sorted((o.color, o.size or "") for o in m.objects if o.size)),  # stated sizes
    "shapes": lambda m: _known(m, frozenset({"shape"})),  # the objects' count and shapes
    # which colour lies where (two objects): sizes and shapes left aside
    "relation": lambda m: _known(m, frozenset({"colour", "relation"})),
    "everything": lambda m: m,  # the image fits the caption
}


def top_image_agreement(
    scenes: Sequence[Scene], meanings: Sequence[Sequence[CaptionMeaning]], top: Sequence[int]
) -> dict[str, float]:
    """What the image a model ranks first for each caption gets right, attribute by attribute.

    For every caption (text -> image), whether the top-ranked image shows what the
    caption states about its objects' colours, stated sizes and shapes, about which
    colour lies where (two-object captions only), and all of it (the image fits the
    caption). A perfect model scores 100% on each; R@1 is at most the "everything" share
    (the caption's own image fits it, and so can others). The shares tell what a model
    has learned, e.g. colours long before shapes.

    Args:
        scenes: the N images' scenes (``ShapesDataset.attributes``).
        meanings: per image, what each of its captions states (``ShapesDataset.caption_meanings``).
        top: per caption, in the order of ``meanings`` flattened, the index of the image ranked first.

    Returns:
        {"colours", "sizes", "shapes", "relation", "everything"}: percent of the captions
        that state the attribute ("sizes": captions stating a size; "relation": two-object
        captions) whose top image agrees.
    """
    captions = [meaning for image in meanings for meaning in image]
    if len(top) != len(captions):
        raise ValueError(f"top has {len(top)} entries for {len(captions)} captions")
    if any(not 0 <= i < len(scenes) for i in top):
        raise ValueError(f"top must hold image indices in [0, {len(scenes)})")
    agree = {name: [0, 0] for name in _VIEWS}  # name -> [agreeing, stating]
    for meaning, image in zip(captions, top):
        fits = scene_meanings(scenes[image])
        for name, view in _VIEWS.items():
            if (name == "sizes" and not view(meaning)) or (name == "relation" and meaning.relation is None):
                continue
            agree[name][0] += view(meaning) in {view(f) for f in fits}
            agree[name][1] += 1
    return {name: 100.0 * hits / count if count else float("nan") for name, (hits, count) in agree.items()}


def format_table(metrics: dict[str, float], best: dict[str, float]) -> str:
    """The demo's result table: R@1/5/10 both ways, chance R@1 and the best possible R@1."""
    names = {"i2t": "image -> text", "t2i": "text -> image"}
    header = f"{'direction':<15}" + "".join(f"{f'R@{k}':>8}" for k in KS)
    lines = [header + f"{'chance R@1':>12}{'best R@1':>10}{'R@1 / best':>12}"]
    for d in DIRECTIONS:
        recalls = "".join(f"{metrics[f'{d}_r{k}']:>7.1f}%" for k in KS)
        lines.append(
            f"{names[d]:<15}{recalls}{metrics[f'{d}_r1_chance']:>11.2f}%{best[d]:>9.1f}%"
            f"{metrics[f'{d}_r1'] / best[d]:>12.2f}"
        )
    return "\n".join(lines)


def format_agreement(agreement: dict[str, float]) -> str:
    """One line of :func:`top_image_agreement`'s shares."""
    names = {"sizes": "stated sizes", "relation": "relation (two objects)"}
    shares = ", ".join(f"{names.get(name, name)} {share:.1f}%" for name, share in agreement.items())
    return f"the image ranked first for a caption shows its {shares} (a perfect model: 100% each)"


def format_knowledge(partial: dict[str, dict[str, float]]) -> str:
    """One line of the best R@1 under partial knowledge (``summary["best_r1_knowing"]``)."""
    shares = "; ".join(f"{known} {best['i2t']:.1f}% / {best['t2i']:.1f}%" for known, best in partial.items())
    return f"best R@1 (image -> text / text -> image) of a model that knows only {shares}"


def _plot(history: list[dict[str, Any]], metrics: dict[str, float], best: dict[str, float], path: Path) -> bool:
    """Draw the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (losses, recalls) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    for term in TERMS:
        losses.plot(steps, [r[term] for r in history], label=term)
    losses.set(xlabel="step", ylabel="loss", title="training losses", yscale="log")
    losses.legend()
    width = 0.35
    for i, d in enumerate(DIRECTIONS):
        xs = [j + (i - 0.5) * width for j in range(len(KS))]
        recalls.bar(xs, [metrics[f"{d}_r{k}"] for k in KS], width, label=d)
        recalls.scatter(xs, [metrics[f"{d}_r{k}_chance"] for k in KS], color="black", marker="_", s=200)
        recalls.scatter(xs[0], best[d], color="red", marker="_", s=200)
    recalls.set_xticks(range(len(KS)), [f"R@{k}" for k in KS])
    recalls.set(ylabel="recall (%)", title="held-out retrieval (black: chance, red: best possible R@1)")
    recalls.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _clear_previous_run(out_dir: Path) -> None:
    """Remove what an earlier demo wrote there: the demo always trains afresh (training
    refuses to start over a folder holding another run's checkpoints)."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for name in ("config.json", "log.jsonl", "summary.json", "demo.png"):
        (out_dir / name).unlink(missing_ok=True)


def run(out_dir: Path, steps: int, device: str = "auto", quick: bool = False, test_size: int = 500) -> dict[str, Any]:
    """Train, evaluate, write ``summary.json`` and ``demo.png``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(out_dir)
    config = demo_config(out_dir, steps, device, quick)
    start = time.perf_counter()
    result = train(config)
    train_s = time.perf_counter() - start
    model, tokenizer = result.model, result.tokenizer
    test_set = ShapesDataset(
        test_size, split="test", image_size=config.image_size, seed=config.seed, captions_per_image=CAPTIONS_PER_IMAGE
    )
    start = time.perf_counter()
    image_emb, text_emb, owner = encode_dataset(model, test_set, tokenizer, batch_size=128, max_len=config.data.max_len)
    metrics = retrieval_metrics(image_emb, text_emb, owner)
    eval_s = time.perf_counter() - start
    scenes = [test_set.attributes(i) for i in range(test_size)]
    meanings = [test_set.caption_meanings(i) for i in range(test_size)]
    best = best_recall_at_1(scenes, meanings)
    partial = {"+".join(knows): best_recall_at_1(scenes, meanings, knows) for knows in KNOWLEDGE}
    agreement = top_image_agreement(scenes, meanings, (text_emb @ image_emb.T).argmax(dim=1).tolist())
    ratios = {d: metrics[f"{d}_r1"] / metrics[f"{d}_r1_chance"] for d in DIRECTIONS}
    device_used = next(model.parameters()).device
    summary = {
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device_used),
            "gpu": torch.cuda.get_device_name(device_used) if device_used.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "config": config.to_dict(),
        "test_images": test_size,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "metrics": metrics,
        "r1_over_chance": ratios,
        "best_possible_r1": best,
        "best_r1_knowing": partial,
        "top_image_agreement": agreement,
        "meets_target": all(r >= TARGET_FACTOR for r in ratios.values()),
        "final_terms": {k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))},
        "history": result.history,
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plotted = _plot(result.history, metrics, best, out_dir / "demo.png")
    wrote = (
        f"{out_dir / 'summary.json'} and {out_dir / 'demo.png'}"
        if plotted
        else (f"{out_dir / 'summary.json'} (no plot: matplotlib is not installed)")
    )
    print(
        f"\ntrained {steps} steps in {train_s:.0f} s on {device_used}; evaluated {test_size} held-out images x "
        f"{CAPTIONS_PER_IMAGE} captions in {eval_s:.0f} s\n\n{format_table(metrics, best)}\n\n"
        f"{format_knowledge(partial)}\n\n{format_agreement(agreement)}\n\n"
        f"R@1 at least {TARGET_FACTOR:.0f}x chance both ways: {'yes' if summary['meets_target'] else 'NO'}\n"
        f"wrote {wrote}",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 1 when R@1 misses 10x chance (outside --quick)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {STEPS}, 20 with --quick)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps on small data: a smoke test")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else STEPS)
    summary = run(args.out, steps, args.device, args.quick, test_size=64 if args.quick else 500)
    return 0 if summary["meets_target"] or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
