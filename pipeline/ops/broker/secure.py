"""The secured local broker: TLS from a certificate authority made here, SCRAM-SHA-512 users
made when the storage is formatted, and KRaft's StandardAuthorizer with the worker's ACLs.

Three listeners, all on 127.0.0.1:

- ``CLIENT`` (SASL_SSL, SCRAM-SHA-512): workers, clients and the admin. The broker presents
  a certificate for 127.0.0.1 and localhost signed by the local CA.
- ``BROKER`` and ``CONTROLLER`` (SSL with client certificates required): the broker's own
  traffic, authenticated by its certificate (principal ``User:broker``).

Only ``User:admin`` (used at setup) and ``User:broker`` are super users; the worker's
principal gets exactly the ACLs of `worker_acls`. The certificates are made with the
``openssl`` command line, the passwords with `secrets`; both stay in the broker's state
folder (mode 0600), never in a log or a repr.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
WORKER = "sluice"
BROKER_CN = "broker"
_DAYS = "825"


class SecurityError(RuntimeError):
    """A certificate or a user could not be made."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SecurityError(f"openssl {args[0]} failed: {result.stderr[-2000:]}")


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA in ``folder``: (certificate, key) as PEM."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name,
             "-out", cert.name, "-days", _DAYS, "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    key.chmod(0o600)
    return cert, key


def issue(folder: Path, ca: tuple[Path, Path], cn: str) -> tuple[Path, Path]:
    """A certificate for ``cn`` signed by ``ca``, valid for 127.0.0.1 and localhost as server
    and as client: (certificate, PKCS#8 key) as PEM."""
    cert, key, csr = folder / f"{cn}.pem", folder / f"{cn}.key", folder / f"{cn}.csr"
    ext = folder / f"{cn}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
             "-subj", f"/CN={cn}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", cert.name, "-days", _DAYS, "-extfile", ext.name,
             cwd=folder)  # fmt: skip
    csr.unlink()
    ext.unlink()
    key.chmod(0o600)
    return cert, key


@dataclass(frozen=True)
class Security:
    """The secured broker's files and users, under ``folder``."""

    folder: Path
    admin: Credentials
    worker: Credentials

    @property
    def ca_file(self) -> Path:
        return self.folder / "sluice-local-ca.pem"

    @property
    def keystore(self) -> Path:
        """The broker's key and certificate chain, one PEM file (Kafka's PEM keystore)."""
        return self.folder / "broker-keystore.pem"

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Security:
        folder = state_dir / "tls"
        users = state_dir / "users.json"
        if users.exists() and (folder / "broker-keystore.pem").exists():
            saved = json.loads(users.read_text())
            return cls(folder, Credentials(**saved["admin"]), Credentials(**saved["worker"]))
        ca = make_ca(folder, "sluice-local-ca")
        cert, key = issue(folder, ca, BROKER_CN)
        keystore = folder / "broker-keystore.pem"
        keystore.write_text(key.read_text() + cert.read_text() + ca[0].read_text())
        keystore.chmod(0o600)
        made = cls(folder, Credentials(ADMIN, secrets.token_urlsafe(24)),
                   Credentials(WORKER, secrets.token_urlsafe(24)))  # fmt: skip
        fd = os.open(users, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            users_of = {"admin": made.admin, "worker": made.worker}
            json.dump({u: {"username": c.username, "password": c.password}
                       for u, c in users_of.items()}, f)  # fmt: skip
        return made

    def scram_arguments(self) -> list[str]:
        """The storage tool's arguments that make the SCRAM users when it formats."""
        return [
            arg
            for c in (self.admin, self.worker)
            for arg in ("--add-scram", f"{MECHANISM}=[name={c.username},password={c.password}]")
        ]

    def listeners(self, port: int, broker_port: int, controller_port: int) -> str:
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return f"""\
listeners=CLIENT://127.0.0.1:{port},BROKER://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=CLIENT://127.0.0.1:{port},BROKER://127.0.0.1:{broker_port}
listener.security.protocol.map=CLIENT:SASL_SSL,BROKER:SSL,CONTROLLER:SSL
inter.broker.listener.name=BROKER
controller.listener.names=CONTROLLER
sasl.enabled.mechanisms={MECHANISM}
listener.name.client.sasl.enabled.mechanisms={MECHANISM}
listener.name.client.{MECHANISM.lower()}.sasl.jaas.config={jaas}
ssl.keystore.type=PEM
ssl.keystore.location={self.keystore}
ssl.truststore.type=PEM
ssl.truststore.location={self.ca_file}
listener.name.broker.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([a-zA-Z0-9._-]+)$/$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:{ADMIN};User:{BROKER_CN}
allow.everyone.if.no.acl.found=false
"""

    def client_config(self, who: Credentials) -> dict[str, Any]:
        """librdkafka's settings for ``who`` on the CLIENT listener."""
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": who.username,
            "sasl.password": who.password,
            "ssl.ca.location": str(self.ca_file),
        }

    def settings_env(self, who: Credentials) -> dict[str, str]:
        """The ``SLUICE_*`` variables that connect a worker (or client) as ``who``."""
        return {
            "SLUICE_SECURITY_PROTOCOL": "SASL_SSL",
            "SLUICE_SASL_MECHANISM": MECHANISM,
            "SLUICE_SASL_USERNAME": who.username,
            "SLUICE_SASL_PASSWORD": who.password,
            "SLUICE_SSL_CAFILE": str(self.ca_file),
        }


def worker_acls(prefix: str, principal: str = f"User:{WORKER}") -> list[Any]:
    """What the worker may do, and nothing else: read its request, infer, results,
    changelog and experiment-event topics; write its responses, replies, infer, results, DLQ,
    changelog, shadow and experiment-event topics; use its consumer groups and transactional
    ids (all named ``<prefix>…``)."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    read = [
        (f"{prefix}.requests", prefixed),  # and .requests.priority
        (f"{prefix}.infer.", prefixed),
        (f"{prefix}.results", literal),
        (f"{prefix}.features-changelog", literal),
        (f"{prefix}.experiments", literal),
    ]
    write = [
        (f"{prefix}.responses", literal),
        (f"{prefix}.replies", prefixed),
        (f"{prefix}.infer.", prefixed),
        (f"{prefix}.results", literal),
        (f"{prefix}.dlq", literal),
        (f"{prefix}.features-changelog", literal),
        (f"{prefix}.shadow", literal),
        (f"{prefix}.experiments", literal),
    ]
    allow = AclPermissionType.ALLOW

    def acl(kind: Any, name: str, pattern: Any, op: Any) -> Any:
        return AclBinding(kind, name, pattern, principal, "*", op, allow)

    return (
        [acl(ResourceType.TOPIC, n, p, AclOperation.READ) for n, p in read]
        + [acl(ResourceType.TOPIC, n, p, AclOperation.WRITE) for n, p in write]
        + [acl(ResourceType.GROUP, f"{prefix}-", prefixed, AclOperation.READ)]
        + [
            acl(ResourceType.TRANSACTIONAL_ID, f"{prefix}-", prefixed, op)
            for op in (AclOperation.WRITE, AclOperation.DESCRIBE)
        ]  # fmt: skip
    )


def grant(admin: Any, acls: list[Any], timeout_s: float = 30.0) -> None:
    for future in admin.create_acls(acls, request_timeout=timeout_s).values():
        future.result()
