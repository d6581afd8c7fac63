"""`fedclinic budget`: the calculator a privacy officer uses, checked against dp-accounting."""

import json

import pytest

from fedclinic.cli import main
from test_privacy import reference_epsilon


def run(capsys, *args):
    code = main(["budget", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("accountant, tolerance", [("rdp", 0.01), ("prv", 0.02)])
def test_forward_prints_epsilon_that_an_independent_accountant_agrees_with(capsys, accountant, tolerance):
    code, out, _ = run(capsys, "--sample-rate", "0.05", "--noise-multiplier", "1.1", "--steps", "400",
                       "--delta", "1e-6", "--accountant", accountant, "--json")
    answer = json.loads(out)
    assert code == 0 and answer["accountant"] == accountant and answer["delta"] == 1e-6
    assert answer["epsilon"] == pytest.approx(reference_epsilon([(1.1, 0.05, 400)], 1e-6, accountant), rel=tolerance)


def test_inverse_prints_the_sigma_that_meets_the_target(capsys):
    code, out, _ = run(capsys, "--sample-rate", "0.1", "--target-epsilon", "3", "--steps", "200", "--json")
    sigma = json.loads(out)["noise_multiplier"]
    assert code == 0
    assert reference_epsilon([(sigma, 0.1, 200)], 1e-5, "rdp") == pytest.approx(3.0, rel=0.01)


def test_plan_gives_each_site_a_sigma_that_spends_its_budget_by_the_end_of_its_fine_tuning(capsys):
    code, out, _ = run(capsys, "--plan", "--site-sizes", "600,100,1500", "--rounds", "3",
                       "--set", "training.batch-size=50", "--set", "training.local-epochs=2",
                       "--set", "privacy.target-epsilon=4", "--json")
    plan = json.loads(out)
    assert code == 0 and [s["n"] for s in plan["sites"]] == [600, 100, 1500]
    for site in plan["sites"]:
        eps = site["epsilon_by_round"]
        assert len(eps) == 3 and eps[0] < eps[1] < eps[2] < site["epsilon_after_finetuning"]
        assert site["epsilon_after_finetuning"] == pytest.approx(4.0, rel=0.01) and site["finetunes"]
        assert site["sample_rate"] == pytest.approx(50 / site["n"])
        assert site["steps_per_round"] == 2 * site["n"] // 50  # 2 local epochs of n / 50 batches
        assert site["finetune_steps"] == site["n"] // 50  # then personalize.epochs=1 of fine-tuning
    small, big = plan["sites"][1], plan["sites"][2]
    assert small["noise_multiplier"] > big["noise_multiplier"]  # a small site samples more of itself per step


def test_plan_without_fine_tuning_spends_the_budget_by_the_last_round(capsys):
    code, out, _ = run(capsys, "--plan", "--site-sizes", "600,100", "--rounds", "3", "--set", "training.batch-size=50",
                       "--set", "privacy.target-epsilon=4", "--set", "personalize.epochs=0", "--json")
    assert code == 0
    for site in json.loads(out)["sites"]:
        assert site["epsilon_by_round"][-1] == pytest.approx(4.0, rel=0.01)
        assert (site["finetune_steps"], site["epsilon_after_finetuning"], site["finetunes"]) == (0, None, False)


def test_plan_takes_the_accountant_flag_and_the_independent_accountant_agrees(capsys):
    keys = ["--plan", "--site-sizes", "600", "--rounds", "3", "--set", "training.batch-size=50",
            "--set", "personalize.epochs=0", "--json"]
    plans = {a: json.loads(run(capsys, *keys, "--accountant", a)[1]) for a in ("rdp", "prv")}
    assert [plans[a]["accountant"] for a in ("rdp", "prv")] == ["rdp", "prv"]
    site = plans["prv"]["sites"][0]
    # the tighter accountant needs less noise for the same budget, and its sigma does meet the budget
    assert site["noise_multiplier"] < plans["rdp"]["sites"][0]["noise_multiplier"]
    steps = 3 * site["steps_per_round"]
    assert reference_epsilon([(site["noise_multiplier"], site["sample_rate"], steps)], 1e-5, "prv") == pytest.approx(
        8.0, rel=0.02)


def test_plan_table_says_which_site_fine_tunes(capsys):
    # Prepare: a fixed sigma; site 1's budget allows its rounds but not the fine-tuning after them
    fixed = ["--plan", "--site-sizes", "600,600", "--rounds", "2", "--set", "training.batch-size=50",
             "--set", "privacy.noise-multiplier=1.0"]
    _, out, _ = run(capsys, *fixed, "--json")
    site = json.loads(out)["sites"][1]
    budget = (site["epsilon_by_round"][-1] + site["epsilon_after_finetuning"]) / 2
    # Execute
    code, out, _ = run(capsys, *fixed, "--set", f'privacy.site-budgets="1={budget}"')
    # Assert
    assert code == 0 and "then 1 epoch(s) of fine-tuning" in out and "eps@ft" in out
    lines = [line for line in out.splitlines() if line.split()[0] in ("0", "1")]
    assert lines[0].endswith("all rounds, fine-tunes") and lines[1].endswith("all rounds, declines the fine-tuning")


@pytest.mark.parametrize("args, words", [
    (["--sample-rate", "1.5", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate must be in (0, 1], got 1.5"),
    (["--sample-rate", "0.1", "--steps", "10"], "exactly one of --noise-multiplier"),
    (["--sample-rate", "0.1", "--steps", "10", "--target-epsilon", "1e-9"], "no noise level reaches epsilon=1e-09"),
    (["--plan", "--site-sizes", "600,x"], "--site-sizes expects whole numbers"),
])
def test_impossible_questions_get_one_sentence(capsys, args, words):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert words in err and err.count("\n") == 1
