"""The lab: synthetic fleets with planted truth, simulated engines, evaluate, bench, naive baselines.

It may import anything below it (``defs`` included, to drive the real assets); nothing in
production imports it — only the CLI's commands and the tests (enforced by the layer
contracts in pyproject.toml).
"""
