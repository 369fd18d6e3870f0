"""Metering outside the sandbox: prices, usage read off upstream responses, budgets."""

from gateway.services.metering.budgets import (
    BudgetBusy,
    BudgetExhausted,
    Grant,
    Reservation,
)
from gateway.services.metering.prices import ModelPrice, PriceTable, Usage

__all__ = [
    "BudgetBusy",
    "BudgetExhausted",
    "Grant",
    "ModelPrice",
    "PriceTable",
    "Reservation",
    "Usage",
]
