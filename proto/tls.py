"""TLS for splitserve's gRPC servers and channels (cluster.yaml `tls`).

One certificate, key and CA for a cluster: every process serves with the certificate (the
router's public HTTP and gRPC endpoints, the workers' RPC and KV ports) and verifies the
processes it calls against the CA. The cluster token still decides who may call; TLS keeps
the token, the KV and the prompts from being read or changed on the wire.

Workers are reached at addresses that change (a pod's IP, a Ray node's), so a certificate
cannot always name them: `server_name` is the name every peer's certificate is checked for
instead of the address it was dialled at (gRPC's ssl_target_name_override).

`tls=None` everywhere means plaintext, as before.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

Options = Sequence[tuple[str, object]]


@dataclass(frozen=True)
class TLSFiles:
    cert: str = ""  # PEM certificate this process serves with (with its chain)
    key: str = ""  # its PEM private key
    ca: str = ""  # PEM CA bundle the peers' certificates are checked against
    server_name: str | None = None  # the name checked in peers' certificates; None: the address dialled

    def missing(self) -> list[str]:
        """The fields (cert, key, ca) that name no readable file."""
        return [name for name in ("cert", "key", "ca") if not getattr(self, name) or not Path(getattr(self, name)).is_file()]

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca).read_bytes())

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(address: str, tls: TLSFiles | None, options: Options = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def aio_channel(address: str, tls: TLSFiles | None, options: Options = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    """Bind `address` (port 0: any free one); returns the port, 0 when it could not bind."""
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.server_credentials())
    except RuntimeError:  # grpcio raises "Failed to bind" where older versions returned 0
        return 0


# ---- command lines of processes started with the cluster's TLS ----------------------------
def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS of the gRPC ports (cluster.yaml tls; all of cert, key and CA, or none)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate this process serves with")
    g.add_argument("--tls-key", default=None, help="its PEM private key")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle peers' certificates are checked against")
    g.add_argument("--tls-server-name", default=None, help="the name checked in peers' certificates instead of their address")


def from_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TLSFiles | None:
    """The TLS files the flags name, or None for plaintext; exits naming the flag that is wrong."""
    given = {name: getattr(args, f"tls_{name}") for name in ("cert", "key", "ca")}
    if not any(given.values()):
        return None
    tls = TLSFiles(**{k: v or "" for k, v in given.items()}, server_name=args.tls_server_name)
    bad = tls.missing()
    if bad:
        parser.error(f"--tls-{bad[0]}: {getattr(tls, bad[0]) or 'missing'}: not a readable file (TLS needs --tls-cert, --tls-key and --tls-ca)")
    return tls


def to_flags(tls: TLSFiles | None) -> list[str]:
    if tls is None:
        return []
    return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca, *(["--tls-server-name", tls.server_name] if tls.server_name else [])]
