"""Optional encryption of the control plane with ZMQ CURVE.

The coordinator keeps a long-term key pair in a folder (``--curve-keys DIR``, made on first use);
workers are given its public key (``--coordinator-key``) and use a fresh key pair of their own.
CURVE hides what the messages say from an observer on the wire; who may take part is still decided
by the job secret's signature on every message (see docs/threat-model.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)

KEY_NAME = "coordinator"
PUBLIC_KEY_FILE = f"{KEY_NAME}.key"
SECRET_KEY_FILE = f"{KEY_NAME}.key_secret"
Z85_KEY_LENGTH = 40
COORDINATOR_KEY_ENV = "DISTTRAIN_COORDINATOR_KEY"


class CurveKeyError(ValueError):
    """A key folder or public key that cannot be used; the message says how to fix it."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveKeyError("this pyzmq's libzmq was built without CURVE: install pyzmq's own wheel (`pip install pyzmq`)")


def coordinator_keys(folder: str | Path) -> tuple[bytes, bytes]:
    """The coordinator's (public, secret) key pair from ``folder``, made there if it holds none."""
    _require_curve()
    folder = Path(folder)
    secret_file = folder / SECRET_KEY_FILE
    if not secret_file.exists():
        if folder.exists() and not folder.is_dir():
            raise CurveKeyError(f"--curve-keys {folder} is a file: give a folder (it is made if missing)")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        zmq.auth.create_certificates(folder, KEY_NAME)
        os.chmod(secret_file, 0o600)
        log.info("made the coordinator's CURVE keys in %s: give workers --coordinator-key %s", folder, folder / PUBLIC_KEY_FILE)
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as error:
        raise CurveKeyError(f"cannot read the coordinator's CURVE keys from {secret_file}: {error}; remove the folder to make new ones") from None
    if secret is None:
        raise CurveKeyError(f"{secret_file} holds no secret key: remove {folder} to make new keys")
    return public, secret


def resolve_coordinator_key(value: str | None) -> bytes | None:
    """The coordinator's public key from ``--coordinator-key`` or else ``$DISTTRAIN_COORDINATOR_KEY``;
    None when neither is set (the control plane is plain text)."""
    if value:
        return coordinator_public_key(value)
    from_env = os.environ.get(COORDINATOR_KEY_ENV)
    return coordinator_public_key(from_env, f"${COORDINATOR_KEY_ENV}") if from_env else None


def coordinator_public_key(value: str, where: str = "--coordinator-key") -> bytes:
    """The coordinator's public key from ``where`` (the flag, or the variable): the path of its
    ``coordinator.key`` (or of the key folder), or the key itself in Z85 (40 characters)."""
    _require_curve()
    path = Path(value)
    if path.is_dir():
        path = path / PUBLIC_KEY_FILE
    if path.is_file():
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as error:
            raise CurveKeyError(f"{where} {value}: not a CURVE key file ({error}); give the coordinator's {PUBLIC_KEY_FILE}") from None
        return public
    if len(value) == Z85_KEY_LENGTH:
        try:
            zmq.utils.z85.decode(value)
        except (ValueError, KeyError):
            pass
        else:
            return value.encode()
    raise CurveKeyError(
        f"{where} {value}: no such file, and not a {Z85_KEY_LENGTH}-character Z85 key; give the "
        f"{PUBLIC_KEY_FILE} from the coordinator's --curve-keys folder"
    )


def serve_encrypted(sock: zmq.Socket, keys: tuple[bytes, bytes]) -> None:
    """Make ``sock`` (before it binds) a CURVE server with the coordinator's key pair."""
    public, secret = keys
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def connect_encrypted(sock: zmq.Socket, server_public: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the server with this public key."""
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
