"""Proposal rationales written by an LLM from the proposal's evidence, checked, with the template as fallback.

When a provider is configured (META_PIPELINE_LLM_PROVIDER, see meta_pipeline.llm), each new
proposal's ``rationale_text`` is asked of the model: the target, the current and proposed
configs and ``evidence_json``, with the instruction to quote numbers only from them. The reply
is accepted only if

* it is non-empty plain text of at most ``MAX_CHARS`` characters, and
* every number it states is supported: it equals a number of the evidence, the configs or
  the template rationale (which is built from the evidence) — equal as written, or equal to
  such a number rounded to the reply's number of decimals (0.0123 may be quoted as 0.012;
  a percentage "12.3%" is checked as 0.123 and as 12.3); integers must match exactly.

Otherwise — no provider, a provider error, the budget, a timeout, an unsupported number —
the template stays. Nothing here raises: a proposal is never blocked by its rationale.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meta_pipeline.llm import LLMClient, LLMError, client_for, flush_call_records, settings_from_env
from meta_pipeline.store import MetaStore
from meta_pipeline.store import prompts as prompt_rows

MAX_CHARS = 2000
SYSTEM = (
    "You write the rationale of a configuration-change proposal for the person who will approve or reject it. "
    "Use only facts present in the proposal below (its evidence_json and configs) and quote every number exactly "
    "as it appears there; do not compute new numbers. Three to five sentences of plain text: what changes, why the "
    "evidence supports it, and what the reviewer should check."
)
_NUMBER_RE = re.compile(r"(?<![\w.])[-+−]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?%?")


@dataclass(frozen=True)
class RationaleOutcome:
    text: str
    source: str  # "llm" | "template"
    note: str  # why the template was kept, or "written by <provider model>"


def numbers_in(text: str) -> list[str]:
    """The numbers a text states, as written (thousands separators and a trailing % kept)."""
    return [m.group(0) for m in _NUMBER_RE.finditer(text or "")]


def _value(token: str) -> tuple[float, int, bool]:
    """(value, decimals, is a percentage) of a number token."""
    t = token.replace("−", "-").replace(",", "").lstrip("+")
    pct = t.endswith("%")
    t = t.rstrip("%")
    mantissa = t.split("e")[0].split("E")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return float(t), decimals, pct


def _evidence_values(texts: Iterable[str]) -> list[float]:
    values = []
    for text in texts:
        for token in numbers_in(text):
            try:
                values.append(_value(token)[0])
            except ValueError:
                continue
    return values


def unsupported_numbers(rationale: str, evidence_texts: Sequence[str]) -> list[str]:
    """The numbers of ``rationale`` that no number of the evidence supports (module doc). Magnitudes are
    compared (a shortfall of 0.12 may quote a difference of −0.12)."""
    known = [abs(k) for k in _evidence_values(evidence_texts)]
    bad = []
    for token in numbers_in(rationale):
        try:
            value, decimals, pct = _value(token)
        except ValueError:
            bad.append(token)
            continue
        value = abs(value)
        targets = [(value, decimals)] + ([(value / 100.0, decimals + 2)] if pct else [])
        ok = any((k == target) if places == 0 else abs(k - target) <= 0.5 * 10.0 ** (-places) + 1e-12
                 for target, places in targets for k in known)
        if not ok:
            bad.append(token)
    return bad


def rationale_messages(proposal: Mapping[str, Any]) -> list[dict]:
    body = {
        "target_type": proposal.get("target_type"), "target_id": proposal.get("target_id"),
        "current_config": _loads(proposal.get("current_config_snapshot_json")),
        "proposed_config": _loads(proposal.get("proposed_config_json")),
        "confidence": proposal.get("confidence"),
    }
    evidence = _loads(proposal.get("evidence_json"))
    return [{"role": "system", "content": SYSTEM + " The evidence_json is given after 'EVIDENCE:'."},
            {"role": "user", "content": "PROPOSAL: " + json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)
             + "\nEVIDENCE: " + json.dumps(evidence, sort_keys=True, ensure_ascii=False, default=str)}]


def _loads(text: object) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def write_rationale(client: LLMClient | None, proposal: Mapping[str, Any]) -> RationaleOutcome:
    """The LLM's rationale for one proposal if it passes the checks, else the template (module doc)."""
    template = str(proposal.get("rationale_text") or "")
    if client is None or not client.settings.enabled:
        return RationaleOutcome(template, "template", "no LLM provider configured")
    try:
        reply = client.complete(rationale_messages(proposal), purpose="rationale")
    except LLMError as exc:
        return RationaleOutcome(template, "template", f"LLM unavailable: {exc}")
    except Exception as exc:  # noqa: BLE001 - a rationale never blocks a proposal
        return RationaleOutcome(template, "template", f"LLM failed: {type(exc).__name__}: {exc}")
    text = " ".join((reply.text or "").split())
    if not text:
        return RationaleOutcome(template, "template", "the LLM replied nothing")
    if len(text) > MAX_CHARS:
        return RationaleOutcome(template, "template", f"the LLM's rationale is longer than {MAX_CHARS} characters")
    evidence = [str(proposal.get(k) or "") for k in ("evidence_json", "current_config_snapshot_json",
                                                     "proposed_config_json", "target_id", "confidence")]
    bad = unsupported_numbers(text, [*evidence, template])
    if bad:
        return RationaleOutcome(template, "template",
                                f"rejected the LLM's rationale: it states {', '.join(bad[:5])}, not in the evidence")
    return RationaleOutcome(text, "llm", f"written by {client.describe()}")


def rewrite_pending_rationales(store: MetaStore, proposal_ids: Sequence[str],
                               log: Callable[[str], None] | None = None) -> list[RationaleOutcome]:
    """For proposals just inserted: when a provider is configured (environment), replace each one's
    template rationale by the LLM's, if it passes the checks. Never raises."""
    if not proposal_ids:
        return []
    try:
        settings = settings_from_env()
        if not settings.enabled:
            return []
        client = client_for(store, settings)
    except Exception as exc:  # noqa: BLE001 - a misconfigured provider never blocks proposals
        if log:
            log(f"rationales: LLM not used ({exc})")
        return []
    outcomes = []
    try:
        for proposal_id in proposal_ids:
            rows = store.read("meta_controller_config_proposals", equals={"proposal_id": proposal_id})
            if rows.empty:
                continue
            outcome = write_rationale(client, rows.iloc[0].to_dict())
            if outcome.source == "llm":
                prompt_rows.set_pending_rationale(store, proposal_id, outcome.text)
            if log:
                log(f"rationale of {proposal_id}: {outcome.source} ({outcome.note})")
            outcomes.append(outcome)
    except Exception as exc:  # noqa: BLE001
        if log:
            log(f"rationales: stopped ({type(exc).__name__}: {exc})")
    finally:
        try:
            flush_call_records(store, client)
        except Exception:  # noqa: BLE001
            pass
    return outcomes
