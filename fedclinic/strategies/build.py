"""The run's strategy, built from its configuration: Flower's classes, central DP, the site bookkeeping.

    strategy = build_strategy(config, sites=5, rounds=4)
    result = strategy.start(...)      # raises FederationStopped when too few sites are left

`federation.strategy` picks Flower's class (server_optimizers.py); it gets the
sampling, weighting and metric aggregation fedclinic needs, and `SiteRounds`
(sites.py) goes around it. With central DP (privacy.mode central or both),
Flower's DifferentialPrivacyServerSideFixedClipping, with its RDP accountant,
wraps FedAvg or FedProx directly.

It cannot wrap a server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad).
Its accountant refuses any strategy whose aggregate_train is not FedAvg's
(flwr/serverapp/strategy/dp_fixed_clipping.py, the check in
DifferentialPrivacyFixedClippingBase.__init__), and rightly: the wrapper adds
its noise to whatever the wrapped strategy returns, which for a server
optimizer is the model after its step. That step's sensitivity is no longer
the clipping norm over the number of sites (FedAdam divides by the root of
its second moment), and its moments would carry the noiseless mean into
later rounds. So under central DP the wrapper makes the private mean with a
plain FedAvg, and the server optimizer steps from that release: post-processing,
which spends no privacy and leaves Flower's accounting exact.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedclinic.config import Config
from fedclinic.strategies.server_optimizers import flower_strategy, is_server_optimizer
from fedclinic.strategies.sites import SiteRounds, aggregate_site_metrics


def sites_per_round(config: Config, sites: int) -> int:
    """How many sites FedAvg samples per round (its own rule: a share, at least min-sites)."""
    fed = config.federation
    return min(sites, max(int(sites * fed.fraction_train), min(fed.min_sites, sites)))


def build_strategy(config: Config, *, sites: int, rounds: int) -> SiteRounds:
    """federation.strategy for the configured privacy mode, wrapped in SiteRounds."""
    fed, privacy = config.federation, config.privacy
    min_sites = min(fed.min_sites, sites)
    sampling = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=min_sites,
    )
    averaging = dict(
        # central DP needs every site to weigh the same; otherwise weigh by examples
        weighted_by_key="site-weight" if privacy.central else "num-examples",
        train_metrics_aggr_fn=aggregate_site_metrics,
    )
    server_optimizer = None
    if privacy.central and is_server_optimizer(fed.strategy):  # it steps from the private mean (docstring)
        strategy: Strategy = FedAvg(**sampling, **averaging)
        server_optimizer = flower_strategy(fed, **sampling)
    else:
        strategy = flower_strategy(fed, **sampling, **averaging)
    if privacy.central:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.central_delta,
                population_size=sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                # no amplification is claimed from sampling sites: the sample is not Poisson
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=privacy.central_noise_multiplier,
            clipping_norm=privacy.central_clipping_norm,
            num_sampled_clients=sites_per_round(config, sites),
            accountant=accountant,
        )
    return SiteRounds(strategy, min_sites=min_sites, rounds=rounds, sites=sites, rejoin_wait=fed.rejoin_wait,
                      fraction_train=fed.fraction_train, server_optimizer=server_optimizer,
                      reply_norm_ratio=fed.reply_norm_ratio, update_clip_norm=fed.update_clip_norm)
