"""How a Session exchanges updates in the user's loop: every step, or once per round of local steps."""

from disttrain.exchange.base import Exchange
from disttrain.exchange.local_rounds import LocalRoundsExchange
from disttrain.exchange.per_step import PerStepExchange

__all__ = ["Exchange", "LocalRoundsExchange", "PerStepExchange"]
