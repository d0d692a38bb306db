"""A rendezvous store whose values carry the job secret's signature.

The coordinator's TCPStore has no authentication, and anyone who reaches it can list its keys. A
generation's process group forms through this wrapper: every value is written with an HMAC of
its key and bytes, and a value read back without a valid one (written by someone without the
secret) is refused with a RuntimeError, so the generation fails to form and is replaced, instead
of a worker crashing inside Gloo on garbage. Counters (``add``) are integers kept by the store
itself and pass through unsigned."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import torch.distributed as dist

TAG_BYTES = 32


class ForgedStoreValue(RuntimeError):
    """A value in the rendezvous store was not written by a member of this job."""


class SignedStore(dist.Store):
    """``inner`` with signed values (see the module's docstring); ``context`` (the generation's
    prefix) is signed with every value, so that a value copied from another generation is refused too."""

    def __init__(self, inner: dist.Store, secret: bytes, context: str = ""):
        super().__init__()
        self.inner = inner
        self._secret = secret
        self._context = context.encode()

    def _tag(self, key: str, value: bytes) -> bytes:
        return hmac.new(self._secret, self._context + b"\0" + key.encode() + b"\0" + value, hashlib.sha256).digest()

    def set(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self.inner.set(key, self._tag(key, data) + data)

    def get(self, key: str) -> bytes:
        raw = bytes(self.inner.get(key))
        tag, data = raw[:TAG_BYTES], raw[TAG_BYTES:]
        if len(tag) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(key, data)):
            raise ForgedStoreValue(
                f"rendezvous store key {key!r} holds a value not signed with the job secret: someone who "
                "reaches the store wrote it (keep the store's port on a private network; see docs/threat-model.md)"
            )
        return data

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)
