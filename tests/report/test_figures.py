"""Which figure draws which metric, from the names alone: every key in exactly one figure, objectives and
evaluation families the report has never heard of included, and the known families' layouts."""
from clus_jax.report.figures import Figure, eval_panels, figures, histograms

# What a clip + two-head run logs at a training step and at an evaluation, and names the report cannot know.
LOGGED = [
    "train/loss", "train/clip/loss", "train/clip/pos_cosine", "train/learning_rate", "train/logit_scale",
    "train/logit_bias", "train/grad_norm", "train/param_norm", "train/nonfinite", "train/images_per_sec",
    "train/data_wait_fraction", "data/skipped",
    "train/twohead/loss", "train/twohead/queue_in_use",
    *(f"train/twohead/head_{h}/{m}" for h in (0, 1, 10) for m in ("loss", "entropy", "used_image", "used_text")),
    "zeroshot/easyvqa/top1", "zeroshot/easyvqa/top5", "zeroshot/easyvqa/mean_per_class_top1",
    "retrieval/emoji/i2t_r1", "retrieval/emoji/i2t_r10", "retrieval/emoji/i2t_r5", "retrieval/emoji/t2i_r1",
    "retrieval/emoji/oddly_named",
    "probe/easyvqa/knn_top1", "probe/easyvqa/linear_top1",
    *(f"cluster/easyvqa/{h}_{s}" for h in ("head_1", "kmeans", "head_0") for s in ("purity", "nmi", "ari")),
    "train/toyobj/loss", "train/toyobj/spread", "objectives/toyobj/norm", "toyeval/set/score", "toyeval/set/other",
    "lonely", "zeroshot",
]


def by_name(keys) -> dict[str, Figure]:
    return {f.name: f for f in figures(keys)}


def test_every_key_is_drawn_in_exactly_one_figure():
    drawn = [k for f in figures(LOGGED) for k in f.keys]
    assert sorted(drawn) == sorted(LOGGED)


def test_the_figures_and_their_order():
    assert [f.name for f in figures(LOGGED)] == [
        "loss", "learning_rate", "logit_scale", "train", "objective_clip", "objective_toyobj", "objective_twohead",
        "eval_zeroshot", "eval_retrieval", "eval_probe", "eval_cluster",
        "eval_data", "eval_lonely", "eval_objectives", "eval_toyeval"]


def test_the_loss_figure_is_the_total_then_each_objectives_loss():
    loss = by_name(LOGGED)["loss"]
    assert loss.panels == (("total (weighted sum)", [("train/loss", "")]), ("clip", [("train/clip/loss", "")]),
                           ("toyobj", [("train/toyobj/loss", "")]), ("twohead", [("train/twohead/loss", "")]))
    assert by_name(["train/x/loss"])["loss"].keys == ["train/x/loss"]  # no total logged: no empty panel


def test_an_objectives_other_metrics_fill_one_row_per_sub_path():
    fig = by_name(LOGGED)["objective_twohead"]
    titles = [None if p is None else p[0] for p in fig.panels]
    assert fig.ncols == 3
    assert titles == ["queue_in_use", None, None,
                      "head_0/loss", "head_0/entropy", "head_0/used_image", "head_0/used_text", None, None,
                      "head_1/loss", "head_1/entropy", "head_1/used_image", "head_1/used_text", None, None,
                      "head_10/loss", "head_10/entropy", "head_10/used_image", "head_10/used_text"]
    assert by_name(LOGGED)["objective_toyobj"].keys == ["train/toyobj/spread"]


def test_the_other_step_metrics_share_one_figure_and_learning_rate_has_its_own():
    names = by_name(LOGGED)
    assert names["learning_rate"].keys == ["train/learning_rate"] and names["learning_rate"].ncols == 1
    assert names["train"].keys == ["train/data_wait_fraction", "train/grad_norm", "train/images_per_sec",
                                   "train/logit_bias", "train/nonfinite", "train/param_norm"]


def test_known_evaluation_layouts():
    assert eval_panels(LOGGED, "retrieval") == [
        ("emoji i2t", [("retrieval/emoji/i2t_r1", "R@1"), ("retrieval/emoji/i2t_r5", "R@5"),
                       ("retrieval/emoji/i2t_r10", "R@10")]),
        ("emoji t2i", [("retrieval/emoji/t2i_r1", "R@1")]),
        ("emoji/oddly_named", [("retrieval/emoji/oddly_named", "")])]
    cluster = eval_panels(LOGGED, "cluster")
    assert [t for t, _ in cluster] == ["easyvqa nmi", "easyvqa ari", "easyvqa purity"]
    assert cluster[0][1] == [("cluster/easyvqa/kmeans_nmi", "kmeans"), ("cluster/easyvqa/head_0_nmi", "head_0"),
                             ("cluster/easyvqa/head_1_nmi", "head_1")]
    assert eval_panels(LOGGED, "zeroshot")[0] == ("easyvqa", [
        ("zeroshot/easyvqa/top1", "top1"), ("zeroshot/easyvqa/top5", "top5"),
        ("zeroshot/easyvqa/mean_per_class_top1", "mean_per_class_top1")])
    assert by_name(LOGGED)["eval_cluster"].from_zero


def test_an_unknown_family_gets_one_panel_per_metric():
    toy = by_name(LOGGED)["eval_toyeval"]
    assert toy.panels == (("set/other", [("toyeval/set/other", "")]), ("set/score", [("toyeval/set/score", "")]))
    assert not toy.from_zero  # its values may be negative


def test_names_that_slug_alike_get_two_files():
    names = [f.name for f in figures(["a b/x", "a_b/x"])]
    assert names == ["eval_a_b", "eval_a_b_2"]


# What the benchmark evaluators log (evaluate/benchmarks.py), entries named by the config.
BENCHMARKS = [
    "zeroshot/in1k/top1", "zeroshot/in1k/mean_per_class_recall", "zeroshot/in1k/decode_errors",
    *(f"fewshot/pets/{k}shot" for k in (10, 1, 5)), "fewshot/pets/1shot_std", "fewshot/pets/5shot_std",
    "fewshot/pets/decode_errors", "knn/c/top1", "knn/a/top1", "knn/a/decode_errors",
    "eval_speed/b/seconds", "eval_speed/a/seconds", "eval_speed/a/images_per_second",
]


def test_benchmark_families_layouts():
    names = by_name(BENCHMARKS)
    assert [f.name for f in figures(BENCHMARKS)] == ["eval_zeroshot", "eval_fewshot", "eval_knn", "eval_eval_speed"]
    assert all(f.from_zero for f in names.values())
    assert names["eval_zeroshot"].panels == (
        ("in1k", [("zeroshot/in1k/top1", "top1"), ("zeroshot/in1k/mean_per_class_recall", "mean_per_class_recall")]),
        ("decode errors", [("zeroshot/in1k/decode_errors", "in1k")]))
    # The k-shot accuracies as lines of one panel per entry, their spread over the draws in the next.
    assert names["eval_fewshot"].panels == (
        ("pets", [("fewshot/pets/1shot", "1-shot"), ("fewshot/pets/5shot", "5-shot"),
                  ("fewshot/pets/10shot", "10-shot")]),
        ("pets_std", [("fewshot/pets/1shot_std", "1-shot"), ("fewshot/pets/5shot_std", "5-shot")]),
        ("decode errors", [("fewshot/pets/decode_errors", "pets")]))
    assert names["eval_knn"].panels == (("a", [("knn/a/top1", "top1")]), ("c", [("knn/c/top1", "top1")]),
                                        ("decode errors", [("knn/a/decode_errors", "a")]))
    # Speed: one panel per measure, one line per entry.
    assert names["eval_eval_speed"].panels == (
        ("images_per_second", [("eval_speed/a/images_per_second", "a")]),
        ("seconds", [("eval_speed/a/seconds", "a"), ("eval_speed/b/seconds", "b")]))


# A distribution logged as its quantiles (CLIP+Reg's margins: train/clip_reg/margin/<i2t|t2i>/<min|p10..|max|mean>).
QUANTILES = ["min", "p10", "p50", "p90", "max"]
GAPS = ["train/obj/loss", "train/obj/spread", "train/obj/range/min", "train/obj/range/max",
        *(f"train/obj/gap/{d}/{q}" for d in ("b", "a") for q in (*QUANTILES, "mean"))]


def test_a_distribution_logged_as_quantiles_is_one_panel_of_lines():
    fig = by_name(GAPS)["objective_obj"]
    lines = {d: [(f"train/obj/gap/{d}/{q}", q) for q in (*QUANTILES, "mean")] for d in ("a", "b")}
    # min and max alone are no distribution: a panel each; the two quantile sets share the row of "gap".
    assert fig.ncols == 2 and fig.panels == (
        ("spread", [("train/obj/spread", "")]), None,
        ("gap/a", lines["a"]), ("gap/b", lines["b"]),
        ("range/max", [("train/obj/range/max", "")]), ("range/min", [("train/obj/range/min", "")]))
    assert sorted(k for f in figures(GAPS) for k in f.keys) == sorted(GAPS)


def test_each_path_of_distributions_is_one_histogram():
    assert histograms(GAPS) == {"train/obj/gap": [
        (d, [(f"train/obj/gap/{d}/{q}", q) for q in QUANTILES]) for d in ("a", "b")]}
    assert histograms(["x/min", "x/max", "x/mean", "y/p50"]) == {}  # no pNN between min and max; no min, max
