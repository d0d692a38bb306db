"""How a Session exchanges updates: every step (compressed, torch DDP, zeroth-order), or once per round of local steps."""

from disttrain.exchange.base import Exchange, ExchangeOptions
from disttrain.exchange.factory import build_exchange

__all__ = ["Exchange", "ExchangeOptions", "build_exchange"]
