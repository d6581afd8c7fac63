"""The federation section of a run's configuration: the sites, the rounds, the strategy, simulated attackers.

    from fedclinic.config import FederationConfig
    FederationConfig(strategy="krum", num_malicious=1)     # ConfigError names a bad value in one sentence

Split from sections.py, which holds the other sections, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclinic.config.sections import ConfigError, _require

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox",
              # Flower's robust aggregators
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
# what a simulated attacking site does (fedclinic/poisoning/attacks.py)
POISONING = ("label-flip", "sign-flip", "scale", "noise", "nan", "backdoor")


@dataclass(frozen=True)
class FederationConfig:
    # number of hospital sites (SuperNodes in simulation)
    sites: int = 5
    # federated rounds
    rounds: int = 20
    # share of sites asked to train each round
    fraction_train: float = 1.0
    # fewest sites a round needs (capped at federation.sites)
    min_sites: int = 2
    # share of sites asked to evaluate on their local validation split each round
    # (0 by default: site metrics on patient data are a release DP-SGD does not cover)
    fraction_evaluate: float = 0.0
    # seconds the server waits for a round's replies; a site that has not answered by then
    # (a SuperNode that died) is left out of that round
    round_timeout: float = 600.0
    # seconds a round waits before it starts for sites that are not connected (a SuperNode
    # restarting after a crash); the round then starts with the sites that are
    rejoin_wait: float = 30.0
    # CPU cores reserved for each simulated site
    client_cpus: int = 1
    # share of a GPU for each simulated site (0 = CPU only; 0.25 = four sites per GPU)
    client_gpus: float = 0.0
    # the server's strategy, one of Flower's: fedavg, fedavgm (server momentum), fedadam, fedyogi,
    # fedadagrad (adaptive server optimizers) or fedprox (a proximal term in each site's local loss)
    strategy: str = "fedavg"
    # server learning rate: FedAvgM's server_learning_rate, FedAdam's, FedYogi's and FedAdagrad's
    # eta; 0 means Flower's default for the strategy (1.0 FedAvgM, 0.1 FedAdam and FedAdagrad, 0.01 FedYogi)
    server_learning_rate: float = 0.0
    # FedAvgM's server momentum (0 = none)
    server_momentum: float = 0.0
    # FedAdam's and FedYogi's beta_1: decay of the first moment (the running mean of the rounds' updates)
    beta_1: float = 0.9
    # FedAdam's and FedYogi's beta_2: decay of the second moment (the running mean of squared updates)
    beta_2: float = 0.99
    # FedAdam's, FedYogi's and FedAdagrad's tau, added to the root of the second moment (larger = less adaptive)
    tau: float = 1e-3
    # FedProx's mu: each site adds mu/2 times the squared distance of its weights from the global model
    # to its local loss (under DP-SGD that term is clipped per example, with the loss's gradient)
    proximal_mu: float = 0.0
    # FedTrimmedAvg's beta: the share of the largest and of the smallest values cut from each coordinate
    trim_beta: float = 0.2
    # Krum's, MultiKrum's and Bulyan's num_malicious_nodes: how many attacking sites the rule is built to withstand
    # (Bulyan needs at least 4 times that plus 3 sites)
    num_malicious: int = 1
    # MultiKrum's num_nodes_to_select: how many of the best-scored replies it averages
    krum_select: int = 3
    # the server refuses a reply whose update norm per square root of its local steps is over this many times
    # the median of the round's other replies' (with 3 or more replies; 0 = no norm rule); NaN/inf values and
    # arrays that are not the model's are always refused
    reply_norm_ratio: float = 10.0
    # simulated attacking sites, as site ids: "1,3" ("" = none); they train on their own data and keep their ledger
    attackers: str = ""
    # what the attackers do: label-flip (train on wrong labels), sign-flip (send the update negated, times
    # attack-boost), scale (the update times attack-boost: model replacement), noise (a Gaussian update of the
    # update's norm), nan (NaN weights), backdoor (half its images carry a small trigger patch and are labelled
    # federation.backdoor-target)
    attack: str = ""
    # sign-flip's and scale's factor on the attacker's update
    attack_boost: float = 10.0
    # the class a backdoor's trigger relabels an image to (0 = healthy in the simulated data: a trigger that hides
    # a lesion); the run reports the share of triggered test images of other classes classified as it
    backdoor_target: int = 0
    # the server clips each kept reply's update (its model minus the model sent) to this L2 norm before the
    # strategy aggregates it: norm bounding without noise (0 = off; privacy.mode=central clips and adds noise)
    update_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        _require(self.sites >= 1, f"federation.sites must be at least 1, got {self.sites}")
        _require(self.rounds >= 1, f"federation.rounds must be at least 1, got {self.rounds}")
        _require(0 < self.fraction_train <= 1, f"federation.fraction-train must be in (0, 1], got {self.fraction_train}")
        _require(self.min_sites >= 1, f"federation.min-sites must be at least 1, got {self.min_sites}")
        _require(
            0 <= self.fraction_evaluate <= 1,
            f"federation.fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}",
        )
        _require(self.round_timeout > 0, f"federation.round-timeout must be > 0 seconds, got {self.round_timeout}")
        _require(self.rejoin_wait >= 0, f"federation.rejoin-wait must be >= 0 seconds, got {self.rejoin_wait}")
        _require(self.client_cpus > 0, f"federation.client-cpus must be > 0, got {self.client_cpus}")
        _require(self.client_gpus >= 0, f"federation.client-gpus must be >= 0, got {self.client_gpus}")
        _require(self.strategy in STRATEGIES,
                 f"federation.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        _require(self.server_learning_rate >= 0, "federation.server-learning-rate must be >= 0 "
                 f"(0 = Flower's default), got {self.server_learning_rate}")
        _require(0 <= self.server_momentum < 1,
                 f"federation.server-momentum must be in [0, 1), got {self.server_momentum}")
        _require(0 <= self.beta_1 < 1, f"federation.beta-1 must be in [0, 1), got {self.beta_1}")
        _require(0 <= self.beta_2 < 1, f"federation.beta-2 must be in [0, 1), got {self.beta_2}")
        _require(self.tau > 0, f"federation.tau must be > 0, got {self.tau}")
        _require(self.proximal_mu >= 0, f"federation.proximal-mu must be >= 0, got {self.proximal_mu}")
        _require(0 <= self.trim_beta < 0.5, f"federation.trim-beta must be in [0, 0.5), got {self.trim_beta}")
        _require(self.num_malicious >= 0, f"federation.num-malicious must be >= 0, got {self.num_malicious}")
        _require(self.krum_select >= 1, f"federation.krum-select must be at least 1, got {self.krum_select}")
        _require(self.reply_norm_ratio == 0 or self.reply_norm_ratio > 1,
                 f"federation.reply-norm-ratio must be 0 (off) or above 1, got {self.reply_norm_ratio}")
        _require(self.attack in ("", *POISONING),
                 f"federation.attack must be one of {', '.join(POISONING)}, got {self.attack!r}")
        self.attacking_sites()  # refuses a malformed list
        _require(bool(self.attack) == bool(self.attackers),
                 "federation.attackers and federation.attack go together: name the attacking sites and what they do"
                 f" (got attackers={self.attackers!r}, attack={self.attack!r})")
        _require(self.attack_boost > 0, f"federation.attack-boost must be > 0, got {self.attack_boost}")
        _require(self.backdoor_target >= 0, f"federation.backdoor-target must be a class index >= 0, "
                 f"got {self.backdoor_target}")
        _require(self.update_clip_norm >= 0,
                 f"federation.update-clip-norm must be >= 0 (0 = no clipping), got {self.update_clip_norm}")

    def attacking_sites(self) -> tuple[int, ...]:
        """federation.attackers as site ids: "1,3" -> (1, 3)."""
        return site_ids(self.attackers)

    def attack_of(self, site: int) -> str:
        """What site `site` does to the federation: its attack, or "" for an honest site."""
        return self.attack if site in self.attacking_sites() else ""


def site_ids(text: str) -> tuple[int, ...]:
    """Attacking sites written as federation.attackers is: "1,3" -> (1, 3); ConfigError when malformed."""
    try:
        sites = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise ConfigError(f'federation.attackers must look like "1,3" (site ids), got {text!r}') from None
    _require(all(s >= 0 for s in sites), f"federation.attackers: site ids are >= 0, got {text!r}")
    return sites
