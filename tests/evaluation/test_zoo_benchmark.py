"""benchmarks/zoo.py (the Mamba-360 comparison of mixer families) in smoke mode on mamba and the transformer: the
matched parameter counts recounted here, the LM source's entropy floor against a closed form and a Monte Carlo
estimate, the chance labelling, and the JSON rows a run writes."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from .conftest import ROOT


def zoo_module():
    sys.path.insert(0, str(ROOT))
    import benchmarks.zoo as module

    return module


def recount(model) -> int:
    """Parameters outside the embedding / LM head, counted from the blocks and the final norm."""
    return sum(p.numel() for p in model.layers.parameters()) + sum(p.numel() for p in model.norm_f.parameters())


@pytest.mark.parametrize("family", ["mamba", "transformer"])
def test_matched_parameter_counts_are_within_ten_percent(family):
    from ssmforge.models import LanguageModel, MambaConfig, ModelConfig

    Z = zoo_module()
    args = Z.parse_args(["--smoke"])
    target = Z.default_target(args)
    mamba = LanguageModel(ModelConfig(family="mamba", d_model=64, n_layer=2, vocab_size=50,
                                      mamba=MambaConfig(d_state=16)))
    assert target == recount(mamba)  # the default target: Mamba at d_model 64, n_layer 2
    info = Z.match_parameters(family, target, args)
    assert info["status"] == "ok" and info["d_model"] % 8 == 0 and info["n_layer"] == 2
    # another vocabulary and lengths than the search used: only the embedding differs
    model = Z.build(Z.model_config(family, info["d_model"], 100, 48, 512, info["fit"]))
    assert model.config.n_layer == 2 and model.config.d_model == info["d_model"]
    assert recount(model) == info["parameters"]
    assert abs(recount(model) / target - 1) <= 0.10 and info["ratio"] == pytest.approx(recount(model) / target)
    assert [info["d_model"], info["parameters"]] == info["search"][[p[0] for p in info["search"]].index(
        info["d_model"])][:2]


def test_a_target_out_of_reach_is_refused_and_an_unbuilt_family_skipped(monkeypatch):
    Z = zoo_module()
    args = Z.parse_args(["--smoke"])
    refused = Z.match_parameters("mamba", 100, args)  # d_model 8 already has thousands
    assert refused["status"] == "refused" and "more than 10% off" in refused["reason"]
    assert refused["ratio"] > 1.1

    def unfinished(config):
        raise NotImplementedError("mamba is being written")

    monkeypatch.setattr(Z, "build", unfinished)
    skipped = Z.match_parameters("mamba", 65472, args)
    assert skipped == dict(status="skipped", reason="NotImplementedError at construction: mamba is being written")
    assert Z.availability("no_such_family") is not None and Z.availability("mamba") is None


def test_entropy_floor_of_a_two_state_chain_is_the_closed_form():
    Z = zoo_module()
    a, b = 0.1, 0.3  # P(0 -> 1), P(1 -> 0)
    source = Z.MarkovSource(np.array([[1 - a, a], [b, 1 - b]]), order=1)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    pi0 = b / (a + b)
    np.testing.assert_allclose(source.stationary, [pi0, 1 - pi0], rtol=1e-12)
    assert source.entropy_rate == pytest.approx(pi0 * h(a) + (1 - pi0) * h(b), rel=1e-12)
    assert source.unigram_entropy == pytest.approx(h(pi0), rel=1e-12)


def test_entropy_floor_matches_a_monte_carlo_estimate():
    """Sampled sequences, scored here from the table and their own contexts: the mean -ln P is the entropy rate
    within 4 standard errors, and the token frequencies' entropy is the unigram chance level."""
    Z = zoo_module()
    source = Z.MarkovSource.random(vocab=8, order=2, branching=3, uniform=0.05, seed=3)
    assert 0 < source.entropy_rate < source.unigram_entropy <= math.log(8)
    ids, targets, nats = source.batch(300, 200, np.random.default_rng(0))
    ids, targets = ids.numpy(), targets.numpy()
    scored = targets != -100
    assert not scored[:, 0].any() and scored[:, 1:].all()  # the first target is part of the initial context
    context = ids[:, :-1] * 8 + ids[:, 1:]  # (x_{t-1}, x_t) predicts x_{t+1} = targets[:, t]
    mine = -np.log(source.table[context, targets[:, 1:]])
    np.testing.assert_allclose(nats[:, 1:], mine)
    per_sequence = mine.mean(1)
    se = per_sequence.std(ddof=1) / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean() - source.entropy_rate) < 4 * se, (per_sequence.mean(), source.entropy_rate, se)
    freq = np.bincount(targets[scored], minlength=8) / scored.sum()
    assert -(freq * np.log(freq)).sum() == pytest.approx(source.unigram_entropy, abs=0.01)


def test_chance_labelling():
    Z = zoo_module()
    chance, n = 1 / 16, 512
    se = math.sqrt(chance * (1 - chance) / n)
    at = Z.accuracy_score(hits=32, n=n, chance=chance)  # exactly chance
    assert at["at_chance"] and at["value"] is None and Z.cell(at) == "chance"
    assert Z.accuracy_score(round((chance + 1.9 * se) * n), n, chance)["at_chance"]
    assert not Z.accuracy_score(round((chance + 2.2 * se) * n), n, chance)["at_chance"]
    assert Z.accuracy_score(0, n, chance)["at_chance"]  # below chance is no accuracy either
    perfect = Z.accuracy_score(n, n, chance)
    assert not perfect["at_chance"] and perfect["value"] == 1.0 and Z.cell(perfect) == "1.000"
    rng = np.random.default_rng(0)
    flat = Z.loss_score(3.0 + 0.1 * rng.standard_normal(64), 64 * 100, chance=3.0)
    assert flat["at_chance"] and flat["value"] is None and Z.cell(flat) == "chance"
    learned = Z.loss_score(1.5 + 0.1 * rng.standard_normal(64), 64 * 100, chance=3.0)
    assert not learned["at_chance"] and learned["value"] == pytest.approx(1.5, abs=0.05)
    # the order-blind baseline of selective copying: one data token is always copied; exact against sampling
    assert Z.order_blind_accuracy(1, 8) == pytest.approx(1.0)
    draws = rng.integers(0, 8, (20000, 4))
    sampled = np.stack([(draws == v).sum(1) for v in range(8)], 1).max(1).mean() / 4
    assert Z.order_blind_accuracy(4, 8) == pytest.approx(sampled, abs=0.01)


def test_convergence_compares_the_last_tenth_with_the_one_before():
    Z = zoo_module()
    assert Z.convergence([2.0] * 50 + [1.0] * 50, 0.02)["converged"]
    assert not Z.convergence(list(np.linspace(3, 1, 100)), 0.02)["converged"]
    assert Z.convergence([0.001] * 90 + [0.0005] * 10, 0.02)["converged"]  # near zero: the 0.05 nats floor
    assert not Z.convergence([1.0] * 99 + [float("nan")], 0.02)["converged"]


def test_a_longer_budget_that_does_not_change_the_result_counts_as_converged():
    """budget_checks: a row against the longest superseded run of its family, task and lr at half its steps or
    fewer; the same result (every score within 2 standard errors of the difference) clears the table's dagger."""
    Z = zoo_module()

    def copying(family, steps, hits, lr=3e-3, converged=False):
        return dict(family=family, task="copying", steps=steps, lr=lr, converged=converged,
                    accuracy=Z.accuracy_score(hits, 4096, 0.125))

    def induction(family, steps, hits):
        return dict(family=family, task="induction", steps=steps, lr=1e-3, converged=False,
                    by_length={"64": Z.accuracy_score(hits[0], 256, 1 / 16),
                               "256": Z.accuracy_score(hits[1], 64, 1 / 16)})

    rows = [copying("s4", 24000, 4060), copying("lru", 24000, 4000), copying("dss", 12000, 4050),
            copying("gss", 24000, 3900), induction("mamba", 4000, (256, 40))]
    superseded = [copying("s4", 4000, 3000), copying("s4", 12000, 4048),  # 12,000 is the one compared
                  copying("lru", 12000, 3602),  # changed: 0.879 -> 0.977
                  copying("dss", 8000, 4050),  # more than half the steps: no check
                  copying("gss", 12000, 3900, lr=1e-3),  # another lr: no check
                  induction("mamba", 2000, (256, 20))]  # the same at 64, changed at 256
    data = dict(rows=rows, superseded=superseded)
    checks = Z.budget_checks(data)
    assert list(checks) == ["s4/copying", "lru/copying", "mamba/induction"]
    s4 = checks["s4/copying"]
    assert (s4["steps_before"], s4["steps"], s4["same_result"]) == (12000, 24000, True)
    a, b = 4060 / 4096, 4048 / 4096  # the limit: 2 sqrt(se_a^2 + se_b^2), each the binomial error at its rate
    limit = 2 * math.sqrt(a * (1 - a) / 4096 + b * (1 - b) / 4096)
    assert s4["scores"]["accuracy"] == pytest.approx(dict(before=b, after=a, change=a - b, limit=limit, same=True))
    assert not checks["lru/copying"]["same_result"]
    mamba = checks["mamba/induction"]["scores"]
    assert mamba["@64"]["same"] and not mamba["@256"]["same"] and not checks["mamba/induction"]["same_result"]
    data["budget_checks"] = checks
    assert [Z.converged(data, r) for r in rows] == [True, False, False, False, False]
    # not converged: saturated (every score within 0.01 of 1.000) is "‡", anything below "†"
    near = [copying("h3", 24000, 4056), copying("h3", 24000, 4055), induction("lru", 4000, (256, 64)),
            induction("lru", 4000, (256, 63))]  # 4055/4096 = 0.98999 < 0.99 <= 4056/4096; 63/64 = 0.984
    assert [Z.budget_mark(data, r) for r in rows + near] == ["", "†", "†", "†", "†", "‡", "†", "‡", "†"]
    assert Z.budget_mark(data, dict(copying("s4", 1000, 4096), converged=None)) == ""
    # an LM row compares its measured loss with the errors of the two means
    lm = lambda steps, nats: dict(family="h3", task="lm", steps=steps, lr=1e-2,  # noqa: E731
                                  loss=dict(measured_nats=nats, se=0.002))
    check = Z.budget_checks(dict(rows=[lm(2000, 1.250)], superseded=[lm(1000, 1.254)]))["h3/lm"]
    assert check["same_result"] and check["scores"]["loss"]["limit"] == pytest.approx(4 * math.sqrt(2) * 0.001)
    assert not Z.budget_checks(dict(rows=[lm(2000, 1.250)], superseded=[lm(1000, 1.260)]))["h3/lm"]["same_result"]


class BlowsUp(torch.nn.Module):
    """Logits NaN from the third call on: a run that diverges at step 3."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.zeros(4)), 0

    def forward(self, ids):
        self.calls += 1
        return self.w.expand(*ids.shape, 4) * (float("nan") if self.calls >= 3 else 1.0)


def constant_batch():
    return torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)


def test_a_diverged_run_stops_at_its_first_non_finite_loss():
    """synthetic.train (the zoo's loop) stops once the loss is not a number; the zoo records the step."""
    Z = zoo_module()
    from benchmarks.synthetic import train

    model = BlowsUp()
    batch = constant_batch
    losses = train(model, batch, steps=10, lr=1e-2, log_every=0, name="blows up")
    assert model.calls == 3 and len(losses) == 3 and math.isnan(losses[-1])
    assert all(math.isfinite(x) for x in losses[:2]) and losses[1] < losses[0]  # it did train before
    assert Z.diverged_at(losses) == 3 and Z.diverged_at(losses[:2]) is None and Z.diverged_at([]) is None
    assert Z.convergence(losses, 0.02)["converged"] is False


def smoke(Z, tmp_path, name, *argv):
    """A smoke run of zoo.py, the caller's thread count restored (main sets its own)."""
    threads = torch.get_num_threads()
    try:
        return Z.main(["--smoke", *argv, "--out", str(tmp_path / name)])
    finally:
        torch.set_num_threads(threads)


def test_smoke_run_writes_every_row(tmp_path):
    Z = zoo_module()
    report = smoke(Z, tmp_path, "zoo.json", "--families", "mamba", "transformer", "no_such_family",
                   "--lrs", "1e-3", "3e-3")
    saved = json.loads((tmp_path / "zoo.json").read_text())
    assert saved["complete"] and not saved["failed"]
    assert saved["command"].startswith("python benchmarks/zoo.py --smoke") and "--out" not in saved["command"]
    assert {"cpu", "cores", "torch"} <= set(saved["machine"])
    assert list(saved["skipped"]) == ["no_such_family"] and saved["families"]["no_such_family"]["status"] == "skipped"
    assert saved["published"]["selective_copying"]["mamba"] == "97.0-99.8%" and "2312.00752" in \
        saved["published"]["citation"]
    rows = {(r["family"], r["task"]): r for r in saved["rows"]}
    assert list(rows) == [(f, t) for f in ("mamba", "transformer") for t in ("lm", "copying", "induction", "speed")]
    target = saved["target_parameters"]
    for (family, task), r in rows.items():
        info = saved["families"][family]
        assert (r["d_model"], r["n_layer"], r["parameters"]) == (info["d_model"], 2, info["parameters"])
        assert r["parameter_ratio"] == pytest.approx(r["parameters"] / target) and abs(r["parameter_ratio"] - 1) <= 0.1
        if task == "speed":
            assert r["tokens_per_s"] > 0 and math.isfinite(r["peak_memory_mib"]) and r["length"] == 64
            continue
        assert [p["lr"] for p in r["sweep"]] == [1e-3, 3e-3]
        assert all({"val_loss", "val_accuracy", "final_train_loss", "converged", "steps"} <= set(p) for p in r["sweep"])
        assert r["lr"] == min(r["sweep"], key=lambda p: p["val_loss"])["lr"]
        assert r["steps"] == 3 and len(r["loss_curve"]["mean_loss"]) == 3
        assert r["converged"] in (True, False) and r["convergence"]["threshold"] == 0.02
        scores = {"lm": lambda: [r["loss"]], "copying": lambda: [r["accuracy"]],
                  "induction": lambda: list(r["by_length"].values())}[task]()
        for s in scores:
            assert s["at_chance"] == (s["value"] is None) and s["chance"] == saved["tasks"][task]["chance"]
        if task == "lm":
            assert r["entropy_floor"] == saved["tasks"]["lm"]["entropy_floor"] < r["chance"]
            assert abs(r["floor_on_validation"] - r["entropy_floor"]) < 0.5
        if task == "induction":
            assert list(r["by_length"]) == ["16", "64", "256"]
    # the table shows "chance" for every result at chance, never its number, and a dagger on a run not converged
    for family in ("mamba", "transformer"):
        lm, copying, induction = (rows[family, t] for t in ("lm", "copying", "induction"))
        cells = [(lm["loss"], lm), (copying["accuracy"], copying),
                 *((s, induction) for s in induction["by_length"].values())]
        line = next(line for line in report["table"].splitlines() if line.startswith(f"| {family} |"))
        assert line.count("chance") == sum(s["at_chance"] for s, _ in cells)
        assert line.count("†") + line.count("‡") == sum(not r["converged"] for _, r in cells)
        assert line.count("‡") == sum(not r["converged"] and Z.saturated(r) for _, r in cells)
    assert "| no_such_family | - | skipped |" in report["table"]
    if (tmp_path / "zoo.png").exists():
        assert (tmp_path / "zoo.png").stat().st_size > 0


def test_a_full_budget_sweep_keeps_its_best_run_and_runs_merge_into_one_report(tmp_path):
    """--sweep-steps = --steps: every lr trains the whole budget and the best one is the row, not retrained. --merge:
    a later run's row replaces an earlier one's, each run's command is kept, the table states each budget."""
    Z = zoo_module()
    short = smoke(Z, tmp_path, "short.json", "--families", "mamba", "--tasks", "lm", "copying", "--lrs", "3e-3")
    full = smoke(Z, tmp_path, "full.json", "--families", "mamba", "transformer", "--tasks", "copying",
                 "--steps", "4", "--sweep-steps", "4", "--lrs", "1e-3", "3e-3")
    for r in full["rows"]:
        assert [(p["lr"], p["steps"]) for p in r["sweep"]] == [(1e-3, 4), (3e-3, 4)] and r["steps"] == 4
        best = min(r["sweep"], key=lambda p: p["val_loss"])
        assert r["lr"] == best["lr"] and r["train_seconds"] == best["seconds"]  # the sweep's run, not a rerun
        assert len(r["loss_curve"]["mean_loss"]) == 4 and "full budget" in r["lr_selected_by"]
    merged = Z.main(["--merge", str(tmp_path / "short.json"), str(tmp_path / "full.json"),
                     "--out", str(tmp_path / "zoo.json")])
    assert merged == json.loads((tmp_path / "zoo.json").read_text()) and (tmp_path / "zoo.json").exists()
    by = {(r["family"], r["task"]): r for r in merged["rows"]}
    assert list(by) == [("mamba", "lm"), ("mamba", "copying"), ("transformer", "copying")]
    assert by["mamba", "lm"] == short["rows"][0] and by["mamba", "copying"] == full["rows"][0]
    assert merged["superseded"] == [dict(short["rows"][1], superseded_by=1)]  # short's mamba copying, kept
    assert merged["budget_checks"] == {}  # 3 steps are more than half of 4: no longer-budget comparison
    assert [run["commands"] for run in merged["runs"]] == [[short["command"]], [full["command"]]]
    assert merged["settings"]["families"] == ["mamba", "transformer"]
    assert not merged["complete"]  # the transformer has no LM row
    notes = merged["table"].split("\n\n")[1]
    assert "lm: 3 steps at the best of 0.003 after 1-step probes" in notes
    assert "copying: 4 steps for each lr of 0.001/0.003, the best kept" in notes
    line = next(line for line in merged["table"].splitlines() if line.startswith("| transformer |"))
    assert line.split(" | ")[3] == "-"  # no LM row for the transformer: a dash, not another run's number
    # a merged report merges again: its runs and superseded rows carry over, a newer run's rows replace its own
    lm = smoke(Z, tmp_path, "lm.json", "--families", "transformer", "--tasks", "lm", "--lrs", "3e-3")
    again = Z.merge([tmp_path / "zoo.json", tmp_path / "lm.json"])
    assert again["runs"] == merged["runs"] + [dict(commands=[lm["command"]], settings=lm["settings"], complete=True,
                                                   rows=["transformer/lm"])]
    assert again["superseded"] == merged["superseded"] and again["complete"]
    assert [(r["family"], r["task"]) for r in again["rows"]] == [("mamba", "lm"), ("mamba", "copying"),
                                                                 ("transformer", "lm"), ("transformer", "copying")]
    again_again = Z.merge([tmp_path / "zoo.json", tmp_path / "full.json"])  # full's rows replace themselves
    assert again_again["superseded"] == merged["superseded"] + [
        dict(r, superseded_by=2) for r in full["rows"]]


def test_a_later_sweep_over_other_rates_at_the_same_budget_widens_the_grid(tmp_path):
    """--merge of a full-budget sweep at 1e-2 after one at 1e-3/3e-3 of the same steps: one row, the best of the
    three runs by validation loss, listing all three, the other run's row kept under superseded (`lost_sweep`).
    Other steps, or a rate swept already, replace the row as before; a wider sweep at fewer steps than a longer
    budget merged since widens the replaced row under superseded and leaves the longer one's. A longer run at a
    rate that lost the widened sweep is checked against that rate's run (budget_checks)."""
    Z = zoo_module()
    grid = smoke(Z, tmp_path, "grid.json", "--families", "mamba", "transformer", "--tasks", "copying",
                 "--steps", "4", "--sweep-steps", "4", "--lrs", "1e-3", "3e-3")
    edge = smoke(Z, tmp_path, "edge.json", "--families", "mamba", "transformer", "--tasks", "copying",
                 "--steps", "4", "--sweep-steps", "4", "--lrs", "1e-2")
    merged = Z.merge([tmp_path / "grid.json", tmp_path / "edge.json"])
    assert [run["rows"] for run in merged["runs"]] == [["mamba/copying", "transformer/copying"]] * 2
    lost = []
    for i, r in enumerate(merged["rows"]):
        before, after = grid["rows"][i], edge["rows"][i]
        points = before["sweep"] + after["sweep"]
        assert r["sweep"] == sorted(points, key=lambda p: p["lr"]) and [p["lr"] for p in r["sweep"]] == [1e-3, 3e-3,
                                                                                                       1e-2]
        best = min(points, key=lambda p: p["val_loss"])
        source, other = (after, before) if best["lr"] == 1e-2 else (before, after)
        assert r["lr"] == best["lr"] and r == dict(source, sweep=r["sweep"], sweep_widened=True)  # its run, widened
        lost.append(dict(other, lost_sweep=True, superseded_by=1))
    assert merged["superseded"] == lost  # the other run's row, whole
    assert Z.budgets(merged) == ["copying: 4 steps for each lr of 0.001/0.003/0.01, the best kept"]
    # a rate already swept, or another budget, is a new run of the row: it replaces it
    smoke(Z, tmp_path, "again.json", "--families", "mamba", "--tasks", "copying", "--steps", "4", "--sweep-steps",
          "4", "--lrs", "3e-3", "1e-1")
    longer = smoke(Z, tmp_path, "longer.json", "--families", "mamba", "--tasks", "copying", "--steps", "5",
                   "--sweep-steps", "5", "--lrs", "1e-1")
    for name, replacing in (("again.json", None), ("longer.json", longer["rows"][0])):
        replaced = Z.merge([tmp_path / "grid.json", tmp_path / name])
        row = replaced["rows"][0]
        assert [p["lr"] for p in row["sweep"]] == ([3e-3, 1e-1] if replacing is None else [1e-1])
        assert replaced["superseded"] == [dict(grid["rows"][0], superseded_by=1)]
    # more rates at fewer steps than a longer budget merged since: that row stays, the replaced one's sweep widens
    smoke(Z, tmp_path, "longer-1e-3.json", "--families", "mamba", "--tasks", "copying", "--steps", "5",
          "--sweep-steps", "5", "--lrs", "1e-3")
    late = Z.merge([tmp_path / "grid.json", tmp_path / "longer-1e-3.json", tmp_path / "edge.json"])
    assert late["rows"][0] == json.loads((tmp_path / "longer-1e-3.json").read_text())["rows"][0]
    (before, after), transformer = (grid["rows"][0], edge["rows"][0]), merged["rows"][1]
    assert late["rows"][1] == transformer  # its 4-step row widened as before
    best = min(before["sweep"] + after["sweep"], key=lambda p: p["val_loss"])
    source, other = (after, before) if best["lr"] == 1e-2 else (before, after)
    points = sorted(before["sweep"] + after["sweep"], key=lambda p: p["lr"])
    mamba = lambda report: [s for s in report["superseded"] if s["family"] == "mamba"]  # noqa: E731
    assert mamba(late) == [dict(source, sweep=points, sweep_widened=True, superseded_by=1),
                           dict(other, lost_sweep=True, superseded_by=2)]
    assert [p["lr"] for p in points] == [1e-3, 3e-3, 1e-2]
    # the table notes a longer row whose rate is not the widened sweep's best
    noted = [(late["rows"][0], late["superseded"][0])] if best["lr"] != 1e-3 else []
    assert Z.wider_sweeps(late) == noted and Z.wider_sweeps(merged) == []
    assert ("Sweeps widened after their longer runs prefer another rate: mamba/copying" in Z.table(late)) == bool(noted)
    # unless the longer row's own sweep tried that rate: the longer budget settled it
    row = dict(family="h3", task="copying", lr=3e-3, sweep=[dict(lr=3e-3)])
    shorter = dict(family="h3", task="copying", lr=1e-2, sweep_widened=True)
    assert Z.wider_sweeps(dict(rows=[row], superseded=[shorter])) == [(row, shorter)]
    settled = dict(row, sweep=[dict(lr=3e-3), dict(lr=1e-2)])
    assert Z.wider_sweeps(dict(rows=[settled], superseded=[shorter])) == []
    # a third rate widens the same row again
    smoke(Z, tmp_path, "wider.json", "--families", "mamba", "--tasks", "copying", "--steps", "4", "--sweep-steps",
          "4", "--lrs", "3e-2")
    wider = Z.merge([tmp_path / "grid.json", tmp_path / "longer-1e-3.json", tmp_path / "edge.json",
                     tmp_path / "wider.json"])
    assert [p["lr"] for p in wider["superseded"][0]["sweep"]] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert [s.get("lost_sweep", False) for s in mamba(wider)] == [False, True, True]
    assert wider["rows"][0] == late["rows"][0]
    assert [s for _, s in Z.wider_sweeps(wider)] in ([], [mamba(wider)[0]])  # a lost run is no widened sweep
    # a longer run at the rate that lost: its half-budget check is that rate's lost run, not an older one
    loser = mamba(late)[1]
    smoke(Z, tmp_path, "long-loser.json", "--families", "mamba", "--tasks", "copying", "--steps", "8",
          "--sweep-steps", "8", "--lrs", f"{loser['lr']:g}")
    checked = Z.merge([tmp_path / "grid.json", tmp_path / "longer-1e-3.json", tmp_path / "edge.json",
                       tmp_path / "long-loser.json"])
    check = Z.budget_checks(checked)["mamba/copying"]
    assert (check["steps_before"], check["lr"]) == (4, loser["lr"])
    assert check["scores"]["accuracy"]["before"] == loser["accuracy"]["hits"] / loser["accuracy"]["n"]


def test_merge_refuses_runs_that_measure_different_things(tmp_path):
    Z = zoo_module()
    smoke(Z, tmp_path, "a.json", "--families", "mamba", "--tasks", "copying", "--lrs", "3e-3")
    smoke(Z, tmp_path, "b.json", "--families", "mamba", "--tasks", "copying", "--lrs", "3e-3", "--copy-region", "10")
    with pytest.raises(Z.MergeRefused, match=r"b\.json: the copying task's settings .* differ"):
        Z.merge([tmp_path / "a.json", tmp_path / "b.json"])
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--merge", str(tmp_path / "a.json"),
                          str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and not (tmp_path / "m.json").exists()
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "missing.json: cannot be read" in run.stderr
    # the same task settings and target with another transformer: refused as well
    smoke(Z, tmp_path, "c.json", "--families", "transformer", "--tasks", "copying", "--lrs", "3e-3",
          "--override", "attention.heads=2")
    with pytest.raises(Z.MergeRefused, match=r"c\.json: the model overrides of transformer differ"):
        Z.merge([tmp_path / "a.json", tmp_path / "c.json"])


def test_an_override_changes_the_model_of_every_family_with_its_section_and_nothing_else():
    """--override gss.ssm_dim=64: the GSS model is built with that branch width and matched to the same target
    (Mamba's, untouched) at another d_model; the other families and OVERRIDES itself stay as they were. A setting
    that is not SECTION.KEY=VALUE, or names a section no family has, is a usage error (exit code 2)."""
    Z = zoo_module()
    plain, wide = Z.parse_args(["--smoke"]), Z.parse_args(["--smoke", "--override", "gss.ssm_dim=64"])
    assert wide.overrides["gss"]["gss"] == dict(Z.OVERRIDES["gss"]["gss"], ssm_dim=64)
    assert "ssm_dim" not in Z.OVERRIDES["gss"]["gss"] and wide.overrides["mamba"] == Z.OVERRIDES["mamba"]
    target = Z.default_target(plain)
    assert Z.default_target(wide) == target
    info = Z.match_parameters("gss", target, wide)
    model = Z.build(Z.model_config("gss", info["d_model"], 16, 64, 256, None, wide.overrides))
    assert [layer.mixer.ssm_dim for layer in model.layers] == [64, 64]
    assert recount(model) == info["parameters"] and abs(info["ratio"] - 1) <= 0.10
    assert info["sections"]["gss"]["ssm_dim"] == 64
    assert Z.match_parameters("gss", target, plain)["sections"]["gss"] == Z.OVERRIDES["gss"]["gss"]
    for bad in ("gss.ssm_dim", "ssm_dim=64", "nosuch.key=1"):
        with pytest.raises(SystemExit) as stop:
            Z.parse_args(["--override", bad])
        assert stop.value.code == 2


def test_table_trains_each_part_once_and_merges_them(tmp_path, monkeypatch):
    """--table DIR: every part of TABLE_RUNS trained into DIR with the flags given (a part's own win), merged in
    order into --out; called again, it trains only a part whose JSON is not complete (a stopped reproduction)."""
    Z = zoo_module()
    monkeypatch.setattr(Z, "TABLE_RUNS", {
        "first": ["--tasks", "copying", "--lrs", "3e-3"],
        "longer": ["--families", "transformer", "--tasks", "copying", "--steps", "4", "--sweep-steps", "4"]})
    parts = tmp_path / "parts"
    flags = ("--families", "mamba", "transformer", "--lrs", "1e-3", "--table", str(parts))
    report = smoke(Z, tmp_path, "zoo.json", *flags)
    first, longer = (json.loads((parts / f"{name}.json").read_text()) for name in ("first", "longer"))
    assert first["complete"] and longer["complete"]
    assert first["command"] == "python benchmarks/zoo.py --smoke --families mamba transformer --lrs 1e-3 --tasks " \
                               "copying --lrs 3e-3"
    assert [p["lr"] for p in first["rows"][0]["sweep"]] == [3e-3]  # the part's --lrs won
    assert [r["family"] for r in longer["rows"]] == ["transformer"] and longer["rows"][0]["steps"] == 4
    by = {(r["family"], r["task"]): r for r in report["rows"]}
    assert by["mamba", "copying"] == first["rows"][0] and by["transformer", "copying"] == longer["rows"][0]
    assert report["superseded"] == [dict(first["rows"][1], superseded_by=1)]
    assert report == json.loads((tmp_path / "zoo.json").read_text())
    # each training run saved under DIR/checkpoints, so a part stopped midway resumes inside it
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == sorted(
        [f"{f}-copying-lr0.003-{n}steps.pt" for f in ("mamba", "transformer") for n in (1, 3)]
        + ["transformer-copying-lr0.001-4steps.pt"])  # the first part's sweep (1 step) and main run, the longer's

    longer["complete"] = False  # as a run stopped midway leaves it
    (parts / "longer.json").write_text(json.dumps(longer))
    trained = []
    real = Z.run_task
    monkeypatch.setattr(Z, "run_task", lambda family, *rest: trained.append(family) or real(family, *rest))
    again = smoke(Z, tmp_path, "zoo.json", *flags)
    assert trained == ["transformer"] and json.loads((parts / "longer.json").read_text())["complete"]
    assert {(r["family"], r["task"]) for r in again["rows"]} == set(by)
