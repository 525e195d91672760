"""The eight AMOC variants as data (docs/pretrain.md).

A variant's name is three letters, Query-Key-Queue, each Clean or Adversarial; it is
parsed once into a frozen :class:`Variant` whose properties answer every question the
training step and the attack ask, so no code branches on the name itself.

=========  =====================  =====================  ==========  ==========================
variant    query in L_adv         key in L_adv           negatives   written to queue_adv
=========  =====================  =====================  ==========  ==========================
CCC        (no L_adv: plain MoCo)                                    nothing
CAC        clean query (reused)   key net, adv key view  queue_clean adversarial keys
CAA        clean query (reused)   key net, adv key view  queue_adv   adversarial keys
ACC        adv query view         clean key (reused)     queue_clean nothing
ACA        adv query view         clean key (reused)     queue_adv   nothing (stays random)
ACA+       adv query view         clean key (reused)     queue_adv   key net on adv query views
AAC        adv query view         key net, adv key view  queue_clean adversarial keys
AAA        adv query view         key net, adv key view  queue_adv   adversarial keys
=========  =====================  =====================  ==========  ==========================

Every adversarial view runs through the adversarial BN branch; every clean view through
the clean one. Plain ACA never writes queue_adv, faithfully to the authors' code: its
L_adv negatives are the queue's random initial columns for the whole run. ACA+ exists
to fix that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from amoc.config import VARIANT_ALIASES, VARIANTS

QueueName = Literal["clean", "adv"]
# What enters queue_adv after a step: nothing, the adversarial keys (key net on the
# adversarial key views), or the key net's features of the adversarial query views.
AdvEnqueue = Literal["none", "adv_keys", "adv_query_keys"]


@dataclass(frozen=True)
class Variant:
    name: str
    adv_query: bool  # L_adv's query: query net on the adversarial query view (else the clean query)
    adv_key: bool  # L_adv's key: key net on the adversarial key view (else the clean key)
    adv_queue: bool  # L_adv's negatives: queue_adv (else queue_clean)
    plus_enqueue: bool = False  # ACA+: enqueue key-net features of the adversarial query views

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """'ACA', 'aca+', 'ACA_PLUS' ... -> Variant; ValueError naming the choices otherwise."""
        canon = VARIANT_ALIASES.get(name.upper(), name.upper())
        if canon not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} (ACA_PLUS = ACA+)")
        letters = canon[:3]
        return cls(
            name=canon,
            adv_query=letters[0] == "A",
            adv_key=letters[1] == "A",
            adv_queue=letters[2] == "A",
            plus_enqueue=canon.endswith("+"),
        )

    # ------------------------------------------------------------------ the loss
    @property
    def has_adv_loss(self) -> bool:
        """CCC is plain MoCo: loss = L_clean and no attack runs."""
        return self.adv_query or self.adv_key

    @property
    def negatives(self) -> QueueName:
        """The queue whose keys are L_adv's negatives (and the attack's)."""
        return "adv" if self.adv_queue else "clean"

    @property
    def adv_enqueue(self) -> AdvEnqueue:
        if self.adv_key:
            return "adv_keys"
        if self.plus_enqueue:
            return "adv_query_keys"
        return "none"

    @property
    def writes_queue_adv(self) -> bool:
        return self.adv_enqueue != "none"

    # ------------------------------------------------------------------ BN branches
    @property
    def encoder_bn_branch(self) -> Literal["clean", "adv"]:
        """The query encoder's BN branch that pre-training actually trains for
        adversarial inputs. The query net sees adversarial views only when the query
        is adversarial; in CCC, CAC and CAA its adv branch keeps its initial values
        (adversarial keys go through the key net), so monitors use the clean branch."""
        return "adv" if self.adv_query else "clean"

    def __str__(self) -> str:
        return self.name
