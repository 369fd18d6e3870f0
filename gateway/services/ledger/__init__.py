"""The ledger: persists every session event and applies lifecycle events to the database.

Cut along its seams: ``reader`` (the consumer-group loop, acks, dead letters), ``persister``
(batched inserts), ``lifecycle`` (the rules per wrapper event), ``followups`` (what happens after
a lifecycle commit), ``collector`` (artifacts copied after the commit, then ``turn_recorded``)
and ``trim`` (streams shortened below the persisted watermark).
"""

from gateway.services.ledger.collector import ArtifactCollector, Job
from gateway.services.ledger.lifecycle import apply_lifecycle, turn_status_of
from gateway.services.ledger.reader import Ledger, claimed_ids

__all__ = [
    "ArtifactCollector",
    "Job",
    "Ledger",
    "apply_lifecycle",
    "claimed_ids",
    "turn_status_of",
]
