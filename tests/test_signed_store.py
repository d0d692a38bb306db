"""The signed rendezvous store: members read back what members wrote, and nothing anyone else wrote."""

from datetime import timedelta

import pytest
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from disttrain.elastic.signed_store import ForgedStoreValue, SignedStore

SECRET = b"0123456789abcdef0123456789abcdef"
keys = st.text(min_size=1, max_size=40)


@given(key=keys, value=st.binary(max_size=300))
def test_a_value_a_member_wrote_reads_back_unchanged(key, value):
    store = SignedStore(dist.HashStore(), SECRET)
    store.set(key, value)
    assert store.get(key) == value


@given(key=keys, value=st.binary(max_size=300))
def test_a_value_written_past_the_signature_is_refused(key, value):
    inner = dist.HashStore()
    inner.set(key, value)
    with pytest.raises(ForgedStoreValue, match="not signed with the job secret"):
        SignedStore(inner, SECRET).get(key)


@given(key=keys, value=st.binary(min_size=1, max_size=300), flip=st.integers(min_value=0))
def test_a_member_value_changed_in_any_byte_is_refused(key, value, flip):
    inner = dist.HashStore()
    SignedStore(inner, SECRET).set(key, value)
    raw = bytearray(inner.get(key))
    raw[flip % len(raw)] ^= 0x01
    inner.set(key, bytes(raw))
    with pytest.raises(ForgedStoreValue):
        SignedStore(inner, SECRET).get(key)


def test_a_value_signed_with_another_secret_or_moved_to_another_key_or_generation_is_refused():
    inner = dist.HashStore()
    SignedStore(inner, b"another-secret-another-secret-!!").set("a", b"address")
    with pytest.raises(ForgedStoreValue):
        SignedStore(inner, SECRET).get("a")
    SignedStore(inner, SECRET).set("a", b"address")
    inner.set("b", inner.get("a"))
    with pytest.raises(ForgedStoreValue):
        SignedStore(inner, SECRET).get("b")
    SignedStore(inner, SECRET, context="gen1/x").set("c", b"address")
    assert SignedStore(inner, SECRET, context="gen1/x").get("c") == b"address"
    with pytest.raises(ForgedStoreValue):
        SignedStore(inner, SECRET, context="gen2/y").get("c")


def test_counters_and_waits_pass_through():
    store = SignedStore(dist.HashStore(), SECRET)
    assert store.add("n", 2) == 2 and store.add("n", 3) == 5
    store.set("k", b"v")
    store.wait(["k"], timedelta(seconds=1))
    assert store.check(["k"]) and not store.check(["missing"])
