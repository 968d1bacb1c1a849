"""Jobs over the asset graph: one domain's full refresh, and the cross-domain fleet pass.

Per-domain assets live in the groups below; the unpartitioned cross-domain ones
(global_prior, config_proposals) live in group "fleet", so the selections stay
correct as assets are added.
"""

import dagster as dg


PER_DOMAIN_GROUPS = ("ingest", "learning", "feedback", "meta", "governance")
FLEET_GROUP = "fleet"

domain_refresh_job = dg.define_asset_job(
    "domain_refresh_job",
    selection=dg.AssetSelection.groups(*PER_DOMAIN_GROUPS),
    description="Recompute everything for one domain: summaries, learning jobs, priors, controller, diagnostics.",
)

learning_job = dg.define_asset_job(
    "learning_job",
    selection=dg.AssetSelection.groups("learning"),
    description="The learning jobs of one domain, from lessons to pm_overrides.",
)

fleet_refresh_job = dg.define_asset_job(
    "fleet_refresh_job",
    selection=dg.AssetSelection.groups(FLEET_GROUP),
    description="Cross-domain: the global prior and the config proposals.",
)
