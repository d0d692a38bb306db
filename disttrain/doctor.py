"""``disttrain doctor``: checks this machine before it runs a coordinator or a worker.

Every check returns a ``Check`` (OK, WARN or FAIL, what was found, how to fix it); the command
prints them all and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import ipaddress
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist
import zmq

from disttrain.elastic import curve, protocol
from disttrain.elastic.protocol import SECRET_ENV, Message, ProtocolError, load_secret
from disttrain import kernels
from disttrain.kernels import dispatch

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_PYTHON = (3, 11)  # disttrain.train.config imports tomllib
MIN_TORCH = (2, 1)
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
SKEW_WARN_S = 5.0
_TIME_ERROR = 5  # adjtimex's answer when the kernel clock is not synchronised


@dataclass(frozen=True)
class Check:
    """One finding: its name, OK/WARN/FAIL, what was found and, unless OK, how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorConfig:
    """What to check beyond this machine: a coordinator, its job and the secret."""

    coordinator: str | None = None
    store_port: int = 0  # 0: the coordinator's port + 1, as the coordinator defaults to
    job: str = "disttrain"
    secret_file: str | None = None
    coordinator_key: str | None = None  # its CURVE public key, when it runs with --curve-keys
    timeout_s: float = 2.0


@dataclass(frozen=True)
class Answer:
    """The coordinator's reply to one signed heartbeat: its decoded fields or why there are none."""

    fields: dict | None
    error: str | None
    sent_at: float
    received_at: float


# --- this machine ---------------------------------------------------------------------
def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", FAIL, f"Python {version}", "use Python 3.11 or newer")
    return Check("python", OK, f"Python {version}")


def check_torch() -> Check:
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < MIN_TORCH:
        return Check("torch", FAIL, f"torch {version}", 'install torch 2.1 or newer: pip install "torch>=2.1"')
    return Check("torch", OK, f"torch {version} (CUDA {torch.version.cuda or 'none: a CPU build'})")


def check_distributed() -> Check:
    """Gloo must work (one-rank all_reduce); NCCL matters only where CUDA is."""
    if not dist.is_available() or not dist.is_gloo_available():
        return Check("distributed", FAIL, "torch.distributed with Gloo is not available in this torch build",
                     "install an official torch wheel for Linux or macOS")
    try:
        group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
        group.allreduce([torch.ones(1)]).wait()
    except RuntimeError as error:
        return Check("distributed", FAIL, f"a one-rank Gloo all_reduce failed: {error}",
                     "see the interface and hostname checks: Gloo must find an address to bind")
    if torch.cuda.is_available() and not dist.is_nccl_available():
        return Check("distributed", WARN, "Gloo works; CUDA is present but NCCL is not in this torch build",
                     "--backend auto picks NCCL for GPU training: pass --backend gloo, or install a CUDA build "
                     "of torch with NCCL from pytorch.org")
    return Check("distributed", OK, "Gloo works" + (", NCCL available" if dist.is_nccl_available() else ""))


def check_triton() -> Check:
    """Whether triton imports, and where the kernels run: Triton for CUDA tensors if so, else the torch references."""
    try:
        import triton
    except ImportError:
        triton = None
    try:
        on_cuda, on_cpu = (dispatch.use_triton(torch.device(kind)) for kind in ("cuda", "cpu"))
    except (RuntimeError, ValueError) as error:
        return Check("triton", FAIL, str(error), f"unset {dispatch.ENV_VAR} or set it to 'auto'")
    where = (f"kernels on CUDA tensors: {'Triton' if on_cuda else 'torch reference'}, "
             f"on CPU tensors: {'Triton interpreter' if on_cpu else 'torch reference'}")
    if triton is not None:
        return Check("triton", OK, f"triton {triton.__version__}; {where}")
    if torch.cuda.is_available():
        return Check("triton", WARN, f"triton is not installed; {where}", "pip install 'disttrain[gpu]' for the fused kernels")
    return Check("triton", OK, f"triton is not installed, and a CPU-only machine does not need it; {where}")


def gpu_probe(device: torch.device) -> str:
    """A bf16 autocast matmul and the default method's vote kernels on ``device``, checked against the
    torch reference; what ran, or a RuntimeError saying what went wrong."""
    x = torch.randn(256, 256, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        product = x @ x
    if not torch.isfinite(product).all():
        raise RuntimeError("a bf16 autocast matmul gave non-finite values")
    grad = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(device)
    got = kernels.top_votes(grad, None, 0.9, 256, 4)
    with kernels.backend("torch"):
        expected = kernels.top_votes(grad, None, 0.9, 256, 4)
    if not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, expected)):
        raise RuntimeError(f"the vote kernels disagree with their torch reference on {device}")
    return "Triton" if dispatch.use_triton(device) else "torch reference"


def check_cuda() -> Check:
    """Which device `--device auto` (the default) trains on here, and, with a GPU, that training's
    pieces run on it: a bf16 matmul and the default's vote kernels (checked against the reference)."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = torch.device("cuda", 0)
        try:
            kernels_used = gpu_probe(device)
        except RuntimeError as error:
            return Check("cuda", FAIL, f"{', '.join(names)}: a bf16 step failed on {names[0]}: {error}",
                         f"check the driver with nvidia-smi; {dispatch.ENV_VAR}=torch sidesteps the Triton kernels")
        found = (f"{len(names)} device(s): {', '.join(names)}; --device auto trains on them (LOCAL_RANK picks each "
                 f"worker's); a bf16 matmul and the vote kernels ({kernels_used}) ran on {names[0]}; --backend auto: "
                 "NCCL with a GPU per local worker, Gloo when workers share one")
        return Check("cuda", OK, found)
    if torch.version.cuda:
        found = f"torch is built for CUDA {torch.version.cuda} but sees no device: --device auto trains on the CPU"
        return Check("cuda", WARN, found, "check the driver with nvidia-smi; in Docker start the container with --gpus all")
    return Check("cuda", OK, "no CUDA in this torch build: --device auto trains on the CPU")


def _ifname_problems(variable: str, value: str, interfaces: set[str]) -> list[str]:
    """Names in ``value`` that match no interface (NCCL: prefixes, '=' exact, '^' excludes)."""
    missing = []
    for name in filter(None, value.split(",")):
        if variable.startswith("NCCL"):
            if name.startswith("^"):
                continue
            exact, name = name.startswith("="), name.removeprefix("=")
            found = name in interfaces if exact else any(i.startswith(name) for i in interfaces)
        else:
            found = name in interfaces
        if not found:
            missing.append(name)
    return missing


def check_interfaces() -> Check:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, where set, must name interfaces of this machine."""
    interfaces = {name for _, name in socket.if_nameindex()}
    problems = []
    for variable in IFNAME_VARS:
        value = os.environ.get(variable)
        missing = _ifname_problems(variable, value, interfaces) if value is not None else []
        if missing:
            problems.append(f"{variable}={value} names {', '.join(missing)}, which is not an interface here")
    listed = ", ".join(sorted(interfaces))
    if problems:
        return Check("interfaces", FAIL, "; ".join(problems) + f" (interfaces: {listed})",
                     "set it to the interface the nodes reach each other on (see `ip addr`), or unset it")
    chosen = [f"{v}={os.environ[v]}" for v in IFNAME_VARS if v in os.environ]
    return Check("interfaces", OK, f"{', '.join(chosen) or 'no *_SOCKET_IFNAME set'} (interfaces: {listed})")


def check_hostname() -> Check:
    """Gloo advertises the address the hostname resolves to unless GLOO_SOCKET_IFNAME says otherwise."""
    host = socket.gethostname()
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except socket.gaierror as error:
        status = WARN if "GLOO_SOCKET_IFNAME" in os.environ else FAIL
        return Check("hostname", status, f"hostname {host!r} does not resolve ({error.strerror})",
                     f"add {host} to /etc/hosts with this machine's address, or set GLOO_SOCKET_IFNAME")
    routable = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if routable:
        return Check("hostname", OK, f"{host} resolves to {', '.join(routable)}")
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return Check("hostname", OK, f"{host} resolves only to loopback; GLOO_SOCKET_IFNAME picks the address instead")
    return Check("hostname", WARN, f"{host} resolves only to loopback ({', '.join(addresses)}): fine on one machine, "
                 "but workers on other machines could not reach this one",
                 "for several machines set GLOO_SOCKET_IFNAME to the interface they reach each other on")


def check_secret(secret_file: str | None, required: bool) -> Check:
    """The job secret loads and is long enough; missing is only a warning when no coordinator is named."""
    source = f"--secret-file {secret_file}" if secret_file else f"${SECRET_ENV}"
    fix = (f"`openssl rand -hex 32 > job_secret`, then pass --secret-file job_secret "
           f"(or export {SECRET_ENV}), the same on every node")
    if not secret_file and SECRET_ENV not in os.environ and not required:
        return Check("secret", WARN, f"no job secret: neither --secret-file nor ${SECRET_ENV} is set "
                     "(`disttrain demo` makes its own; a coordinator and its workers need one)", fix)
    try:
        secret = load_secret(secret_file)
    except FileNotFoundError as error:
        return Check("secret", FAIL, str(error), fix)
    except ValueError as error:
        return Check("secret", FAIL, f"{source} holds no job secret of 16 bytes or more", str(error))
    return Check("secret", OK, f"{len(secret)} bytes from {source}")


def check_clock_sync() -> Check:
    """Whether the kernel says its clock is NTP-synchronised (adjtimex, read-only)."""
    adjtimex = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "adjtimex", None)
    state = adjtimex(ctypes.byref(ctypes.create_string_buffer(512))) if adjtimex else -1  # modes = 0: only read
    if state < 0:
        return Check("clock", WARN, "cannot ask the kernel whether the clock is synchronised (no adjtimex)",
                     "make sure NTP runs: messages more than 60 s off the coordinator's clock are refused")
    if state == _TIME_ERROR:
        return Check("clock", WARN, f"the kernel reports the clock as not synchronised (local time {time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
                     "run an NTP client (chrony, systemd-timesyncd): messages more than 60 s off the coordinator's clock are refused")
    return Check("clock", OK, "the kernel reports the clock as synchronised")


# --- the coordinator ------------------------------------------------------------------
def _connect_error(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


def check_coordinator(host: str, port: int, timeout_s: float) -> Check:
    error = _connect_error(host, port, timeout_s)
    if error:
        return Check("coordinator", FAIL, f"cannot reach the coordinator at {host}:{port} ({error})",
                     f"start it (`disttrain coordinator --bind tcp://0.0.0.0:{port}`), check the address, "
                     f"and let TCP port {port} through any firewall between this node and {host}")
    return Check("coordinator", OK, f"{host}:{port} accepts connections")


def check_store(host: str, port: int, timeout_s: float) -> Check:
    """The rendezvous store, where every generation's process group forms."""
    error = _connect_error(host, port, timeout_s)
    if error:
        return Check("store", FAIL, f"cannot reach the rendezvous store at {host}:{port} ({error})",
                     f"let TCP port {port} through to {host} too (the coordinator's --store-port, by default its port + 1), "
                     "or pass the right one with --store-port")
    return Check("store", OK, f"rendezvous store at {host}:{port} accepts connections")


def ask_coordinator(address: str, secret: bytes, job: str, timeout_s: float, coordinator_key: bytes | None = None) -> Answer:
    """One signed heartbeat from a fresh id, which joins nothing: the coordinator answers it with a
    view (after telling its incarnation, which the heartbeat is then sent again for)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if coordinator_key is not None:
        curve.connect_encrypted(sock, coordinator_key)
    sender, incarnation = f"doctor-{uuid.uuid4().hex}", ""
    try:
        sock.connect(address)
        for _ in range(2):
            sent_at = time.time()
            sock.send(protocol.encode(Message("heartbeat", job, sender, 0, {"step": 0}, incarnation=incarnation), secret))
            if not sock.poll(int(timeout_s * 1000)):
                return Answer(None, f"no answer within {timeout_s:g} s", sent_at, time.time())
            answer = _read_answer(sock.recv(), secret, job, sent_at)
            if answer.fields is None or answer.fields.get("type") != "restarted":
                return answer
            incarnation = answer.fields["inc"]
        return answer
    finally:
        sock.close(0)


def _read_answer(frame: bytes, secret: bytes, job: str, sent_at: float) -> Answer:
    received_at = time.time()
    if frame == protocol.UNAUTHENTICATED:  # all a coordinator tells a sender without its secret
        return Answer(None, "bad signature: the coordinator could not authenticate this node's message", sent_at, received_at)
    try:
        message = protocol.decode(frame, secret, job)
    except ProtocolError as error:
        return Answer(_unverified_fields(frame), str(error), sent_at, received_at)
    fields = {"type": message.type, "ts": message.ts, "inc": message.incarnation, **message.body}
    return Answer(fields, message.body.get("reason"), sent_at, received_at)


def _unverified_fields(frame: bytes) -> dict | None:
    """The fields of a frame that ``decode`` refused, read without any checks (for its timestamp)."""
    try:
        fields = msgpack.unpackb(msgpack.unpackb(frame)[0])
        return fields if isinstance(fields, dict) else None
    except Exception:  # msgpack raises many types on garbage
        return None


def check_handshake(answer: Answer, address: str, job: str) -> Check:
    """Whether the coordinator accepts this node's secret, job id and clock."""
    if answer.error is None:
        rtt_ms = (answer.received_at - answer.sent_at) * 1000
        return Check("handshake", OK, f"job {job!r} answers signed messages (generation {answer.fields['gen']}, "
                     f"{len(answer.fields['roster'])} workers, round trip {rtt_ms:.0f} ms)")
    if "signature" in answer.error:
        fix = f"give this node the coordinator's secret (--secret-file, or ${SECRET_ENV})"
    elif "job" in answer.error:
        fix = "pass the coordinator's job id with --job"
    elif "timestamp" in answer.error:
        fix = "see the clock skew check"
    elif answer.fields is None and "no answer" in answer.error:
        fix = ("a coordinator that runs with --curve-keys answers only with --coordinator-key (its coordinator.key); "
               "with that key given, check that it is this coordinator's and that it runs with --curve-keys")
    else:
        fix = f"check that {address} is a disttrain coordinator, of the same disttrain version"
    return Check("handshake", FAIL, f"the coordinator at {address} did not accept this node: {answer.error}", fix)


def check_clock_skew(answer: Answer) -> Check:
    """This clock against the coordinator's, from the timestamp its reply carries."""
    if answer.fields is None or not isinstance(answer.fields.get("ts"), float):
        return Check("clock skew", WARN, "no timestamp from the coordinator to compare with", "see the handshake check")
    skew = answer.fields["ts"] - (answer.sent_at + answer.received_at) / 2
    detail = f"the coordinator's clock is {skew:+.3f} s from this one (±{(answer.received_at - answer.sent_at) / 2:.3f} s)"
    fix = "synchronise both clocks with NTP (chrony, systemd-timesyncd)"
    if abs(skew) > protocol.MAX_CLOCK_SKEW_S:
        return Check("clock skew", FAIL, detail + f": messages more than {protocol.MAX_CLOCK_SKEW_S:.0f} s off are refused", fix)
    if abs(skew) > SKEW_WARN_S:
        return Check("clock skew", WARN, detail, fix)
    return Check("clock skew", OK, detail)


def check_network(config: DoctorConfig, secret_ok: bool) -> list[Check]:
    """The coordinator's port and its store's, then one signed exchange with it."""
    parsed = re.fullmatch(r"tcp://([^:/]+):(\d+)", config.coordinator)
    if parsed is None:
        return [Check("coordinator", FAIL, f"--coordinator {config.coordinator!r} is not tcp://HOST:PORT",
                      "pass the coordinator's --bind address with its host name or IP, e.g. tcp://COORDINATOR_HOST:29400")]
    host, port = parsed.group(1), int(parsed.group(2))
    reachable = check_coordinator(host, port, config.timeout_s)
    checks = [reachable, check_store(host, config.store_port or port + 1, config.timeout_s)]
    if reachable.status == OK and secret_ok:
        try:
            key = curve.resolve_coordinator_key(config.coordinator_key)
        except curve.CurveKeyError as error:
            return [*checks, Check("coordinator key", FAIL, str(error), "give the coordinator's coordinator.key, or unset the variable")]
        answer = ask_coordinator(config.coordinator, load_secret(config.secret_file), config.job, config.timeout_s, key)
        checks += [check_handshake(answer, config.coordinator, config.job), check_clock_skew(answer)]
    return checks


# --- the command ----------------------------------------------------------------------
def run_checks(config: DoctorConfig) -> list[Check]:
    secret = check_secret(config.secret_file, required=bool(config.coordinator))
    checks = [
        check_python(), check_torch(), check_distributed(), check_triton(), check_cuda(),
        check_interfaces(), check_hostname(), secret, check_clock_sync(),
    ]
    if config.coordinator:
        checks += check_network(config, secret.status == OK)
    return checks


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name:<12} {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<19}fix: {check.fix}")
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, FAIL)}
    lines.append(", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", help="tcp://HOST:PORT of a coordinator to reach and shake hands with")
    parser.add_argument("--store-port", type=int, default=0, help="its rendezvous store port (default: its port + 1)")
    parser.add_argument("--job", default="disttrain", help="the job id to present to the coordinator")
    parser.add_argument("--secret-file", help=f"file holding the job secret (default: ${SECRET_ENV})")
    parser.add_argument(
        "--coordinator-key", metavar="FILE|KEY",
        help=f"its CURVE public key, when it runs with --curve-keys (default: ${curve.COORDINATOR_KEY_ENV})",
    )
    parser.add_argument("--timeout-s", type=float, default=2.0, help="for each network check")


def command(args: argparse.Namespace) -> int:
    """Run every check, write the report to stdout; 1 if any check failed."""
    config = DoctorConfig(
        coordinator=args.coordinator, store_port=args.store_port, job=args.job,
        secret_file=args.secret_file, coordinator_key=args.coordinator_key, timeout_s=args.timeout_s,
    )
    checks = run_checks(config)
    sys.stdout.write(report(checks))
    return int(any(check.status == FAIL for check in checks))
