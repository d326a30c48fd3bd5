"""The ablation driver: variant planning, training + evaluation end to end, resuming, the report."""
import json
import math
import os

import pytest

from raphael_jax.analysis import ablate
from raphael_jax.cli.ablate import main as ablate_main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")
SMALL = ["model.channels=(8, 16)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 0)",
         "model.mid_block=False", "model.head_dim=8", "text.width=16", "model.context_dim=16",
         "text.num_layers=1", "model.edge.channels=4", "model.edge.num_layers=2", "train.batch_size=2",
         "train.log_every=1", "train.checkpoint_every=2",
         "train.sample_every=0", "train.warmup_steps=1"]


def test_expand_and_plan_share_identical_configs(tmp_path):
    assert ablate.expand_variants("fig6b,full,experts=6") == ["full", "no_space_moe", "no_time_moe",
                                                              "no_edge", "experts=6"]
    assert len(ablate.expand_variants("all")) == len(set(ablate.expand_variants("all")))
    vs = ablate.plan(CONFIG, ["full", "experts=4", "experts=0", "no_space_moe", "no_edge+experts=2"],
                     str(tmp_path), steps=7, seed=3)
    by = {v.name: v for v in vs}
    # configs/tiny.py has 4 experts: experts=4 is the full model and shares its run
    assert by["experts=4"].same_as == "full" and by["experts=4"].workdir == by["full"].workdir
    assert by["no_space_moe"].same_as == "experts=0"
    assert by["no_edge+experts=2"].workdir.endswith("no_edge__experts-2")
    c = by["no_edge+experts=2"].config
    assert not c.model.edge.enabled and c.model.space_moe.num_experts == 2
    assert all(v.config.train.num_steps == 7 and v.config.seed == 3 for v in vs)
    with pytest.raises(ValueError, match="unknown config variant"):
        ablate.plan(CONFIG, ["no_such_switch"], str(tmp_path))


def test_headline_metrics():
    res = {"results": {"1_object": {"all": 0.5, "colour": 1.0, "place": 0.5, "kind": 0.5, "size": 1.0,
                                    "colour_and_place_all": float("nan")},
                       "2_object": {"all": 0.25, "colour": 0.5, "place": 0.5, "kind": 0.5, "size": 0.5,
                                    "colour_and_place_all": 0.5}}, "sfd": None}
    h = ablate.headline(res)
    assert h["align"] == pytest.approx(0.375) and h["cp_multi"] == 0.5 and "cp_1" not in h
    assert h["colour"] == 0.75 and h["all_2"] == 0.25
    assert math.isnan(ablate.headline({"results": {"1_object": res["results"]["1_object"]}})["cp_multi"])


def test_driver_end_to_end_resumes_and_skips(tmp_path, monkeypatch, capsys):
    from flax import nnx

    from raphael_jax.evaluation.shapes_fd import ShapesFeatureNet, ShapesNetConfig, save_feature_net

    root, docs = tmp_path / "root", tmp_path / "docs"
    net = save_feature_net(ShapesFeatureNet(ShapesNetConfig(widths=(4, 4), feature_dim=1), rngs=nnx.Rngs(0)),
                           tmp_path / "sfd.safetensors")  # untrained: exercises the SFD path only
    argv = ["--root", str(root), "--config", CONFIG, "--variants", "full,experts=4,no_edge", "--steps",
            "2", "--guidance", "1.5,4.5", "--objects", "1,2", "--num-prompts", "2", "--ddim-steps", "2",
            "--sfd-net", str(net), "--sfd-samples", "2", "--docs", str(docs)]
    argv += [a for s in SMALL for a in ("--set", s)]
    assert ablate_main(argv) == 0
    out = capsys.readouterr().out
    assert "full: trained" in out and "no_edge: trained" in out and "experts=4: shared" in out
    for name in ("full", "no_edge"):
        cached = sorted(os.listdir(root / name / "eval"))
        assert cached == [f"ablate_step2_g{g}_n2_ddim2_seed1234.json" for g in ("1.5", "4.5")]
        r = json.load(open(root / name / "eval" / cached[0]))
        assert set(r["results"]) == {"1_object", "2_object"} and r["results"]["2_object"]["num_multi"] == 2
        assert r["sfd"] >= 0.0 and r["sfd_samples"] == 2 and r["sfd_objects"] == "1-2"  # follows --objects
    assert not (root / "experts-4").exists()
    table = (docs / "ablations.md").read_text()
    for row in ("| full | 1.5 |", "| full | 4.5 |", "| no_edge | 4.5 |", "| experts=4 | 1.5 |"):
        assert row in table
    assert "sqrt(p(1-p)/2) = 0.354 at p = 0.5" in table  # the noise level of 2 prompts per entry
    assert "experts=4 (= full)" in table and "cp 2-obj" in table and "SFD" in table
    assert (docs / "ablation_components.png").stat().st_size > 1000
    rows = json.load(open(docs / "ablations.json"))["rows"]
    assert len(rows) == 6

    # second call: nothing is trained or sampled again, the table is rewritten from the caches
    mtimes = {p: os.path.getmtime(p) for p in (root / "full" / "eval").iterdir()}

    def fail(*a, **k):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr("raphael_jax.train.loop.train_and_evaluate", fail)
    monkeypatch.setattr("raphael_jax.evaluation.alignment.evaluate_alignment", fail)
    os.remove(docs / "ablations.md")
    assert ablate_main(argv) == 0
    out = capsys.readouterr().out
    assert "full: done" in out and "no_edge: done" in out

    def body(text):
        return [line for line in text.splitlines() if not line.startswith("Generated by")]

    assert body((docs / "ablations.md").read_text()) == body(table)
    assert {p: os.path.getmtime(p) for p in (root / "full" / "eval").iterdir()} == mtimes
    assert ablate_main(argv + ["--report-only"]) == 0
    assert body((docs / "ablations.md").read_text()) == body(table)

    # a root holding runs of another config is refused, naming the key, before anything is reported
    capsys.readouterr()
    assert ablate_main(argv + ["--set", "train.batch_size=3", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another config" in err and "train.batch_size=2 (want 3)" in err
