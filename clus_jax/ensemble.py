"""MoDE's ensemble evaluation: n expert runs, each alone, the best of them, their uniform average and the
metadata ensemble, on the zero-shot and retrieval sets.

    python -m clus_jax.ensemble --experts RUN_0 RUN_1 ... --clusters CLUSTERS --captions EMB
        [--expert-ids 0,1,...] [--baseline RUN] [--sets embedded] [--out DIR] [--batch-size N] [--temperature 8]

``RUN_i`` are expert workdirs (``clus_jax.load``), trained on the subsets of coarse clusters
``--expert-ids`` (default 0, 1, ...); ``CLUSTERS`` is the ``python -m clus_jax.cluster --levels M,N``
output the subsets came from and ``EMB`` the caption embedding directory that was clustered, whose
``embed.json`` names the caption encoder (``--encoder minilm`` or a run's text tower), so task metadata
is embedded the way the captions were. Rows of the report:

- ``expert_<c>``: expert c alone;
- ``best_expert``: per metric the best expert (an oracle choice, MetaCLIP's ``expert-max``);
- ``uniform``: the experts' cosine logits averaged with equal weights (``all_unit``);
- ``ensemble``: MoDE's metadata routing (``clustering.mode_ensemble``): zero-shot weights
  ``mode_ensemble_weights`` of the class-name embeddings (each class's prompts embedded by the caption
  encoder, averaged and normalised) against the fine centres; text->image retrieval per-query weights
  ``retrieval_weights`` of each caption; image->text retrieval the weights of the whole caption corpus;
- ``baseline`` (with ``--baseline``): one run, e.g. a dense CLIP at the same total compute.

Weights are computed over all coarse clusters; when only some have a trained expert, the weights of those
are renormalised to sum to 1. Mixed logits are ``sum_k w_k * cos_k`` (``mode_ensemble.ensemble_logits``); for
ranking they equal the cosine of the experts' embeddings concatenated with ``sqrt(w_k)`` (query side
``w_k`` with per-query weights), which is how the figures are computed here, by the trainer's own metric
functions. Figures use the trainer's metric names (``zeroshot/<set>/top1``, ``retrieval/<set>/t2i_r10``);
``DIR`` gets ``ensemble.json`` (every row, the weights) and ``ensemble.md`` (the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clus_jax.common import cli
from clus_jax.clustering import mode_ensemble
from clus_jax.evaluate import metrics
from clus_jax.data.eval_sets import ClassificationSet, RetrievalSet
from clus_jax.evaluate.runner import RETRIEVAL_KS, ZEROSHOT_KS

RESULT_FILE = "ensemble.json"
TABLE_FILE = "ensemble.md"
TextEncoder = Callable[[list[str]], np.ndarray]


@dataclasses.dataclass
class SetOutputs:
    """One model's embeddings of one set: images [N, D] and either the zero-shot classifier [C, D] or the
    captions [M, D]."""

    images: np.ndarray
    texts: np.ndarray


def model_outputs(encode_images: Callable[[np.ndarray], np.ndarray], encode_texts: TextEncoder,
                  sets: Sequence[ClassificationSet | RetrievalSet]) -> dict[str, SetOutputs]:
    """Per set, a model's unit image embeddings and its classifier (prompts averaged CLIP style) or captions."""
    out = {}
    for s in sets:
        images = metrics.l2_normalize(np.asarray(encode_images(s.images), np.float32))
        if isinstance(s, ClassificationSet):
            prompts = [t.replace("{}", c) for c in s.classnames for t in s.templates]
            texts = np.asarray(encode_texts(prompts), np.float32).reshape(len(s.classnames), len(s.templates), -1)
            out[s.name] = SetOutputs(images, metrics.zeroshot_classifier(texts))
        else:
            out[s.name] = SetOutputs(images, metrics.l2_normalize(np.asarray(encode_texts(list(s.captions)), np.float32)))
    return out


def class_embeddings(encode_captions: TextEncoder, s: ClassificationSet) -> np.ndarray:
    """[C, D] caption-encoder embeddings of the class names: each class's prompts averaged, then normalised
    (MetaCLIP's ``build_text_indfeatures`` averages the templates' features)."""
    prompts = [t.replace("{}", c) for c in s.classnames for t in s.templates]
    e = metrics.l2_normalize(np.asarray(encode_captions(prompts), np.float32))
    return metrics.l2_normalize(e.reshape(len(s.classnames), len(s.templates), -1).mean(axis=1))


@dataclasses.dataclass
class Routing:
    """MoDE's weights of the trained experts, per set: [E] for a zero-shot set; for retrieval [M, E] per
    caption query (t2i) and [E] from the caption corpus (i2t)."""

    zeroshot: dict[str, np.ndarray]
    t2i: dict[str, np.ndarray]
    i2t: dict[str, np.ndarray]


def _restricted(weights: np.ndarray, expert_ids: Sequence[int]) -> np.ndarray:
    w = np.asarray(weights, np.float64)[..., list(expert_ids)]
    return w / w.sum(axis=-1, keepdims=True)


def metadata_routing(sets: Sequence[ClassificationSet | RetrievalSet], encode_captions: TextEncoder,
                     fine_centers: np.ndarray, fine_to_coarse: np.ndarray, num_clusters: int,
                     expert_ids: Sequence[int], temperature: float = mode_ensemble.TEMPERATURE) -> Routing:
    """The ensemble's weights of experts ``expert_ids`` (coarse cluster ids) for every set; ``temperature``
    divides the scores before the softmax (MetaCLIP's 8; lower is sharper routing)."""
    routing = Routing({}, {}, {})
    t = {"temperature": temperature}
    for s in sets:
        if isinstance(s, ClassificationSet):
            w = mode_ensemble.mode_ensemble_weights(class_embeddings(encode_captions, s), fine_centers,
                                                    fine_to_coarse, num_clusters, **t)
            routing.zeroshot[s.name] = _restricted(w, expert_ids)
        else:
            captions = metrics.l2_normalize(np.asarray(encode_captions(list(s.captions)), np.float32))
            routing.t2i[s.name] = _restricted(mode_ensemble.retrieval_weights(
                captions, fine_centers, fine_to_coarse, num_clusters, **t), expert_ids)
            routing.i2t[s.name] = _restricted(mode_ensemble.mode_ensemble_weights(
                captions, fine_centers, fine_to_coarse, num_clusters, **t), expert_ids)
    return routing


def _mix(parts: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Rows whose dot products are sum_k w_k <a_k, b_k>: [N, E*D] of parts [E][N, D] times weights [E] or [N, E]."""
    w = np.asarray(weights, np.float32)
    w = np.broadcast_to(w, (len(parts[0]), len(parts))) if w.ndim == 1 else w
    return np.concatenate([p * w[:, k:k + 1] for k, p in enumerate(parts)], axis=1)


def mixture_metrics(outputs: Sequence[Mapping[str, SetOutputs]], sets: Sequence[ClassificationSet | RetrievalSet],
                    zeroshot_weights: Mapping[str, np.ndarray], t2i_weights: Mapping[str, np.ndarray],
                    i2t_weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Metrics of the models ``outputs`` mixed by weights: zero-shot logits ``sum_k w_k cos_k`` with the set's
    weights [E]; text->image with per-query weights [M, E]; image->text with the set's weights [E]."""
    out: dict[str, float] = {}
    for s in sets:
        per_model = [o[s.name] for o in outputs]
        if isinstance(s, ClassificationSet):
            w = np.sqrt(np.asarray(zeroshot_weights[s.name]))
            images = _mix([p.images for p in per_model], w)
            classifier = _mix([p.texts for p in per_model], w)
            acc = metrics.zeroshot_accuracy(images, s.labels, classifier, ks=ZEROSHOT_KS)
            out.update({f"zeroshot/{s.name}/top{k}": acc[f"top{k}"] for k in ZEROSHOT_KS})
            continue
        # text -> image: query q weighs expert k by w_qk; the image side is the plain concatenation
        t2i = metrics.retrieval_recall(_mix([p.images for p in per_model], np.ones(len(per_model))),
                                       _mix([p.texts for p in per_model], t2i_weights[s.name]),
                                       s.caption_to_image, ks=RETRIEVAL_KS)
        w = np.sqrt(np.asarray(i2t_weights[s.name]))
        i2t = metrics.retrieval_recall(_mix([p.images for p in per_model], w), _mix([p.texts for p in per_model], w),
                                       s.caption_to_image, ks=RETRIEVAL_KS)
        out.update({f"retrieval/{s.name}/i2t_r{k}": i2t[f"i2t_r{k}"] for k in RETRIEVAL_KS})
        out.update({f"retrieval/{s.name}/t2i_r{k}": t2i[f"t2i_r{k}"] for k in RETRIEVAL_KS})
    return out


def report_rows(outputs: Sequence[Mapping[str, SetOutputs]], expert_ids: Sequence[int],
                sets: Sequence[ClassificationSet | RetrievalSet], routing: Routing,
                baseline: Mapping[str, SetOutputs] | None = None) -> dict[str, dict[str, float]]:
    """{row: metrics}: every expert alone, the best expert per metric, the uniform average, the ensemble and
    the baseline."""
    def constant(weights: np.ndarray) -> tuple[dict, dict, dict]:
        zs = {s.name: weights for s in sets if isinstance(s, ClassificationSet)}
        rt = {s.name: weights for s in sets if isinstance(s, RetrievalSet)}
        return zs, rt, rt

    rows = {f"expert_{c}": mixture_metrics([o], sets, *constant(np.ones(1))) for c, o in zip(expert_ids, outputs)}
    experts = list(rows.values())
    rows["best_expert"] = {k: max(r[k] for r in experts) for k in experts[0]}
    rows["uniform"] = mixture_metrics(outputs, sets, *constant(np.full(len(outputs), 1.0 / len(outputs))))
    rows["ensemble"] = mixture_metrics(outputs, sets, routing.zeroshot, routing.t2i, routing.i2t)
    if baseline is not None:
        rows["baseline"] = mixture_metrics([baseline], sets, *constant(np.ones(1)))
    return rows


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """One line per row, one column per metric (the set and metric of its name)."""
    names = [c.split("/", 1)[1].replace("/", " ") for c in columns]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |" for row, values in rows.items()]
    return "\n".join(lines)


REPORTED = ("zeroshot/easyvqa/top1", "zeroshot/emoji_category/top1", "retrieval/emoji_heldout/t2i_r10",
            "retrieval/emoji_heldout/i2t_r10", "retrieval/emoji_openmoji/t2i_r10", "retrieval/emoji_openmoji/i2t_r10")


def caption_encoder(captions_dir: str) -> TextEncoder:
    """The encoder that embedded ``captions_dir`` (its ``embed.json``): MiniLM or a run's text tower."""
    from clus_jax.embed import SPEC_FILE, CaptionEncoder

    with open(os.path.join(captions_dir, SPEC_FILE), encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("encoder") == "minilm":
        return CaptionEncoder().encode_text
    import clus_jax

    return clus_jax.load(spec["workdir"], spec.get("step")).encode_text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m clus_jax.ensemble", allow_abbrev=False,
                           description="MoDE: every expert, the best, the uniform average and the metadata ensemble.")
    p.add_argument("--experts", nargs="+", required=True, help="expert workdirs")
    p.add_argument("--expert-ids", default=None, help="coarse cluster of each expert, comma-separated (default 0,1,...)")
    p.add_argument("--clusters", required=True, help="python -m clus_jax.cluster --levels M,N output")
    p.add_argument("--captions", required=True, help="the clustered caption embeddings (python -m clus_jax.embed)")
    p.add_argument("--baseline", default=None, help="one more run reported alone (a dense CLIP)")
    p.add_argument("--sets", default="embedded", choices=("embedded", "none"), help="evaluation sets (default embedded)")
    p.add_argument("--out", default=None, help="directory for ensemble.json and ensemble.md")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: config.evals.batch_size)")
    p.add_argument("--temperature", type=float, default=mode_ensemble.TEMPERATURE,
                   help="routing softmax temperature (default 8, MetaCLIP's post_report_ensemble)")
    args = p.parse_args(argv)
    if args.temperature <= 0:
        cli.fail(f"--temperature={args.temperature} must be positive")
    try:
        ids = [int(x) for x in args.expert_ids.split(",")] if args.expert_ids else list(range(len(args.experts)))
    except ValueError:
        cli.fail(f"--expert-ids={args.expert_ids!r}: expected comma-separated integers")
    if len(ids) != len(args.experts) or len(set(ids)) != len(ids) or min(ids) < 0:
        cli.fail(f"--expert-ids={args.expert_ids!r}: one distinct non-negative id per expert ({len(args.experts)})")
    args.expert_ids = ids
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the experts, routes, evaluates; returns ``{rows, weights, ...}`` (written to ``--out``)."""
    import clus_jax
    from clus_jax.clustering.outputs import load_hierarchy
    from clus_jax.evaluate.embedded import load_sets

    if args.out:
        cli.check_out_dir("--out", args.out)
    try:
        fine_centers, fine_to_coarse, num_clusters, _ = load_hierarchy(args.clusters)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--clusters {cli.exception_text(e)}") from None
    if max(args.expert_ids) >= num_clusters:
        raise cli.InputError(f"--expert-ids {args.expert_ids}: {args.clusters} has {num_clusters} coarse clusters")
    outputs, sets = [], None
    for workdir in args.experts + ([args.baseline] if args.baseline else []):
        model = clus_jax.load(workdir, batch_size=args.batch_size)
        if sets is None:
            loaded = load_sets(model.config) if args.sets == "embedded" else []
            sets = [s for s in loaded if isinstance(s, (ClassificationSet, RetrievalSet))]
            if not sets:
                raise cli.UsageError(f"--sets {args.sets} has no zero-shot or retrieval set")
        outputs.append(model_outputs(model.encode_image, model.encode_text, sets))
        del model
    baseline = outputs.pop() if args.baseline else None
    routing = metadata_routing(sets, caption_encoder(args.captions), fine_centers, fine_to_coarse, num_clusters,
                               args.expert_ids, args.temperature)
    rows = report_rows(outputs, args.expert_ids, sets, routing, baseline)
    result = {"experts": args.experts, "expert_ids": args.expert_ids, "baseline": args.baseline,
              "temperature": args.temperature, "rows": rows,
              "weights": {"zeroshot": {k: v.tolist() for k, v in routing.zeroshot.items()},
                          "i2t": {k: v.tolist() for k, v in routing.i2t.items()},
                          "t2i_mean": {k: v.mean(axis=0).tolist() for k, v in routing.t2i.items()}}}
    columns = [c for c in REPORTED if c in rows["ensemble"]] or list(rows["ensemble"])
    result["table"] = markdown_table(rows, columns)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, RESULT_FILE), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, TABLE_FILE), "w", encoding="utf-8") as f:
            f.write(result["table"] + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = cli.run_command(lambda: run(args), input_errors=(FileNotFoundError, ValueError))
    print(result["table"], flush=True)
    print(json.dumps({"rows": result["rows"], "weights": result["weights"]}), flush=True)


if __name__ == "__main__":
    main()
