"""Personalisation after the federation (FL + fine-tuning): the plan, the ledger, the site, the handler (in a real
run: tests/test_full_run.py)."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

import fedclinic.clients.personalize as personalize
from fedclinic.clients.app import app
from fedclinic.clients.personalize import personalize_site
from fedclinic.clients.site import Site, train_round
from fedclinic.config import load_config
from fedclinic.data import site_data
from fedclinic.model import MultiTaskNet, build_model
from fedclinic.privacy.accounting import calibrate_noise, plan_sites, steps_per_epoch
from fedclinic.privacy.ledger import Ledger
from fedclinic.report import json_safe
from fedclinic.report.text import render_report
from fedclinic.server.personalization import personalization_section, personalize_sites, site_row
from test_baselines import dp_accounting_epsilon
from test_client_app import deployed, message, site_file

# 2 sites of ~180 training images, 2 rounds of 1 local epoch, then 1 epoch of fine-tuning: seconds in all
TINY = ["data.site-size=200", "training.batch-size=32", "federation.sites=2", "federation.rounds=2",
        "training.local-epochs=1"]


def tiny(*settings: str):
    return load_config(None, [*TINY, *settings])


def federation_of_one(config, site: Site) -> dict:
    """Site `site` trains every round from the same model (no averaging needed to test its ledger); the model."""
    train, _ = site.data(config)
    torch.manual_seed(0)
    state = build_model(config, train).state_dict()
    for r in range(1, config.federation.rounds + 1):
        _, _, declined = train_round(config, site, state, server_round=r)
        assert not declined
    return state


# --- the plan and the ledger ----------------------------------------------------------------------------

def test_sigma_is_planned_for_the_rounds_and_the_fine_tuning_which_together_spend_the_budget(tmp_path):
    # Prepare
    config = tiny()
    site = Site(0, 2, tmp_path)
    state = federation_of_one(config, site)
    # Execute
    metrics, declined = personalize_site(config, site, state, server_round=3)
    # Assert: the fine-tuning is one more release in the ledger, and after it the site's epsilon is its budget,
    # by Google's dp-accounting as well as by the ledger's own accountant
    ledger = Ledger.open(tmp_path, site=0)
    plan, per_epoch = ledger.plan, steps_per_epoch(num_examples=len(site.data(config)[0]), batch_size=32)
    assert declined == "" and (plan.steps_per_round, plan.finetune_steps) == (per_epoch, per_epoch)
    assert [(e.round, e.kind) for e in ledger.entries] == [(1, "round"), (2, "round"), (3, "fine-tuning")]
    assert ledger.rounds_trained == 2 and sum(e.steps for e in ledger.entries) == 3 * per_epoch
    spent = dp_accounting_epsilon(plan.noise_multiplier, plan.sample_rate, 3 * per_epoch, config.privacy.delta)
    assert spent == pytest.approx(config.privacy.target_epsilon, rel=0.01)
    assert metrics["epsilon"] == ledger.epsilon() == pytest.approx(spent, rel=0.01)
    assert ledger.epsilon() <= config.privacy.target_epsilon


def test_without_fine_tuning_the_plan_is_the_rounds_alone(tmp_path):
    # Prepare
    config = tiny("personalize.epochs=0")
    site = Site(0, 2, tmp_path)
    # Execute
    federation_of_one(config, site)
    # Assert: sigma for the rounds' steps, spending the budget by the last round, as before fine-tuning existed
    ledger = Ledger.open(tmp_path, site=0)
    plan = ledger.plan
    steps = 2 * plan.steps_per_round
    assert plan.finetune_steps == 0
    assert plan.noise_multiplier == calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=plan.sample_rate,
                                                    steps=steps)
    assert dp_accounting_epsilon(plan.noise_multiplier, plan.sample_rate, steps, 1e-5) == pytest.approx(8.0, rel=0.01)
    with_finetuning = plan_sites([len(site.data(config)[0])], batch_size=32, local_epochs=1, rounds=2,
                                 target_epsilon=8.0, delta=1e-5, finetune_epochs=1)[0]
    assert with_finetuning["noise_multiplier"] > plan.noise_multiplier  # one epoch more to cover


def test_a_site_whose_budget_the_fine_tuning_would_exceed_declines_it_and_spends_nothing(tmp_path):
    # Prepare: a fixed sigma and a budget between the epsilon after the rounds and after the fine-tuning,
    # as the calculator predicts them
    config = tiny("privacy.noise-multiplier=1.0")
    n = len(site_data(config.data, 0, 2)[0])
    (plan,) = plan_sites([n], batch_size=32, local_epochs=1, rounds=2, target_epsilon=8.0, delta=1e-5,
                         noise_multiplier=1.0, finetune_epochs=1)
    budget = (plan["epsilon_by_round"][-1] + plan["epsilon_after_finetuning"]) / 2
    assert plan_sites([n], batch_size=32, local_epochs=1, rounds=2, target_epsilon=8.0, delta=1e-5,
                      noise_multiplier=1.0, budgets={0: budget}, finetune_epochs=1)[0]["finetunes"] is False
    site = Site(0, 2, tmp_path, max_epsilon=budget)
    state = federation_of_one(config, site)
    before = Ledger.open(tmp_path, site=0).epsilon()
    # Execute
    metrics, declined = personalize_site(config, site, state, server_round=3)
    # Assert
    ledger = Ledger.open(tmp_path, site=0)
    assert declined.startswith("site 0 declines the fine-tuning: its epsilon would reach")
    assert f"past its budget of {budget:g}" in declined
    assert [e.kind for e in ledger.entries] == ["round", "round"] and ledger.epsilon() == before <= budget
    assert metrics["declined"] == 1 and metrics["epsilon"] == before
    assert 0 <= metrics["global-accuracy"] <= 1 and math.isnan(metrics["personalized-accuracy"])


@pytest.mark.parametrize("mode", ["local", "off"])
def test_the_personalised_model_differs_from_the_global_one_and_both_are_scored_on_the_sites_validation_split(
        tmp_path, monkeypatch, mode):
    # Prepare: every evaluation the site makes, recorded
    config = tiny(f"privacy.mode={mode}")
    site = Site(1, 2, tmp_path)
    _, val = site_data(config.data, 1, 2)
    torch.manual_seed(0)
    state = build_model(config, val).state_dict()
    scored, real = [], personalize.evaluate

    def recording(model, data, **kwargs):
        scored.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, data))
        return real(model, data, **kwargs)

    monkeypatch.setattr(personalize, "evaluate", recording)
    # Execute
    metrics, declined = personalize_site(config, site, state, server_round=3)
    # Assert: the global model, then its fine-tuned copy, each on exactly the site's validation split
    assert declined == "" and metrics["num-examples"] == len(val) and len(scored) == 2
    (first, seen_first), (second, seen_second) = scored
    for seen in (seen_first, seen_second):
        assert len(seen) == len(val) and (seen.images == val.images).all() and (seen.labels == val.labels).all()
    assert all(torch.equal(first[k], state[k]) for k in state)
    assert not all(torch.equal(second[k], state[k]) for k in state)
    assert (metrics["epsilon"] > 0) == (mode == "local")


def test_asked_again_by_a_resumed_server_a_site_resends_its_scores_and_spends_nothing(tmp_path):
    # Prepare: a site that fine-tuned once
    config = tiny()
    site = Site(0, 2, tmp_path)
    state = federation_of_one(config, site)
    first, _ = personalize_site(config, site, state, server_round=3)
    # Execute: the same model again, as a server resumed after its post-training steps asks
    again, declined = personalize_site(config, site, state, server_round=3)
    # Assert
    assert declined == "" and again == first
    assert [e.kind for e in Ledger.open(tmp_path, site=0).entries] == ["round", "round", "fine-tuning"]


# --- the ClientApp's handler ------------------------------------------------------------------------------

def test_a_deployed_site_replies_to_personalize_with_its_scores_and_no_model(flower_task, tmp_path):
    # Prepare: a deployed SuperNode with its own file and state directory
    site_file(tmp_path / "site.npz", 96)
    config = load_config(None, ["training.batch-size=32", "training.local-epochs=1"])
    model = MultiTaskNet(in_channels=3, num_classes=4, width=config.model.width)
    ctx = deployed(config, tmp_path, site=2)
    # Execute
    reply = app(message("evaluate.personalize", model, tmp_path / "unused", server_round=5), ctx)
    # Assert: metrics only (the personalised model never leaves the site), the documented ones
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"metrics"} and not reply.content.array_records
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"site", "num-examples", "epsilon", "declined", "global-accuracy", "global-f1",
                            "global-iou", "personalized-accuracy", "personalized-f1", "personalized-iou"}
    assert metrics["site"] == 2 and metrics["num-examples"] == 20 and metrics["declined"] == 0  # 20 val images
    assert all(0 <= metrics[f"{which}-accuracy"] <= 1 for which in ("global", "personalized"))
    ledger = Ledger.open(tmp_path / "state", site=2)  # charged in the node's own state dir
    assert [(e.round, e.kind) for e in ledger.entries] == [(5, "fine-tuning")]
    assert metrics["epsilon"] == ledger.epsilon() > 0
    assert not (tmp_path / "unused").exists()


# --- the ServerApp's side ------------------------------------------------------------------------------------

def site_metrics(site: int, before: float, after: float | None) -> dict:
    """A site's personalize reply: global accuracy `before`, personalised `after` (None: it declined)."""
    scores = {f"global-{k}": v for k, v in (("accuracy", before), ("f1", before), ("iou", 0.5))}
    scores.update({f"personalized-{k}": math.nan if after is None else v
                   for k, v in (("accuracy", after), ("f1", after), ("iou", 0.6))})
    return {"site": site, "num-examples": 40 + site, "epsilon": 7.9, "declined": int(after is None), **scores}


class Grid:
    """Three connected sites: node 1 answers, node 2 fails, node 3 never replies."""

    def get_node_ids(self):
        return [3, 1, 2]

    def send_and_receive(self, messages, *, timeout):
        self.sent, self.timeout = list(messages), timeout
        by_node = {msg.metadata.dst_node_id: msg for msg in self.sent}
        return [Message(RecordDict({"metrics": MetricRecord(site_metrics(0, 0.5, 0.7))}), reply_to=by_node[1]),
                Message(Error(0, "<class 'ValueError'>:<'site 2 has no data'>"), reply_to=by_node[2])]


def test_the_server_sends_every_site_the_final_model_and_leaves_out_failed_and_missing_replies(
        flower_task, tmp_path, caplog):
    # Prepare
    config = load_config(None, ["federation.round-timeout=42"])
    grid, arrays = Grid(), ArrayRecord(MultiTaskNet(in_channels=1, num_classes=3).state_dict())
    # Execute
    found = personalize_sites(grid, arrays, config, tmp_path, last_round=4, say=lambda line: None)
    # Assert: one message per connected site, of the personalize type, with the model and the round after the last
    assert sorted(msg.metadata.dst_node_id for msg in grid.sent) == [1, 2, 3] and grid.timeout == 42
    for msg in grid.sent:
        assert msg.metadata.message_type == "evaluate.personalize"
        assert msg.content["config"]["server-round"] == 5 and msg.content["arrays"] is arrays
    assert [s["site"] for s in found["sites"]] == [0] and found["compared"] == 1
    warnings = [r.getMessage() for r in caplog.records if "personalisation" in r.getMessage()]
    assert any("node 2 failed and is left out: ValueError: site 2 has no data" in line for line in warnings)
    assert any("1 site(s) did not reply within 42 s and are left out" in line for line in warnings)
    assert personalize_sites(grid, arrays, load_config(None, ["personalize.epochs=0"]), tmp_path, last_round=4,
                             say=print) is None


# --- results.json and the report ------------------------------------------------------------------------------

def test_the_summary_compares_the_sites_that_fine_tuned_and_the_report_shows_it_with_the_privacy_sentences(tmp_path):
    # Prepare: three sites answered, in any order; site 1 declined
    config = load_config(None, [])
    rows = [site_row(site_metrics(2, 0.6, 0.8), None, private=True), site_row(site_metrics(0, 0.9, 0.85), None, private=True),
            site_row(site_metrics(1, 0.5, None), "site 1 declines the fine-tuning: its epsilon would reach 8.4", private=True)]
    # Execute
    section = personalization_section(rows, config)
    # Assert: site order; mean, worst and best over sites 0 and 2
    assert [s["site"] for s in section["sites"]] == [0, 1, 2] and section["compared"] == 2
    assert section["sites"][1]["personalized"] is None and section["sites"][1]["declined"]
    assert section["global"]["mean"]["accuracy"] == pytest.approx(0.75)
    assert section["personalized"]["mean"]["accuracy"] == pytest.approx(0.825)
    assert (section["global"]["worst_site"], section["global"]["worst"]["accuracy"]) == (2, 0.6)
    assert (section["personalized"]["worst_site"], section["personalized"]["worst"]["accuracy"]) == (2, 0.8)
    assert section["personalized"]["best_site"] == 0
    assert "charged to each site's ledger" in section["guarantee"]
    assert "released outside the DP guarantee" in section["release"]
    off = personalization_section(rows, load_config(None, ["privacy.mode=off"]))
    assert off["guarantee"].startswith("Fine-tuning is not private")
    # the report: a table of both models on each site's own validation split, and both sentences
    results = {"run": "r", "config": config.to_flat(), "sites": [], "rounds": [], "stop_reason": None,
               "privacy": {"record_level": None, "central": None},
               "final": {"accuracy": 0.7, "f1": 0.7, "iou": 0.5, "loss": 1.0, "max_epsilon": 0.0},
               "timings": {"server_seconds": 1.0, "site_train_seconds": 1.0, "central_eval_seconds": 1.0},
               "personalization": json_safe(section)}
    report = render_report(results, tmp_path)
    assert "## Personalised on each site's own data" in report
    assert section["guarantee"] in report and section["release"] in report
    assert "| 2 | 42 | 0.600 | 0.800 | 0.500 | 0.600 | 7.90 |" in report
    assert "| 1 | 41 | 0.500 | declined | 0.500 | declined | 7.90 |" in report
    assert "| **worst** |  | 0.600 | 0.800 |" in report
    assert "- site 1 declines the fine-tuning: its epsilon would reach 8.4." in report
